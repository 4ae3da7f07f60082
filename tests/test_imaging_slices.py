"""The multi-slice policy: evenly spaced selection with a cap, and merging of per-slice findings."""

import itertools
from datetime import UTC, datetime

import numpy as np
import pytest

from core.manifest import FrameEntry, InstanceEntry, SeriesEntry, StudyInfo, StudyManifest
from core.result import Finding
from model.phantoms import generate_study, study_rng
from model.slices import SlicePolicy, SlicePosition, merge_findings, plan_study, select_indices, slice_key


def test_selection_is_evenly_spaced_and_capped():
    assert select_indices(1, 8) == [0]
    assert select_indices(5, 8) == [0, 1, 2, 3, 4]
    assert select_indices(100, 4) == [12, 37, 62, 87]
    chosen = select_indices(301, 8)
    assert len(chosen) == 8 and chosen == sorted(set(chosen))
    gaps = {b - a for a, b in itertools.pairwise(chosen)}
    assert max(gaps) - min(gaps) <= 1
    with pytest.raises(ValueError, match="max_per_series 0 must be at least 1"):
        select_indices(3, 0)


def _manifest(n):
    instances = [InstanceEntry(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               path=f"{i}.dcm", transfer_syntax_uid="1.2.840.10008.1.2.1", rows=64, columns=64)
                 for i in range(n)]
    instances.append(InstanceEntry(sop_instance_uid="1.2.3.999", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                                   path="sr.dcm", transfer_syntax_uid="1.2.840.10008.1.2.1"))
    series = SeriesEntry(series_instance_uid="1.2.3", modality="CT", instances=instances)
    return StudyManifest(study_instance_uid="1.2", episode_id=1, created_at=datetime.now(UTC), study=StudyInfo(),
                         series=[series])


def test_plan_skips_non_images_and_ranks_the_selected_slices():
    chosen, positions = plan_study(_manifest(40), SlicePolicy(max_per_series=5))
    assert [instance.sop_instance_uid for _, instance in chosen] == [f"1.2.3.{i}" for i in (4, 12, 20, 28, 36)]
    assert positions["1.2.3.20"] == SlicePosition("1.2.3", 2)
    assert "1.2.3.999" not in positions


def _multiframe_manifest(frames, *, listed=True):
    """One enhanced image of *frames* frames, listed bottom up (frame *frames* first) as prepare writes them when
    every frame has a position; *listed* False: a manifest written before frames were listed."""
    entries = tuple(FrameEntry(number=n, image_position_patient=(0.0, 0.0, float(frames - n)))
                    for n in range(frames, 0, -1)) if listed else ()
    image = InstanceEntry(sop_instance_uid="1.2.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.2.1", path="mf.dcm",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", rows=64, columns=64, number_of_frames=frames,
                          frames=entries)
    series = SeriesEntry(series_instance_uid="1.2.8", modality="CT", instances=[image])
    return StudyManifest(study_instance_uid="1.2", episode_id=1, created_at=datetime.now(UTC), study=StudyInfo(),
                         series=[series])


def test_frames_of_an_enhanced_image_are_picked_as_the_instances_of_a_classic_series():
    chosen, positions = plan_study(_multiframe_manifest(40), SlicePolicy(max_per_series=5))
    classic, _ = plan_study(_manifest(40), SlicePolicy(max_per_series=5))
    # the same spatial indices 4, 12, 20, 28, 36 (bottom up): frame 40 - i
    assert [picked.frame_number for _, picked in chosen] == [40 - i for i in (4, 12, 20, 28, 36)]
    assert [int(picked.sop_instance_uid.rsplit(".", 1)[1]) for _, picked in classic] == [4, 12, 20, 28, 36]
    assert [picked.frame_index for _, picked in chosen] == [35, 27, 19, 11, 3]
    assert positions[slice_key("1.2.9", 20)] == SlicePosition("1.2.8", 2)
    assert "1.2.9" not in positions  # a frame is named with its number, never as the whole image
    old, _ = plan_study(_multiframe_manifest(40, listed=False), SlicePolicy(max_per_series=5))
    assert [picked.frame_number for _, picked in old] == [5, 13, 21, 29, 37]  # by number


