"""The label -> code table and the deterministic UIDs."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from model.examples import MODALITY_LABELS
from reporting import codes as rcodes
from reporting.uids import OutputKind, device_uid, output_uid

EXPECTED_SCTIDS = {
    "nodule": "27925004",
    "mass": "4147007",
    "pleural effusion": "60046008",
    "pneumothorax": "36118008",
    "consolidation": "95436008",
    "cardiomegaly": "8186001",
    "tumor": "108369006",
    "tumour": "108369006",
    "edema": "79654002",
    "oedema": "79654002",
    "normal": "17621005",
}


@pytest.mark.parametrize(("label", "sctid"), EXPECTED_SCTIDS.items())
def test_every_model_label_has_its_snomed_code(label: str, sctid: str) -> None:
    coded = rcodes.lookup_finding(label)
    assert (coded.finding_type.scheme_designator, coded.finding_type.value) == ("SCT", sctid)
    assert not coded.is_fallback


MODEL_VOCABULARY = [(modality, label) for modality, labels in MODALITY_LABELS.items() for label in labels]


@pytest.mark.parametrize(("modality", "label"), MODEL_VOCABULARY)
def test_every_label_the_model_is_trained_on_is_in_the_table(modality: str, label: str) -> None:
    """model/examples.py MODALITY_LABELS is the model's whole vocabulary: none may fall back to generic."""
    coded = rcodes.lookup_finding(label)
    assert not coded.is_fallback
    assert coded.finding_type.scheme_designator == "SCT"
    assert label in EXPECTED_SCTIDS


def test_labels_are_normalized_before_lookup() -> None:
    assert rcodes.lookup_finding("  Pleural_Effusion. ").finding_type.value == "60046008"
    assert rcodes.lookup_finding("Nodules").finding_type.value == "27925004"


def test_unknown_label_falls_back_to_generic_finding_keeping_its_text() -> None:
    coded = rcodes.lookup_finding("Kerley  B lines")
    assert coded.is_fallback
    assert (coded.finding_type.value, coded.finding_type.scheme_designator) == ("404684003", "SCT")
    assert coded.text == "kerley b lines"
    assert coded.display == "kerley b lines"


def test_empty_label_is_refused() -> None:
    with pytest.raises(ValueError, match="must contain a word"):
        rcodes.lookup_finding(" . ")


def test_sites_from_model_text_label_and_body_part() -> None:
    nodule = rcodes.lookup_finding("nodule")
    assert rcodes.finding_site(nodule, "right upper lung") == rcodes.SITE_CODES["lung"]
    assert rcodes.finding_site(nodule, None, "CHEST").value == "816094009"
    assert rcodes.finding_site(nodule, "somewhere odd") is None
    assert rcodes.finding_site(rcodes.lookup_finding("cardiomegaly"), None).value == "80891009"  # heart


def test_laterality_codes() -> None:
    assert {k: c.value for k, c in rcodes.LATERALITY_CODES.items()} == {
        "left": "7771000", "right": "24028007", "bilateral": "51440002"}


def test_procedure_describes_the_imaging_not_the_algorithm() -> None:
    assert rcodes.procedure_code("CT").value == "25045-6"
    assert rcodes.procedure_code("MR").value == "25056-3"
    assert rcodes.procedure_code("CR").value == "363679005"


def test_output_uids_are_deterministic_valid_and_distinct() -> None:
    args = ("1.2.3.4", 7, "v1")
    first = output_uid(*args, OutputKind.SR)
    assert first == output_uid(*args, OutputKind.SR, version=0)
    assert UID(first).is_valid and first.startswith("2.25.") and len(first) <= 64
    others = {
        output_uid("1.2.3.4", 8, "v1", OutputKind.SR),
        output_uid("1.2.3.4", 7, "v2", OutputKind.SR),
        output_uid("1.2.3.5", 7, "v1", OutputKind.SR),
        output_uid(*args, OutputKind.SR, version=1),
        output_uid(*args, OutputKind.SR, version=2),
        output_uid(*args, OutputKind.SR, version=3),
        output_uid(*args, OutputKind.NARRATIVE),
        output_uid(*args, OutputKind.FINDING, 0),
        output_uid(*args, OutputKind.FINDING, 1),
        output_uid(*args, OutputKind.GSPS, 0),
        output_uid(*args, OutputKind.GSPS, 0, version=1),
        output_uid(*args, OutputKind.GSPS, 0, version=2),
    }
    assert first not in others and len(others) == 12
    assert device_uid("m", "v1") == device_uid("m", "v1") != device_uid("m", "v2")


def test_the_draft_and_first_signed_uids_are_those_of_the_scheme_before_versions() -> None:
    """Outputs already delivered keep their UIDs: a re-run after the upgrade replaces them in the PACS instead of
    adding a second report (the values were made by the scheme of SR_DRAFT, SR_FINAL, ... kinds)."""
    args = ("1.2.3.4", 7, "v1")
    assert output_uid(*args, OutputKind.SR) == "2.25.335765599272326387866588419181067313204"
    assert output_uid(*args, OutputKind.SR, version=1) == "2.25.270092418503457070343873299473183496604"
    assert output_uid(*args, OutputKind.NARRATIVE) == "2.25.124969241716806483857673090256260112154"
    assert output_uid(*args, OutputKind.NARRATIVE, version=1) == "2.25.17425654063548638548017156457761406249"
    assert output_uid(*args, OutputKind.GSPS, 0) == "2.25.7675638024544898547109230748961696973"
    assert output_uid(*args, OutputKind.GSPS, 1, version=1) == "2.25.54690829733261238159146364706384556311"


def test_output_uid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="study_uid must not be empty"):
        output_uid("", 1, "v", OutputKind.SR)
    with pytest.raises(ValueError, match="index -1 of finding must be >= 0"):
        output_uid("1.2", 1, "v", OutputKind.FINDING, -1)
    with pytest.raises(ValueError, match="version -1 of sr must be >= 0"):
        output_uid("1.2", 1, "v", OutputKind.SR, version=-1)
    with pytest.raises(ValueError, match="sr-series is the same for every version"):
        output_uid("1.2", 1, "v", OutputKind.SR_SERIES, version=2)
