"""Real source studies for the reporting tests: a generated chest CR (800 rows x 600 columns, two views), a
generated legacy multi-frame SC image, pydicom's shipped CT_small/MR_small, and an enhanced multi-frame CT/MR made
from CT_small/MR_small slices by highdicom's legacy converters, copied into a temp spool dir, with a
StudyManifest and AnalysisResult.

Also the validators: dciodvfy (dicom3tools), dsrdump (dcmtk) and PixelMed's DicomSRValidator.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from core.manifest import InstanceEntry, SeriesEntry, StudyInfo, StudyManifest
from core.result import AnalysisResult, DraftReport, Finding, ModelIdentity
from model.grounding import link
from reporting.context import ReportInputs

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped files only: no network
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MULTIFRAME_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
CREATED_AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
MODEL = ModelIdentity(name="MiniGPT-Med", version="stage3-test",
                      parameters={"max_new_tokens": "300", "decoding": "greedy"})
REPORT = DraftReport(findings="Small left pneumothorax. Nodule in the right lung.",
                     impression="Left pneumothorax; right lung nodule.")


@dataclass
class Study:
    spool: Path
    manifest: StudyManifest
    sources: list[Dataset]

    def by_uid(self, uid: str) -> Dataset:
        return next(ds for ds in self.sources if ds.SOPInstanceUID == uid)

    def inputs(self, result: AnalysisResult, sources: Sequence[Dataset] | None = None) -> ReportInputs:
        """The checked inputs of *result* on this study (its own sources unless *sources* are given)."""
        return ReportInputs.check(self.manifest, result, self.sources if sources is None else sources)


def make_cr(study_uid: str, series_uid: str, number: int, view: str, rows: int = 800, columns: int = 600) -> Dataset:
    """A chest CR with every Type 1/2 attribute of the CR Image IOD, a gradient and a bright 'lesion'."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(number)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Tester^Chest"
    ds.PatientID = "RD-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240501"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC1001"
    ds.StudyDescription = "XR Chest 2 views"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Modality = "CR"
    ds.Laterality = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Manufacturer = "Example Imaging"
    ds.ManufacturerModelName = "CR-1"
    ds.InstitutionName = "General Hospital"
    ds.InstanceNumber = number
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
    ds.ContentDate = "20240501"
    ds.ContentTime = "101500"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.ImagerPixelSpacing = [0.2, 0.2]
    pixels = (np.linspace(0, 3000, rows, dtype=np.float64)[:, None] + np.zeros((1, columns))).astype(np.uint16)
    pixels[200:300, 100:200] = 4000
    ds.PixelData = pixels.tobytes()
    return ds


def make_multiframe_sc(study_uid: str, series_uid: str, frames: int = 3, rows: int = 64,
                       columns: int = 80) -> Dataset:
    """A legacy (not enhanced) Multi-frame Grayscale Word SC image: frame n is uniformly 500 * n, plus a square."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MULTIFRAME_SC_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study_uid, "multi-frame"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MULTIFRAME_SC_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Tester^Frames"
    ds.PatientID = "RD-0002"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240501"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyID = "S2"
    ds.AccessionNumber = "ACC2002"
    ds.StudyDescription = "Cine frames"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Modality = "OT"
    ds.Laterality = ""
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate = "20240501"
    ds.ContentTime = "101500"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "IDENTITY"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100.0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    pixels = np.zeros((frames, rows, columns), dtype=np.uint16)
    for frame in range(frames):
        pixels[frame] = 500 * (frame + 1)
        pixels[frame, 10:30, 20:40] = 4000
    ds.PixelData = pixels.tobytes()
    return ds


SLICE_GAP_MM = 5.0


def classic_slices(name: str, count: int, series_uid: str | None = None) -> list[Dataset]:
    """*count* single-frame slices of one series made from pydicom's *name* (CT_small.dcm, MR_small.dcm), given
    from the top down: slice k (Instance Number k + 1) lies ``SLICE_GAP_MM * (count - 1 - k)`` above the original
    along z, its pixels are the original's rolled k columns (so that slices differ), window 40/400 (CT) or the
    original's."""
    original = pydicom.dcmread(PYDICOM_TEST_FILES / name)
    pixels = original.pixel_array
    series_uid = series_uid or generate_uid(entropy_srcs=[name, str(count), "classic"])
    slices = []
    for k in range(count):
        ds = copy.deepcopy(original)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in original.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + SLICE_GAP_MM * (count - 1 - k)]
        ds.PixelData = np.roll(pixels, k, axis=1).tobytes()
        if "WindowCenter" not in ds:
            ds.WindowCenter, ds.WindowWidth = 40, 400
        slices.append(ds)
    return slices