def test_findings_on_frames_of_one_image_merge_as_findings_on_slices():
    positions = {slice_key("1.2.9", n): SlicePosition("1.2.8", k) for k, n in enumerate((7, 5, 3))}
    on = [Finding(label="nodule", sop_instance_uid="1.2.9", frame_number=n, box=box)
          for n, box in ((7, (10, 10, 20, 20)), (5, (10, 10, 22, 22)), (3, (60, 60, 70, 70)))]
    merged = merge_findings(on, positions, SlicePolicy())
    assert len(merged) == 2
    nodule = next(m for m in merged if m.support == 2)
    assert nodule.finding == on[1]  # the larger box, on frame 5
    assert nodule.slices == (slice_key("1.2.9", 7), slice_key("1.2.9", 5)) and nodule.sop_instance_uids == ("1.2.9",)
    twice = [on[0], on[0].model_copy(update={"box": (11, 11, 21, 21)})]  # one frame: two findings stay two
    assert len(merge_findings(twice, positions, SlicePolicy())) == 2


def _finding(uid, box, label="nodule"):
    return Finding(label=label, sop_instance_uid=uid, box=box, laterality="right")


def test_overlapping_findings_on_adjacent_slices_merge_into_the_largest():
    positions = {f"s{k}": SlicePosition("ser", k) for k in range(5)}
    findings = [
        _finding("s1", (10, 10, 20, 20)),
        _finding("s2", (8, 8, 22, 22)),  # largest section
        _finding("s3", (11, 11, 19, 19)),
        _finding("s2", (60, 60, 70, 70)),  # another nodule on the same slice
        _finding("s4", (8, 8, 22, 22), label="mass"),  # another label
        _finding("s0", (40, 40, 50, 50)),  # no overlap with the chain
    ]
    merged = merge_findings(findings, positions, SlicePolicy())
    assert len(merged) == 4
    lesion = next(m for m in merged if m.support == 3)
    assert lesion.finding.box == (8, 8, 22, 22) and lesion.finding.sop_instance_uid == "s2"
    assert lesion.sop_instance_uids == ("s1", "s2", "s3")


def test_slices_further_apart_than_max_gap_do_not_merge():
    positions = {f"s{k}": SlicePosition("ser", k) for k in range(5)}
    findings = [_finding("s0", (10, 10, 20, 20)), _finding("s2", (10, 10, 20, 20))]
    assert len(merge_findings(findings, positions, SlicePolicy())) == 2
    assert len(merge_findings(findings, positions, SlicePolicy(max_gap=2))) == 1


def test_small_boxes_a_few_pixels_apart_on_neighbour_slices_are_one_lesion():
    positions = {f"s{k}": SlicePosition("ser", k) for k in range(3)}
    apart = [_finding("s0", (10, 10, 18, 18)), _finding("s1", (18.5, 10, 28.5, 20))]  # no overlap, centres 9.6 apart
    merged = merge_findings(apart, positions, SlicePolicy())
    assert len(merged) == 1 and merged[0].finding.sop_instance_uid == "s1" and merged[0].support == 2
    assert len(merge_findings(apart, positions, SlicePolicy(centre_reach=0))) == 2  # overlap only
    assert len(merge_findings(apart, positions, SlicePolicy(centre_reach=0.9))) == 2  # reach 9 px < 9.6
    far = [_finding("s0", (10, 10, 18, 18)), _finding("s1", (30, 10, 40, 20))]  # centres 21 apart, side 10
    assert len(merge_findings(far, positions, SlicePolicy())) == 2
    same_slice = [_finding("s1", (10, 10, 18, 18)), _finding("s1", (19, 12, 29, 22))]
    assert len(merge_findings(same_slice, positions, SlicePolicy())) == 2  # two nodules of one slice stay two


def test_a_tumour_is_kept_on_the_slice_of_its_oedema():
    """The tumour's boxes are the same size on s1 and s2 (the largest-box rule keeps the middle-first s1); the oedema
    around it is largest on s2, so the tumour's finding becomes its member on s2."""
    positions = {f"s{k}": SlicePosition("ser", k) for k in range(4)}
    tumour = [_finding("s0", (44, 44, 56, 56), "tumor"), _finding("s1", (40, 40, 60, 60), "tumor"),
              _finding("s2", (41, 40, 61, 60), "tumor"), _finding("s3", (43, 43, 57, 57), "tumor")]
    oedema = [_finding("s1", (25, 25, 75, 75), "edema"), _finding("s2", (20, 20, 80, 80), "edema"),
              _finding("s3", (28, 28, 72, 72), "edema")]
    plain = {m.finding.label: m for m in merge_findings(tumour + oedema, positions, SlicePolicy(surroundings=()))}
    assert plain["tumor"].finding.sop_instance_uid == "s1" and plain["edema"].finding.sop_instance_uid == "s2"
    merged = {m.finding.label: m for m in merge_findings(tumour + oedema, positions, SlicePolicy())}
    assert merged["tumor"].finding == tumour[2]  # its own box on s2
    assert merged["tumor"].support == 4 and merged["tumor"].sop_instance_uids == ("s0", "s1", "s2", "s3")
    assert merged["edema"] == plain["edema"]
    # only a slice the tumour was seen on: oedema largest on s3 where no tumour box lies -> the largest-box rule
    oedema_s3 = [_finding("s2", (25, 25, 75, 75), "edema"), _finding("s3", (20, 20, 80, 80), "edema")]
    alone = {m.finding.label: m for m in merge_findings(tumour[:2] + oedema_s3, positions, SlicePolicy())}
    assert alone["edema"].finding.sop_instance_uid == "s3" and alone["tumor"].finding == tumour[1]


