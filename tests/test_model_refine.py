"""Box refinement of focal lesions: CT components and slice following, radiograph opacities, what stays as is."""

import numpy as np
import pytest

from core.result import Finding
from model.imaging import display_values
from model.phantoms import generate_study, study_rng
from model.refine import RefinePolicy, components, ct_component, follow_slices, hounsfield, refine_findings
from model.slices import iou


def _study_with(modality, label, *, first_seed=0, min_side=0):
    """The first phantom study (seeds from *first_seed*) with a *label* finding whose box side is ≥ *min_side*."""
    for index in range(200):
        study = generate_study(study_rng(4242 + first_seed, index), modality)
        found = [f for f in study.findings if f.label == label and f.box[2] - f.box[0] >= min_side]
        if found:
            return study, found
    raise AssertionError(f"no {modality} phantom with a {label} in 200 studies")


def _model_box(box, dx, dy, grow):
    """What a grid answer one or two units off looks like: shifted and grown."""
    x1, y1, x2, y2 = box
    return (x1 + dx - grow, y1 + dy - grow, x2 + dx + grow, y2 + dy + grow)


def _finding(uid, box, label="nodule"):
    return Finding(label=label, sop_instance_uid=uid, box=tuple(float(v) for v in box), laterality="right")


def _refine(study, findings, policy=None):
    displays = [display_values(ds) for ds in study.datasets]
    return refine_findings(findings, study.datasets, displays, policy)


def test_ct_nodule_box_snaps_to_the_nodule():
    study, truths = _study_with("CT", "nodule", min_side=6)
    for truth in truths:
        off = _model_box(truth.box, 3, -2, 1)
        assert iou(off, truth.box) < 0.5  # the model's box alone would not count
        refined = _refine(study, [_finding(truth.sop_instance_uid, off)])
        assert len(refined) == 1
        assert refined[0].sop_instance_uid == truth.sop_instance_uid
        assert iou(refined[0].box, truth.box) >= 0.65


def test_ct_finding_on_a_neighbouring_slice_moves_to_the_nodule_centre_slice():
    study, truths = _study_with("CT", "nodule", min_side=8)
    uids = [str(ds.SOPInstanceUID) for ds in study.datasets]
    truth = truths[0]
    centre = uids.index(truth.sop_instance_uid)
    drawn = {(d.image_index, d.label) for d in study.rendering.sections}
    neighbours = [k for k in (centre - 1, centre + 1) if (k, "nodule") in drawn and 0 <= k < len(uids)]
    assert neighbours, "the phantom nodule must cross a neighbouring slice"
    for k in neighbours:
        refined = _refine(study, [_finding(uids[k], _model_box(truth.box, 2, 2, 0))])
        assert [f.sop_instance_uid for f in refined] == [truth.sop_instance_uid]
        assert iou(refined[0].box, truth.box) >= 0.65
    # the same nodule boxed on two slices ends up once on its centre slice
    both = [_finding(uids[k], _model_box(truth.box, 1, 1, 0)) for k in (*neighbours, centre)]
    assert len(_refine(study, both)) == 1


def test_ct_refinement_uses_hounsfield_units_not_the_stored_window():
    study, truths = _study_with("CT", "nodule", min_side=6)
    truth = truths[0]
    soft_tissue = [ds.copy() for ds in study.datasets]
    for ds in soft_tissue:
        ds.WindowCenter, ds.WindowWidth = 40, 400  # lung and nodule look different, HU stay the same
    uid = truth.sop_instance_uid
    off = _finding(uid, _model_box(truth.box, -2, 3, 1))
    plain = _refine(study, [off])
    windowed = refine_findings([off], soft_tissue, [display_values(ds) for ds in soft_tissue])
    assert plain[0].box == windowed[0].box
    k = [str(ds.SOPInstanceUID) for ds in study.datasets].index(uid)
    assert hounsfield(study.datasets[k]).min() < -700  # air / lung in HU


def _lung(shape=(64, 64)):
    return np.full(shape, -850.0, dtype=np.float32)


def test_components_are_four_connected_with_tight_bounds():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    mask[3, 3] = True  # touches the first one only diagonally
    mask[5, 0:6] = True
    found = sorted(components(mask))
    assert found == [(1, slice(3, 4), slice(3, 4)), (4, slice(1, 3), slice(1, 3)), (6, slice(5, 6), slice(0, 6))]