def legacy_enhanced(slices: Sequence[Dataset], series_number: int = 9) -> Dataset:
    """The slices as one Legacy Converted Enhanced CT or MR image (highdicom's converter keeps their order: frame
    k + 1 is slice k), with file meta."""
    convert = {"CT": hd.legacy.LegacyConvertedEnhancedCTImage,
               "MR": hd.legacy.LegacyConvertedEnhancedMRImage}[slices[0].Modality]
    uid = str(slices[0].SeriesInstanceUID)
    enhanced = convert(list(slices), series_instance_uid=generate_uid(entropy_srcs=[uid, "enhanced"]),
                       series_number=series_number, sop_instance_uid=generate_uid(entropy_srcs=[uid, "frames"]),
                       instance_number=1)
    enhanced.SeriesDescription = f"enhanced {slices[0].Modality}"
    return enhanced


def write_source(spool: Path, relative: str, ds: Dataset) -> None:
    path = spool / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def manifest_for(spool: Path, relatives: Sequence[str], episode_id: int = 7) -> StudyManifest:
    """A StudyManifest of the files (one study) as the prepare task would write it."""
    datasets = [(relative, pydicom.dcmread(spool / relative, stop_before_pixels=True)) for relative in relatives]
    first = datasets[0][1]
    series: dict[str, list[tuple[str, Dataset]]] = {}
    for relative, ds in datasets:
        series.setdefault(ds.SeriesInstanceUID, []).append((relative, ds))
    entries = []
    for series_uid, members in series.items():
        head = members[0][1]
        number = head.get("SeriesNumber")
        entries.append(SeriesEntry(
            series_instance_uid=series_uid,
            modality=head.Modality,
            series_number=int(number) if number not in (None, "") else None,
            series_description=head.get("SeriesDescription") or "",
            body_part_examined=head.get("BodyPartExamined", ""),
            instances=[InstanceEntry(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, path=relative,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, rows=ds.get("Rows"), columns=ds.get("Columns"),
                view_position=ds.get("ViewPosition") or None, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
            ) for relative, ds in members],
        ))
    return StudyManifest(
        study_instance_uid=first.StudyInstanceUID, episode_id=episode_id, created_at=CREATED_AT,
        study=StudyInfo(patient_name=str(first.PatientName), patient_id=first.PatientID,
                        accession_number=first.get("AccessionNumber", ""), study_date=first.get("StudyDate", ""),
                        study_description=first.get("StudyDescription", ""),
                        institution_name=first.get("InstitutionName", "")),
        series=entries,
    )


def load(spool: Path, manifest: StudyManifest) -> list[Dataset]:
    return [pydicom.dcmread(spool / instance.path) for _, instance in manifest.instances()]


def cr_study(root: Path, episode_id: int = 7) -> Study:
    """Two-view chest CR study (PA with findings, lateral without) in ``root/spool``."""
    spool = root / "spool"
    study_uid = "1.2.826.0.1.3680043.8.498.424242"
    series_uid = f"{study_uid}.1"
    write_source(spool, "cr/pa.dcm", make_cr(study_uid, series_uid, 1, "PA"))
    write_source(spool, "cr/ll.dcm", make_cr(study_uid, series_uid, 2, "LL"))
    manifest = manifest_for(spool, ["cr/pa.dcm", "cr/ll.dcm"], episode_id)
    return Study(spool, manifest, load(spool, manifest))


def multiframe_study(root: Path, episode_id: int = 5) -> Study:
    """One legacy Multi-frame Grayscale Word SC image (3 frames, no functional groups) in ``root/spool``."""
    spool = root / "spool"
    study_uid = "1.2.826.0.1.3680043.8.498.515151"
    write_source(spool, "mf/cine.dcm", make_multiframe_sc(study_uid, f"{study_uid}.1"))
    manifest = manifest_for(spool, ["mf/cine.dcm"], episode_id)
    return Study(spool, manifest, load(spool, manifest))


def enhanced_study(root: Path, name: str = "CT_small.dcm", frames: int = 12, episode_id: int = 4) -> Study:
    """One legacy-converted enhanced CT (or MR) of *frames* frames from pydicom's *name* in ``root/spool``."""
    spool = root / "spool"
    write_source(spool, "enhanced/frames.dcm", legacy_enhanced(classic_slices(name, frames)))
    manifest = manifest_for(spool, ["enhanced/frames.dcm"], episode_id)
    return Study(spool, manifest, load(spool, manifest))


def shipped_study(root: Path, name: str, episode_id: int = 3) -> Study:
    """One of pydicom's shipped test files (CT_small.dcm, MR_small.dcm) copied into ``root/spool``."""
    spool = root / "spool"
    (spool / "in").mkdir(parents=True, exist_ok=True)
    shutil.copy(PYDICOM_TEST_FILES / name, spool / "in" / name)
    manifest = manifest_for(spool, [f"in/{name}"], episode_id)
    return Study(spool, manifest, load(spool, manifest))


def result_for(study: Study, findings: list[Finding], analysed: list[str] | None = None) -> AnalysisResult:
    return AnalysisResult(
        study_instance_uid=study.manifest.study_instance_uid, episode_id=study.manifest.episode_id, model=MODEL,
        report=REPORT, findings=findings,
        analysed_instances=analysed if analysed is not None else [i.sop_instance_uid for _, i in
                                                                   study.manifest.instances()],
        created_at=CREATED_AT,
    )