def test_an_oedema_elsewhere_or_in_another_series_does_not_move_a_tumour():
    positions = {"a1": SlicePosition("A", 0), "a2": SlicePosition("A", 1), "b2": SlicePosition("B", 1)}
    tumour = [_finding("a1", (40, 40, 60, 60), "tumor"), _finding("a2", (40, 40, 60, 60), "tumor")]
    beside = [_finding("a2", (70, 70, 120, 120), "edema")]  # does not contain the tumour's centre
    other_series = [_finding("b2", (20, 20, 80, 80), "edema")]
    for others in (beside, other_series):
        merged = merge_findings(tumour + others, positions, SlicePolicy())
        assert next(m for m in merged if m.finding.label == "tumor").finding == tumour[0]
    nodules = [_finding("a1", (40, 40, 60, 60)), _finding("a2", (40, 40, 60, 60))]  # not a surrounded label
    merged = merge_findings([*nodules, _finding("a2", (20, 20, 80, 80), "edema")], positions, SlicePolicy())
    assert next(m for m in merged if m.finding.label == "nodule").finding == nodules[0]


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match=r"min_overlap 0\.0 must be in"):
        SlicePolicy(min_overlap=0.0)
    with pytest.raises(ValueError, match=r"centre_reach -1\.0 must not be negative"):
        SlicePolicy(centre_reach=-1.0)
    with pytest.raises(ValueError, match=r"surroundings entry \('tumor', 'tumor'\) must be two different labels"):
        SlicePolicy(surroundings=(("tumor", "tumor"),))


def test_phantom_ct_truth_is_on_the_slice_with_the_largest_section():
    """Boxes of every drawn nodule section, merged by the policy, reproduce the truth: one box per nodule."""
    for index in range(6):
        study = generate_study(study_rng(13, index), "CT")
        plain = generate_study(study_rng(13, index), "CT", paint_findings=False)
        uids = [str(ds.SOPInstanceUID) for ds in study.datasets]
        positions = {uid: SlicePosition("ser", k) for k, uid in enumerate(uids)}
        per_slice = []
        for finding in study.findings:
            x1, y1, x2, y2 = finding.box
            for k, (a, b) in enumerate(zip(study.rendering.images, plain.rendering.images, strict=True)):
                diff = a[y1:y2, x1:x2] != b[y1:y2, x1:x2]
                if diff.any():
                    rows, cols = np.nonzero(diff)
                    per_slice.append(_finding(uids[k], (x1 + cols.min(), y1 + rows.min(), x1 + cols.max() + 1,
                                                        y1 + rows.max() + 1)))
        merged = merge_findings(per_slice, positions, SlicePolicy())
        got = sorted((m.finding.sop_instance_uid, m.finding.box) for m in merged)
        want = sorted((f.sop_instance_uid, tuple(float(v) for v in f.box)) for f in study.findings)
        assert got == want


def test_phantom_mr_truth_is_kept_with_the_oedema_rule():
    """Every drawn tumour and oedema section of phantom brain MRs, merged by the policy, gives the truth's slices and
    boxes: on exact sections the oedema's largest slice is the tumour's."""
    checked = 0
    for index in range(12):
        study = generate_study(study_rng(17, index), "MR")
        if not study.findings:
            continue
        uids = [str(ds.SOPInstanceUID) for ds in study.datasets]
        positions = {uid: SlicePosition("ser", k) for k, uid in enumerate(uids)}
        per_slice = [_finding(uids[s.image_index], tuple(float(v) for v in s.box), s.label)
                     for s in study.rendering.sections]
        merged = merge_findings(per_slice, positions, SlicePolicy())
        got = sorted((m.finding.label, m.finding.sop_instance_uid, m.finding.box) for m in merged)
        want = sorted((f.label, f.sop_instance_uid, tuple(float(v) for v in f.box)) for f in study.findings)
        assert got == want
        checked += 1
    assert checked >= 4
