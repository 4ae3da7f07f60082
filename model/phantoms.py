"""Synthetic phantom studies with ground truth: chest radiographs (CR, DX), chest CT and brain MR.

In memory, :func:`generate_study` returns a :class:`PhantomStudy` — valid DICOM datasets plus the truth
(findings with source-pixel boxes, a FINDINGS/IMPRESSION report and VQA pairs) — so training can draw
thousands of examples without touching the disk. :func:`write_studies` writes ``OUT/<nnnn>_<modality>/*.dcm``
and ``OUT/truth.json``::

    {"studies": [{"study_uid", "modality", "findings": [{"label", "sop_instance_uid", "box": [x1, y1, x2, y2],
                  "laterality", "site"}], "report", "qa": [{"question", "answer"}]}]}

Everything (pixels, UIDs, names, dates) comes from the seeded generator: the same seed and count give the same
bytes. Study *i* of a run depends only on (seed, i). Patients are synthetic (``PHANTOM^…``).
IODs: CR Image Storage, Digital X-Ray Image Storage - For Presentation, CT Image Storage, MR Image Storage,
16-bit pixels (12 bits stored for CR/DX/MR; CT signed with Rescale Intercept -1024, Rescale Type HU).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from core.jsonio import write_atomic
from model.phantom_anatomy import DrawnFinding, Rendering, render_radiograph
from model.phantom_sections import render_brain_mr, render_chest_ct
from model.phantom_text import make_qa, write_report
from model.prompts import RADIOGRAPH_LABELS

log = logging.getLogger(__name__)

MODALITIES = ("CR", "DX", "CT", "MR")
MODALITY_WEIGHTS = (0.3, 0.3, 0.2, 0.2)  # the mix when no modality is asked for
SOP_CLASSES = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # CR Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
}
RADIOGRAPH_SIDE = (400, 1000)  # pixels per side
CT_INTERCEPT = -1024
MAX_12_BIT = 4095
_GIVEN = ("ALEX", "BLAKE", "CASEY", "DREW", "EDEN", "FINLEY", "GRAY", "HARPER", "INDY", "JORDAN", "KAI", "LANE",
          "MORGAN", "NOVA", "OAKLEY", "PARKER", "QUINN", "REESE", "SAGE", "TAYLOR")
_FINDING_COUNT_P = (0.25, 0.5, 0.25)  # radiographs with 0, 1, 2 findings
_LABEL_P = (0.22, 0.1, 0.2, 0.16, 0.18, 0.14)  # RADIOGRAPH_LABELS order


@dataclass(frozen=True)
class PhantomFinding:
    label: str
    sop_instance_uid: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) source pixels, pixel edges
    laterality: str | None
    site: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "sop_instance_uid": self.sop_instance_uid, "box": list(self.box),
                "laterality": self.laterality, "site": self.site}


@dataclass
class PhantomStudy:
    study_uid: str
    modality: str
    datasets: list[Dataset]  # one series, head to feet for CT/MR
    findings: list[PhantomFinding]
    report: str
    qa: list[dict[str, str]]
    rendering: Rendering  # the float images as drawn (density, HU or MR signal) before storage

    def truth(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "modality": self.modality,
                "findings": [f.to_json() for f in self.findings], "report": self.report, "qa": self.qa}


def study_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of study *index* of a run seeded with *seed*."""
    return np.random.default_rng([seed, index])


def generate_studies(seed: int, count: int, modality: str | None = None) -> Iterator[PhantomStudy]:
    """*count* studies; *modality* None mixes CR, DX, CT and MR."""
    if count < 0:
        raise ValueError(f"count {count} must not be negative")
    for index in range(count):
        rng = study_rng(seed, index)
        chosen = modality or str(rng.choice(MODALITIES, p=MODALITY_WEIGHTS))
        yield generate_study(rng, chosen)