def grounded_result(study: Study, report: DraftReport, findings: list[Finding]) -> AnalysisResult:
    """A result of *report* and *findings* linked by model.grounding.link, as the analysis writes it (issue 19)."""
    linked_report, linked, consistency = link(report, findings)
    return AnalysisResult(
        study_instance_uid=study.manifest.study_instance_uid, episode_id=study.manifest.episode_id, model=MODEL,
        report=linked_report, findings=linked, consistency=consistency,
        analysed_instances=[i.sop_instance_uid for _, i in study.manifest.instances()], created_at=CREATED_AT,
    )


def cr_findings(study: Study) -> list[Finding]:
    pa = study.manifest.series[0].instances[0].sop_instance_uid
    return [
        Finding(label="Pneumothorax", sop_instance_uid=pa, box=(410.0, 60.0, 590.0, 300.0), laterality="left"),
        Finding(label="nodule", sop_instance_uid=pa, box=(100.0, 200.0, 200.0, 300.0), laterality="right",
                site="right upper lung"),
        Finding(label="Kerley B lines", sop_instance_uid=pa, box=(20.5, 600.25, 180.0, 790.0)),
    ]


# --- reading an SR back ---------------------------------------------------------------------------------------

def walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    """Every content item of an SR content sequence, depth first."""
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def _frames_of(item: Dataset) -> list[int] | None:
    """The ReferencedFrameNumber of an IMAGE content item, None when it references the whole image."""
    value = item.ReferencedSOPSequence[0].get("ReferencedFrameNumber")
    if value is None:
        return None
    return [int(f) for f in (value if isinstance(value, list | MultiValue) else [value])]


def _named(sr: Dataset, meaning: str) -> list[Dataset]:
    return [item for item in walk(sr.ContentSequence) if item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def library_frames(sr: Dataset) -> dict[str, list[int] | None]:
    """SOP Instance UID -> frames of every image in the SR's TID 1600 Image Library."""
    [library] = _named(sr, "Image Library")
    return {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: _frames_of(item)
            for item in walk(library.ContentSequence) if item.ValueType == "IMAGE"}


def scoord_frames(sr: Dataset) -> list[list[int] | None]:
    """The frames each SCOORD of the SR is drawn on."""
    return [_frames_of(child) for item in walk(sr.ContentSequence) if item.ValueType == "SCOORD"
            for child in item.ContentSequence if child.ValueType == "IMAGE"]


def analysed_series_comments(sr: Dataset) -> list[str]:
    """The "Analysed series …" comments of the SR's qualitative evaluations (not the grounding's comments)."""
    [evaluations] = _named(sr, "Qualitative Evaluations")
    return [item.TextValue for item in evaluations.ContentSequence
            if item.ValueType == "TEXT" and item.TextValue.startswith("Analysed series")]


# --- validators ---------------------------------------------------------------------------------------------

def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's Error lines (it exits 0 even with errors); warnings are returned by ``dciodvfy_warnings``."""
    return [line for line in _dciodvfy(path) if line.startswith("Error")]


def dciodvfy_warnings(path: Path) -> list[str]:
    return [line for line in _dciodvfy(path) if line.startswith("Warning")]


def new_dciodvfy_warnings(path: Path, study: Study) -> list[str]:
    """Warnings of an output that its source files do not have themselves.

    highdicom copies the patient/study modules from the evidence, so a source's dubious value (pydicom's
    CT_small.dcm has Patient's Weight 0, MR_small.dcm "----" person names; our CR and both have an empty
    Laterality) reappears in the output as the same warning: that is source data, not our encoding.
    """
    inherited = {w for _, instance in study.manifest.instances() for w in dciodvfy_warnings(study.spool /
                                                                                            instance.path)}
    return [w for w in dciodvfy_warnings(path) if w not in inherited]


def _dciodvfy(path: Path) -> list[str]:
    done = subprocess.run(["/usr/bin/dciodvfy", "-new", str(path)], check=False, capture_output=True, text=True,
                          timeout=60)
    return (done.stdout + done.stderr).splitlines()


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dsrdump", str(path)], check=False, capture_output=True, text=True, timeout=60)


PIXELMED_MANY = Path(__file__).parent / "reporting_dicom_java" / "PixelmedSRValidateMany.java"


def pixelmed_sr_validate(paths: Sequence[Path]) -> dict[Path, str]:
    """PixelMed DicomSRValidator's report per file, all files in one JVM (the validator's set-up is slow)."""
    done = subprocess.run(
        ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0",
         "-cp", "/usr/share/java/pixelmed.jar", str(PIXELMED_MANY), *map(str, paths)],
        check=False, capture_output=True, text=True, timeout=180,
    )
    if done.returncode != 0:
        raise RuntimeError(f"PixelMed validator failed ({done.returncode}): {done.stderr[-2000:]}")
    reports: dict[Path, str] = {}
    current: Path | None = None
    for line in done.stdout.splitlines():
        if line.startswith("== "):
            current = Path(line[3:])
            reports[current] = ""
        elif current is not None:
            reports[current] += line + "\n"
    return reports
