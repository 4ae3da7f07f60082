"""The sentence reading of a draft (model/sentences.py): polarity, labels, laterality and site per sentence.

On the phantom vocabulary (every report the phantom writer makes states exactly its findings' labels) and on
free text it was not written for (radiology phrasing from public report conventions).
"""

from __future__ import annotations

import numpy as np
import pytest

from core.result import DraftReport
from model.analyze import split_report
from model.phantom_anatomy import DrawnFinding
from model.phantom_text import write_report
from model.sentences import read_report, read_sentence, split_sentences, supports

LABELS = {"CR": ["nodule", "mass", "pleural effusion", "pneumothorax", "consolidation", "cardiomegaly"],
          "CT": ["nodule"], "MR": ["tumor", "edema"]}


@pytest.mark.parametrize("modality", ["CR", "CT", "MR"])
def test_every_phantom_report_states_exactly_its_findings(modality: str) -> None:
    rng = np.random.default_rng(19)
    for _ in range(300):
        count = int(rng.integers(0, 3))
        if modality == "MR":
            chosen = ["tumor", "edema"] if count else []
        else:
            chosen = [str(label) for label in rng.choice(LABELS[modality], size=min(count, len(LABELS[modality])),
                                                          replace=False)]
        side = str(rng.choice(["left", "right"]))
        findings = [DrawnFinding(label, (1, 1, 5, 5), side, "upper zone", size_mm=9.0) for label in chosen]
        sentences = read_report(split_report(write_report(rng, modality, findings, ctr=0.61)))
        stated = {label for sentence in sentences for label in sentence.labels}
        assert all(any(supports(label, truth) for truth in chosen) for label in stated), (chosen, sentences)
        assert all(any(supports(label, truth) for label in stated) for truth in chosen), (chosen, sentences)
        positives = [sentence for sentence in sentences if sentence.polarity == "positive"]
        assert bool(positives) == bool(chosen)
        assert all(sentence.laterality in (None, side) for sentence in positives)


@pytest.mark.parametrize(("text", "polarity", "labels", "laterality"), [
    ("Heart size is normal.", "normal", (), None),
    ("Mediastinal and hilar contours are unremarkable.", "normal", (), None),
    ("There is no focal consolidation, pleural effusion or pneumothorax.", "negative", (), None),
    ("No acute fracture.", "negative", (), None),
    ("No midline shift.", "negative", (), None),
    ("Mild bibasilar atelectasis.", "positive", ("atelectasis",), None),
    ("A small left pleural effusion cannot be excluded.", "positive", ("pleural effusion",), "left"),
    ("No change in the right pleural effusion.", "positive", ("pleural effusion",), "right"),
    ("Bilateral pleural effusions, right greater than left.", "positive", ("pleural effusion",), "bilateral"),
    ("Moderate cardiomegaly with pulmonary vascular congestion.", "positive", ("cardiomegaly", "congestion"), None),
    ("The cardiac silhouette is enlarged.", "positive", ("cardiomegaly",), None),
    ("A visceral pleural line is seen at the left apex with absent lung markings beyond it.", "positive",
     ("pneumothorax",), "left"),
    ("An ill-defined lesion in the right temporal lobe.", "positive", (), "right"),
    ("Recommend follow-up per Fleischner guidelines.", "neutral", (), None),
    ("ET tube terminates 4 cm above the carina.", "neutral", (), None),
])
def test_free_text_it_was_not_written_for(text: str, polarity: str, labels: tuple[str, ...],
                                          laterality: str | None) -> None:
    sentence = read_sentence(text, "findings")
    assert (sentence.polarity, sentence.labels, sentence.laterality) == (polarity, labels, laterality)


def test_negated_labels_are_kept_apart_from_stated_ones() -> None:
    sentence = read_sentence("Right pleural effusion without pneumothorax.", "findings")
    assert sentence.labels == ("pleural effusion",)
    assert sentence.negated == ("pneumothorax",)


def test_site_is_read_from_the_sentence() -> None:
    assert read_sentence("Solid nodule in the right upper lobe measuring 11 mm.", "findings").site == "upper lobe"
    assert read_sentence("A 20 mm mass in the left temporal lobe.", "findings").site == "temporal lobe"


def test_decimals_do_not_end_a_sentence_and_sections_are_kept() -> None:
    assert split_sentences("The cardiothoracic ratio is 0.55. No effusion.") == [
        "The cardiothoracic ratio is 0.55.", "No effusion."]
    sentences = read_report(DraftReport(findings="Cardiomegaly: the ratio measures 0.58. No effusion.",
                                        impression="Cardiomegaly."))
    assert [(s.section, s.polarity) for s in sentences] == [
        ("findings", "positive"), ("findings", "negative"), ("impression", "positive")]


def test_a_mass_sentence_is_supported_by_a_tumour_box_and_not_by_an_effusion() -> None:
    assert supports("mass", "tumor")
    assert supports("pneumonia", "consolidation")
    assert not supports("mass", "pleural effusion")
    assert not supports("pneumothorax", "pleural effusion")