def generate_study(rng: np.random.Generator, modality: str, *, paint_findings: bool = True) -> PhantomStudy:
    """One phantom study. ``paint_findings=False`` gives the same study with the findings left undrawn."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} must be one of {', '.join(MODALITIES)}")
    uid = _UidSource(rng)
    header = _common_header(rng, uid, modality)
    if modality in ("CR", "DX"):
        rows, cols = _radiograph_size(rng)
        labels = _radiograph_labels(rng)
        rendering = render_radiograph(rng, rows, cols, labels, paint_findings=paint_findings)
        monochrome1 = bool(rng.random() < (0.5 if modality == "CR" else 0.25))
        view = str(rng.choice(["PA", "AP"], p=[0.75, 0.25]))
        datasets = [_radiograph_dataset(header, uid, modality, rendering, monochrome1=monochrome1, view=view,
                                         rng=rng)]
    elif modality == "CT":
        nodules = int(rng.choice([0, 1, 2, 3], p=[0.2, 0.45, 0.25, 0.1]))
        rendering = render_chest_ct(rng, nodules, paint_findings=paint_findings)
        datasets = _section_datasets(header, uid, modality, rendering)
    else:
        rendering = render_brain_mr(rng, bool(rng.random() < 0.85), paint_findings=paint_findings)
        datasets = _section_datasets(header, uid, modality, rendering)
    findings = [_to_truth(f, datasets) for f in rendering.findings]
    report = write_report(rng, modality, rendering.findings, rendering.ctr)
    qa = make_qa(rng, modality, rendering.findings)
    return PhantomStudy(str(header.StudyInstanceUID), modality, datasets, findings, report, qa, rendering)


def write_studies(out: Path, seed: int, count: int, modality: str | None = None) -> list[Path]:
    """Write *count* studies under *out* and ``out/truth.json``; returns the DICOM file paths."""
    paths: list[Path] = []
    truth = []
    for index, study in enumerate(generate_studies(seed, count, modality)):
        folder = out / f"{index + 1:04d}_{study.modality}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, ds in enumerate(study.datasets, start=1):
            path = folder / f"IM{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        truth.append(study.truth())
        log.debug("phantom study %d (%s): %d image(s), %d finding(s)", index + 1, study.modality,
                  len(study.datasets), len(study.findings))
    write_atomic(out / "truth.json", (json.dumps({"studies": truth}, indent=2) + "\n").encode())
    log.info("wrote %d phantom studies (%d images) to %s", count, len(paths), out)
    return paths


class _UidSource:
    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def __call__(self) -> UID:
        return generate_uid(entropy_srcs=["raddraft-phantom", str(int(self._rng.integers(0, 2**63)))])


def _radiograph_size(rng: np.random.Generator) -> tuple[int, int]:
    low, high = RADIOGRAPH_SIDE
    rows = int(rng.integers(low, high + 1))
    cols = rows if rng.random() < 0.2 else int(np.clip(round(rows * rng.uniform(0.75, 1.3)), low, high))
    return rows, cols


def _radiograph_labels(rng: np.random.Generator) -> list[str]:
    count = int(rng.choice(len(_FINDING_COUNT_P), p=_FINDING_COUNT_P))
    labels = [str(v) for v in rng.choice(RADIOGRAPH_LABELS, size=count, replace=False, p=_LABEL_P)]
    if "nodule" in labels and rng.random() < 0.3:
        labels.append("nodule")
    return labels


def _to_truth(finding: DrawnFinding, datasets: list[Dataset]) -> PhantomFinding:
    return PhantomFinding(finding.label, str(datasets[finding.image_index].SOPInstanceUID), finding.box,
                          finding.laterality, finding.site)


def _common_header(rng: np.random.Generator, uid: _UidSource, modality: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    date = np.datetime64("2023-01-01") + np.timedelta64(int(rng.integers(0, 1000)), "D")
    seconds = int(rng.integers(7 * 3600, 20 * 3600))
    birth = np.datetime64("1935-01-01") + np.timedelta64(int(rng.integers(0, 70 * 365)), "D")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = str(date).replace("-", "")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    ds.AccessionNumber = f"PH{int(rng.integers(10**7, 10**8))}"
    ds.Modality = modality
    ds.Manufacturer = "raddraft phantom"
    ds.InstitutionName = "Phantom Hospital"
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StudyDescription = {"CR": "XR CHEST", "DX": "XR CHEST", "CT": "CT CHEST", "MR": "MR BRAIN"}[modality]
    ds.SeriesDescription = {"CR": "CHEST", "DX": "CHEST", "CT": "LUNG 5 mm", "MR": "AX FLAIR"}[modality]
    ds.BodyPartExamined = "HEAD" if modality == "MR" else "CHEST"
    ds.PatientName = f"PHANTOM^{_GIVEN[int(rng.integers(len(_GIVEN)))]}"
    ds.PatientID = f"PID{int(rng.integers(10**6, 10**7))}"
    ds.PatientBirthDate = str(birth).replace("-", "")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.StudyInstanceUID = uid()
    ds.SeriesInstanceUID = uid()
    ds.StudyID = str(int(rng.integers(1, 10**6)))
    ds.SeriesNumber = 1
    return ds


def _image_header(header: Dataset, uid: _UidSource, modality: str, number: int) -> Dataset:
    ds = Dataset()
    ds.update(header)
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = uid()
    ds.InstanceNumber = number
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, photometric: str, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()


def _radiograph_dataset(header: Dataset, uid: _UidSource, modality: str, rendering: Rendering, *, monochrome1: bool,
                        view: str, rng: np.random.Generator) -> Dataset:
    ds = _image_header(header, uid, modality, 1)
    gain, offset = float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.0, 0.08))
    values = np.rint((offset + rendering.images[0] * gain) * MAX_12_BIT).clip(0, MAX_12_BIT)
    center, width = (offset + 0.42 * gain) * MAX_12_BIT, 0.85 * gain * MAX_12_BIT
    if monochrome1:
        values, center = MAX_12_BIT - values, MAX_12_BIT - center
    _set_pixels(ds, values, "MONOCHROME1" if monochrome1 else "MONOCHROME2", 12, signed=False)
    spacing = round(rendering.pixel_spacing_mm, 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.WindowCenter, ds.WindowWidth = round(center, 1), round(width, 1)
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]
    ds.KVP = 120 if view == "PA" else 90
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.ImageLaterality = "U"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "NONE"
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "phantom geometry"
        ds.AcquisitionContextSequence = Sequence()
        ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Thorax")])
        ds.ViewCodeSequence = Sequence([_code("399348003" if view == "PA" else "272479009", "SCT",
                                              "postero-anterior" if view == "PA" else "antero-posterior")])
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _section_datasets(header: Dataset, uid: _UidSource, modality: str, rendering: Rendering) -> list[Dataset]:
    frame_of_reference = uid()
    datasets = []
    for k, (image, z) in enumerate(zip(rendering.images, rendering.slice_positions_mm, strict=True)):
        ds = _image_header(header, uid, modality, k + 1)
        rows, cols = image.shape
        spacing = round(rendering.pixel_spacing_mm, 4)
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(-cols / 2 * spacing, 3), round(-rows / 2 * spacing, 3), -z]
        ds.SliceLocation = -z
        ds.SliceThickness = 5
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        if modality == "CT":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            stored = np.rint(image - CT_INTERCEPT).clip(-2048, 2047 - CT_INTERCEPT)
            _set_pixels(ds, stored, "MONOCHROME2", 16, signed=True)
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = CT_INTERCEPT, 1, "HU"
            ds.KVP = 120
            ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]
            ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            stored = np.rint(image).clip(0, MAX_12_BIT)
            _set_pixels(ds, stored, "MONOCHROME2", 12, signed=False)
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "IR", ["SK", "SP"], ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime, ds.EchoTime, ds.InversionTime = 9000, 120, 2500
            ds.EchoTrainLength = 16
            ds.MagneticFieldStrength = 1.5
            ds.ImagedNucleus = "1H"
            low, high = np.percentile(stored, [1.0, 99.5])
            ds.WindowCenter, ds.WindowWidth = round((low + high) / 2, 1), round(max(high - low, 1.0), 1)
        datasets.append(ds)
    return datasets
