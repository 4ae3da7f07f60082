"""Evaluation metrics on hand-made predictions, the negation-aware label extractor and the evaluate command."""

import json

import pytest
from train_helpers import tiny_loaded

from core.result import Finding
from model.evaluation import (
    TruthFinding,
    evaluate_folder,
    extract_labels,
    f1,
    iou,
    label_counts,
    match_findings,
    normalise_answer,
)
from model.phantoms import generate_studies, write_studies
from raddraft.cli import main

TRUTH = [TruthFinding("nodule", "1.1", (10.0, 10.0, 30.0, 30.0)),
         TruthFinding("pleural effusion", "1.1", (50.0, 60.0, 90.0, 100.0))]


def _pred(label, uid, box):
    return Finding(label=label, sop_instance_uid=uid, box=box)


def test_perfect_predictions_score_one():
    counts = match_findings([_pred(t.label, t.sop_instance_uid, t.box) for t in TRUTH], TRUTH)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)
    assert f1(counts.tp, counts.fp, counts.fn) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert counts.ious == (1.0, 1.0)


def test_one_wrong_box_gives_the_known_values():
    shifted = (60.0, 60.0, 100.0, 100.0)  # IoU with the effusion: 30*40 / (1600 + 1600 - 1200) = 0.6
    counts = match_findings([_pred("nodule", "1.1", (10.0, 10.0, 30.0, 30.0)),
                             _pred("pleural effusion", "1.1", shifted)], TRUTH)
    assert counts.ious == (1.0, pytest.approx(0.6))
    wrong = match_findings([_pred("nodule", "1.1", (10.0, 10.0, 30.0, 30.0)),
                            _pred("pleural effusion", "1.1", (0.0, 0.0, 5.0, 5.0))], TRUTH)
    assert (wrong.tp, wrong.fp, wrong.fn) == (1, 1, 1)
    assert f1(wrong.tp, wrong.fp, wrong.fn)["f1"] == pytest.approx(0.5)
    assert wrong.ious == (1.0,)


def test_label_and_instance_must_match_and_matching_is_one_to_one():
    assert match_findings([_pred("mass", "1.1", TRUTH[0].box)], TRUTH[:1]).tp == 0
    assert match_findings([_pred("nodule", "9.9", TRUTH[0].box)], TRUTH[:1]).tp == 0
    twice = match_findings([_pred("nodule", "1.1", TRUTH[0].box)] * 2, TRUTH[:1])
    assert (twice.tp, twice.fp, twice.fn) == (1, 1, 0)


def test_iou_values():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


@pytest.mark.parametrize(("text", "modality", "labels"), [
    ("No pleural effusion or pneumothorax.", "CR", set()),
    ("There is a small left pleural effusion. No pneumothorax.", "CR", {"pleural effusion"}),
    ("The lungs are clear without focal consolidation; the heart is enlarged.", "DX", {"cardiomegaly"}),
    ("Negative for pneumothorax. A 12 mm nodule in the right upper zone.", "CR", {"nodule"}),
    ("The lungs are clear without nodules.", "CT", set()),
    ("Two right pulmonary nodules, the largest 9 mm.", "CT", {"nodule"}),
    ("There is a mass in the left frontal lobe. It is surrounded by vasogenic edema.", "MR", {"tumor", "edema"}),
    ("No intracranial mass.", "MR", set()),
])
def test_extractor_handles_negations(text, modality, labels):
    assert extract_labels(text, modality) == labels


def test_extractor_recovers_the_truth_of_phantom_reports():
    for study in generate_studies(9, 120):
        assert extract_labels(study.report, study.modality) == {f.label for f in study.findings}, study.report


def test_extractor_rejects_unknown_modality():
    with pytest.raises(ValueError, match="modality 'US' must be one of"):
        extract_labels("text", "US")


def test_answers_are_normalised_and_labels_counted():
    assert normalise_answer("Yes.") == normalise_answer("yes")
    assert normalise_answer("Two") == "2"
    assert normalise_answer("an X-ray") == "x ray"
    assert label_counts([{"a", "b"}, set()], [{"a"}, {"c"}]) == (1, 1, 1)


def test_evaluate_folder_and_command_with_a_random_model(tmp_path, capsys):
    write_studies(tmp_path / "set", seed=41, count=2)
    loaded = tiny_loaded()
    metrics = evaluate_folder(loaded, tmp_path / "set")
    assert metrics["studies"] == 2
    assert 0.0 <= metrics["finding"]["f1"] <= 1.0 and 0.0 <= metrics["vqa_accuracy"] <= 1.0
    assert metrics["vqa_questions"] > 0 and metrics["latency_s"]["mean"] > 0
    by_label = metrics["finding"]["by_label"]
    for key in ("tp", "fp", "fn"):
        assert sum(counts[key] for counts in by_label.values()) == metrics["finding"][key]
    truth = json.loads((tmp_path / "set" / "truth.json").read_text())["studies"]
    expected = {f"{s['modality']} {f['label']}" for s in truth for f in s["findings"]}
    assert expected <= set(by_label)
    for name in expected:
        assert by_label[name]["tp"] + by_label[name]["fn"] == sum(
            f"{s['modality']} {f['label']}" == name for s in truth for f in s["findings"])
    raw = metrics["finding_model_boxes"]  # the model's own boxes: the same truth, counted the same way
    assert raw["tp"] + raw["fn"] == metrics["finding"]["tp"] + metrics["finding"]["fn"] == sum(
        len(s["findings"]) for s in truth)
    for key in ("tp", "fp", "fn"):
        assert sum(counts[key] for counts in raw["by_label"].values()) == raw[key]
    loaded.model.save_pretrained(tmp_path / "model")
    assert main(["evaluate", str(tmp_path / "set"), "--model", str(tmp_path / "model"), "--limit", "1",
                 "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["studies"] == 1 and json.loads((tmp_path / "m.json").read_text()) == printed
    assert main(["evaluate", str(tmp_path), "--model", str(tmp_path / "model")]) == 2
    assert "truth.json is missing" in capsys.readouterr().err