def test_ct_component_rules():
    policy = RefinePolicy()
    hu = _lung()
    assert ct_component(hu, (20, 20, 28, 28), policy) is None  # nothing above -600 HU: no support
    hu[22:30, 23:31] = 40.0  # an 8 × 8 nodule, 3 px off the model box
    hu[40:42, 40:42] = 40.0  # a 4-pixel vessel dot: below min_pixels
    found = ct_component(hu, (20, 20, 28, 28), policy)
    assert found is not None and found.box == (23.0, 22.0, 31.0, 30.0) and found.pixels == 64
    wall = _lung()
    wall[:, 30:] = 40.0  # the chest wall runs out of any window: never a nodule
    assert ct_component(wall, (26, 20, 34, 28), policy) is None
    big = _lung((128, 128))
    big[30:80, 30:80] = 40.0  # far larger than the box: not the small lesion the model boxed
    assert ct_component(big, (50, 50, 58, 58), RefinePolicy(reach=5.0)) is None
    two = _lung()
    two[10:16, 10:16] = 40.0
    two[30:36, 30:36] = 40.0
    nearest = ct_component(two, (27, 27, 35, 35), RefinePolicy(reach=3.0))
    assert nearest is not None and nearest.box == (30.0, 30.0, 36.0, 36.0)


def test_following_stops_where_the_section_stops_growing():
    policy = RefinePolicy()
    slices = [_lung() for _ in range(5)]
    for k, half in enumerate((0, 2, 4, 3, 1)):
        if half:
            slices[k][32 - half:32 + half, 30 - half:30 + half] = 40.0
    start = ct_component(slices[1], (26, 26, 32, 32), policy)
    assert start is not None and start.pixels == 16
    index, best = follow_slices(slices, 1, start, policy)
    assert index == 2 and best.box == (26.0, 28.0, 34.0, 36.0)
    moved = _lung()
    moved[5:15, 45:55] = 40.0  # a larger component, but far from the lesion: another structure
    index, _ = follow_slices([slices[1], moved], 0, start, RefinePolicy(reach=5.0))
    assert index == 0


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_radiograph_nodule_box_snaps_to_the_opacity(modality):
    study, truths = _study_with(modality, "nodule")
    uid = str(study.datasets[0].SOPInstanceUID)
    for truth in truths:
        side = truth.box[2] - truth.box[0]
        off = _model_box(truth.box, 0.25 * side, -0.2 * side, 0.15 * side)
        refined = _refine(study, [_finding(uid, off)])
        assert iou(refined[0].box, truth.box) > max(0.6, iou(off, truth.box))


def test_radiograph_refinement_works_on_monochrome1_too():
    for seed in range(20):
        study, truths = _study_with("CR", "nodule", first_seed=seed)
        if study.datasets[0].PhotometricInterpretation == "MONOCHROME1":
            break
    else:
        raise AssertionError("no MONOCHROME1 CR phantom with a nodule")
    truth = truths[0]
    side = truth.box[2] - truth.box[0]
    off = _model_box(truth.box, -0.2 * side, 0.2 * side, 0)
    refined = _refine(study, [_finding(str(study.datasets[0].SOPInstanceUID), off)])
    assert iou(refined[0].box, truth.box) > max(0.6, iou(off, truth.box))


def test_other_labels_modalities_and_a_disabled_policy_keep_the_model_box():
    study, truths = _study_with("CR", "pleural effusion")
    uid = str(study.datasets[0].SOPInstanceUID)
    effusion = _finding(uid, _model_box(truths[0].box, 5, 5, 0), label="pleural effusion")
    assert _refine(study, [effusion]) == [effusion]
    mr, tumours = _study_with("MR", "tumor")
    tumour = _finding(tumours[0].sop_instance_uid, _model_box(tumours[0].box, 3, 3, 0), label="tumor")
    assert _refine(mr, [tumour]) == [tumour]
    ct, nodules = _study_with("CT", "nodule", min_side=6)
    nodule = _finding(nodules[0].sop_instance_uid, _model_box(nodules[0].box, 3, 3, 1))
    assert _refine(ct, [nodule], RefinePolicy(enabled=False)) == [nodule]
    assert _refine(ct, []) == []


def test_an_empty_lung_keeps_the_model_box():
    study, truths = _study_with("CT", "nodule", min_side=6)
    truth = truths[0]
    k = [str(ds.SOPInstanceUID) for ds in study.datasets].index(truth.sop_instance_uid)
    ds = study.datasets[k].copy()
    pixels = ds.pixel_array.copy()
    x1, y1, x2, y2 = (int(v) for v in truth.box)
    pixels[y1 - 20:y2 + 20, x1 - 20:x2 + 20] = 1024 - 850  # lung only around the nodule (stored = HU + 1024)
    ds.PixelData = pixels.tobytes()
    box = _model_box(truth.box, 2, 2, 0)
    finding = _finding(truth.sop_instance_uid, box)
    assert refine_findings([finding], [ds], [display_values(ds)]) == [finding]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("reach", 0.0, "must be positive"),
    ("max_growth", 0.5, "max_growth 0.5 must be at least 1"),
    ("min_pixels", 0, "min_pixels 0 must be at least 1"),
    ("radiograph_edge", 1.0, r"radiograph_edge 1.0 must be in \(0, 1\)"),
])
def test_policy_values_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        RefinePolicy(**{field: value})
