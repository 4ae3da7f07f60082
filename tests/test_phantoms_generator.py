"""Phantom studies: determinism, valid IODs (dciodvfy), truth boxes that hold exactly what was drawn, the CLI."""

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from pydicom import dcmread

from model.imaging import display_values
from model.phantoms import MODALITIES, generate_studies, generate_study, study_rng, write_studies

TRUTH_KEYS = {"study_uid", "modality", "findings", "report", "qa"}
FINDING_KEYS = {"label", "sop_instance_uid", "box", "laterality", "site"}


def _pixel_hashes(studies):
    return [hashlib.sha256(ds.PixelData).hexdigest() for study in studies for ds in study.datasets]


def test_same_seed_gives_identical_truth_and_pixels_and_another_seed_differs():
    first = list(generate_studies(11, 6))
    again = list(generate_studies(11, 6))
    other = list(generate_studies(12, 6))
    assert [s.truth() for s in first] == [s.truth() for s in again]
    assert _pixel_hashes(first) == _pixel_hashes(again)
    assert [s.truth() for s in first] != [s.truth() for s in other]
    assert not set(_pixel_hashes(first)) & set(_pixel_hashes(other))


def test_written_files_are_byte_identical_for_a_seed(tmp_path):
    write_studies(tmp_path / "a", 5, 3)
    write_studies(tmp_path / "b", 5, 3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_modality_passes_dciodvfy_without_errors(tmp_path, modality):
    """Accepted: no warnings are expected either; any "Error" line fails."""
    paths = write_studies(tmp_path, 3, 2, modality)
    assert paths
    for path in paths:
        result = subprocess.run(["/usr/bin/dciodvfy", str(path)], check=False, capture_output=True, text=True,
                                timeout=60)
        report = result.stdout + result.stderr
        assert "Error" not in report, f"{path}:\n{report}"


def test_some_radiographs_are_monochrome1_and_display_inverted():
    seen = {}
    for index in range(12):
        study = generate_study(study_rng(21, index), "CR")
        seen.setdefault(study.datasets[0].PhotometricInterpretation, study)
    assert set(seen) == {"MONOCHROME1", "MONOCHROME2"}
    for study in seen.values():
        drawn = study.rendering.images[0]
        shown = display_values(study.datasets[0])
        # after MONOCHROME1 inversion, bright = dense in both: display correlates positively with density
        assert np.corrcoef(drawn.ravel(), shown.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("modality", MODALITIES)
def test_truth_boxes_lie_inside_the_image_and_hold_exactly_the_drawn_findings(modality):
    """Drawing the same study without its findings changes nothing outside the truth boxes, and each box is tight.

    A CT/MR lesion is a sphere: its sections on the other slices are concentric and smaller, so they too lie in
    the box drawn on the slice with the largest section.
    """
    checked = 0
    for index in range(8):
        with_findings = generate_study(study_rng(31, index), modality)
        without = generate_study(study_rng(31, index), modality, paint_findings=False)
        assert with_findings.truth()["findings"] == without.truth()["findings"]
        by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(with_findings.datasets)}
        rows, cols = with_findings.rendering.images[0].shape
        union = np.zeros((rows, cols), dtype=bool)
        for finding in with_findings.findings:
            x1, y1, x2, y2 = finding.box
            assert 0 <= x1 < x2 <= cols and 0 <= y1 < y2 <= rows, finding
            union[y1:y2, x1:x2] = True
        for k, (a, b) in enumerate(zip(with_findings.rendering.images, without.rendering.images, strict=True)):
            diff = a != b
            assert not (diff & ~union).any(), f"study {index} image {k}: a drawn finding lies outside every box"
            for finding in (f for f in with_findings.findings if by_uid[f.sop_instance_uid] == k):
                if finding.label == "cardiomegaly":
                    continue  # its box is the enlarged heart; the change is the part outside the normal heart
                x1, y1, x2, y2 = finding.box
                inside = diff[y1:y2, x1:x2]
                # tight: every edge of the box touches a changed pixel
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), finding
                checked += 1
    assert checked > 0


def test_findings_change_their_box_the_expected_way():
    """Opacities brighten their box, a pneumothorax darkens it; a nodule is brighter than the lung around it."""
    seen = set()
    for index in range(30):
        study = generate_study(study_rng(41, index), "DX")
        plain = generate_study(study_rng(41, index), "DX", paint_findings=False).rendering.images[0]
        image = study.rendering.images[0]
        for finding in study.findings:
            x1, y1, x2, y2 = finding.box
            own = np.zeros(image.shape, dtype=bool)
            own[y1:y2, x1:x2] = True
            for other in study.findings:
                if other.label != finding.label:  # leave out what overlapping findings of another kind drew
                    own[other.box[1]:other.box[3], other.box[0]:other.box[2]] = False
            change = image[own].mean() - plain[own].mean()
            if finding.label == "pneumothorax":
                assert change < 0, finding
            else:
                assert change > 0, finding
            if finding.label == "nodule":
                margin = max(x2 - x1, y2 - y1) // 2 + 2
                ring = image[max(0, y1 - margin):y2 + margin, max(0, x1 - margin):x2 + margin]
                surround = (ring.sum() - image[y1:y2, x1:x2].sum()) / (ring.size - (y2 - y1) * (x2 - x1))
                assert image[y1:y2, x1:x2].mean() > surround, finding
            if finding.label == "cardiomegaly":
                assert study.rendering.ctr > 0.5
            seen.add(finding.label)
    assert {"nodule", "pleural effusion", "pneumothorax", "consolidation", "cardiomegaly"} <= seen


def test_truth_schema_report_and_questions():
    for study in generate_studies(51, 12):
        truth = study.truth()
        assert set(truth) == TRUTH_KEYS
        assert all(set(f) == FINDING_KEYS for f in truth["findings"])
        assert truth["report"].startswith("FINDINGS:\n") and "\n\nIMPRESSION:\n" in truth["report"]
        answers = {qa["question"]: qa["answer"] for qa in truth["qa"]}
        expected_modality = {"CR": "X-ray", "DX": "X-ray", "CT": "CT", "MR": "MRI"}[study.modality]
        assert expected_modality in answers.values()
        nodules = sum(f["label"] == "nodule" for f in truth["findings"])
        if "How many nodules are there?" in answers:
            assert answers["How many nodules are there?"] == str(nodules)
        for finding in truth["findings"]:
            if finding["laterality"]:
                assert finding["laterality"] in truth["report"].lower()
        if not truth["findings"] and study.modality in ("CR", "DX"):
            assert "pneumothorax" in truth["report"].lower()  # "No pleural effusion or pneumothorax."


def test_generation_is_fast_enough_for_training():
    start = time.perf_counter()
    images = sum(len(s.datasets) for s in generate_studies(61, 10))
    per_image = (time.perf_counter() - start) / images
    assert per_image < 0.25, f"{per_image * 1000:.0f} ms per image"


def test_cli_writes_n_studies_and_truth(tmp_path):
    out = tmp_path / "phantoms"
    result = subprocess.run([sys.executable, "-m", "raddraft.cli", "phantoms", str(out), "--count", "3", "--seed",
                             "4", "--modality", "CT"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["studies"]) == 3
    assert all(s["modality"] == "CT" for s in truth["studies"])
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 3
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.rglob("*.dcm")}
    assert {f["sop_instance_uid"] for s in truth["studies"] for f in s["findings"]} <= uids

    again = subprocess.run([sys.executable, "-m", "raddraft.cli", "phantoms", str(out), "--count", "3"],
                           check=False, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "not an empty folder" in again.stderr


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="modality 'US' must be one of CR, DX, CT, MR"):
        generate_study(np.random.default_rng(0), "US")
