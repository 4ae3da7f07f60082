"""Checked inputs of the DICOM outputs: the manifest, the model result and the source datasets, cross-validated.

Every builder (sr, narrative, gsps, overlay, findings.json) takes a ``ReportInputs``, made once per output set by
:meth:`ReportInputs.check`: it refuses a result that does not belong to the manifest, a finding whose image was not
passed in, or a box outside its image, with a message naming the finding and the rule, before anything is built.
The checked value is immutable (its sources a read-only mapping, its located findings a tuple), so a builder can
trust it without checking again.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from pydicom.dataset import Dataset
from pydicom.uid import UID

from core.manifest import InstanceEntry, SeriesEntry, StudyManifest
from core.result import AnalysisResult, Finding
from reporting.uids import OutputKind, output_uid


def tracking_uid(result: AnalysisResult, index: int) -> UID:
    """The tracking UID of finding *index*: the one the same lesion had in the study's previous report when it
    was matched (reporting/lineage.py), else this episode's own deterministic UID."""
    carried = result.findings[index].tracking_uid
    if carried:
        return UID(carried)
    return output_uid(result.study_instance_uid, result.episode_id, result.model.version, OutputKind.FINDING, index)


def document_reference(sop_class_uid: str, sop_instance_uid: str, study_uid: str, series_uid: str) -> Dataset:
    """Just enough of a document to list it in Predecessor Documents Sequence."""
    reference = Dataset()
    reference.SOPClassUID = sop_class_uid
    reference.SOPInstanceUID = sop_instance_uid
    reference.StudyInstanceUID = study_uid
    reference.SeriesInstanceUID = series_uid
    return reference


def previous_versions(result: AnalysisResult, signoff: Signoff | None, kind: OutputKind, sop_class_uid: str,
                      series_uid: str) -> list[Dataset]:
    """What a document of *kind* (``OutputKind.SR`` or ``NARRATIVE``) of this version replaces: a signed one the
    version before it (the draft for the first signature, the previous signed version for an amendment), every
    version the previous episode's documents (reporting/lineage.py)."""
    references = []
    if signoff is not None:
        previous = {OutputKind.SR: signoff.previous_sr_uid,
                    OutputKind.NARRATIVE: signoff.previous_narrative_uid}[kind] if signoff.version > 1 else ""
        uid = previous or output_uid(result.study_instance_uid, result.episode_id, result.model.version, kind)
        references.append(document_reference(sop_class_uid, uid, result.study_instance_uid, series_uid))
    return references + superseded_documents(result, kind.value)


def superseded_documents(result: AnalysisResult, kind: str) -> list[Dataset]:
    """The previous episode's documents of *kind* ("sr", "narrative") that this episode's version replaces, as
    the references Predecessor Documents Sequence lists (reporting/lineage.py)."""
    references = []
    for document in result.supersedes:
        if document.kind != kind:
            continue
        reference = Dataset()
        reference.SOPClassUID = document.sop_class_uid
        reference.SOPInstanceUID = document.sop_instance_uid
        reference.StudyInstanceUID = document.study_instance_uid
        reference.SeriesInstanceUID = document.series_instance_uid
        references.append(reference)
    return references


@dataclass(frozen=True)
class Signoff:
    """A radiologist's signature: turns a draft into the final, verified variant of a document."""

    verifying_observer_name: str  # DICOM person name, e.g. "Curie^Marie"
    verifying_organization: str
    signed_at: datetime.datetime
    version: int = 1  # the signed version: 1 the first signature, n > 1 amendment n (reporting/uids.py)
    # an amendment's predecessors: the SR and narrative SOP Instance UIDs of the signed version it replaces (empty:
    # the draft, as for the first signature)
    previous_sr_uid: str = ""
    previous_narrative_uid: str = ""

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"Signoff.version {self.version} must be >= 1 (1 the first signature, n amendment n)")
        if not self.verifying_observer_name.strip():
            raise ValueError("Signoff.verifying_observer_name must not be empty for a verified document")
        if not self.verifying_organization.strip():
            raise ValueError("Signoff.verifying_organization must not be empty for a verified document")


@dataclass(frozen=True)
class LocatedFinding:
    """A finding with its position in the result and the source image it was drawn on."""

    index: int  # position in AnalysisResult.findings: stable across retries
    finding: Finding
    image: Dataset
    series: SeriesEntry

    @property
    def frame_number(self) -> int | None:
        return self.finding.frame_number


@dataclass(frozen=True)
class AnalysedImage:
    """An image the model read: its manifest entry, its source dataset and, of a multi-frame image, the 1-based
    frames read (empty for a single-frame image, and for a result written before frames were recorded)."""

    instance: InstanceEntry
    image: Dataset
    frames: tuple[int, ...] = ()


_CHECKED = object()  # only ReportInputs.check holds it: a ReportInputs is always a checked one


@dataclass(frozen=True)
class ReportInputs:
    """The manifest, the result and the sources of one output set, cross-validated by :meth:`check` (the only way
    to make one): every finding located on its source image, every box inside it."""

    manifest: StudyManifest
    result: AnalysisResult
    sources: Mapping[str, Dataset]  # SOP Instance UID -> dataset (pixel data needed only for GSPS/overlay)
    findings: tuple[LocatedFinding, ...] = ()  # the result's findings, located, in result order
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _CHECKED:
            raise TypeError("a ReportInputs is made by ReportInputs.check(manifest, result, sources)")

    @classmethod
    def check(cls, manifest: StudyManifest, result: AnalysisResult, sources: Sequence[Dataset]) -> ReportInputs:
        """Cross-validate the three inputs; raise ``ValueError`` naming the first broken rule."""
        if result.study_instance_uid != manifest.study_instance_uid:
            raise ValueError(f"AnalysisResult.study_instance_uid {result.study_instance_uid} must equal the "
                             f"manifest's {manifest.study_instance_uid}")
        if result.episode_id != manifest.episode_id:
            raise ValueError(f"AnalysisResult.episode_id {result.episode_id} must equal the manifest's "
                             f"{manifest.episode_id}")
        if not sources:
            raise ValueError("sources must hold at least one source dataset (the SR evidence)")
        by_uid: dict[str, Dataset] = {}
        for dataset in sources:
            uid = str(dataset.get("SOPInstanceUID", ""))
            if dataset.get("StudyInstanceUID") != manifest.study_instance_uid:
                raise ValueError(f"source SOP Instance UID {uid or '(missing)'}: StudyInstanceUID "
                                 f"{dataset.get('StudyInstanceUID')} must equal the manifest's "
                                 f"{manifest.study_instance_uid}")
            if uid in by_uid:
                raise ValueError(f"source SOP Instance UID {uid} was passed twice")
            by_uid[uid] = dataset
        frozen = MappingProxyType(by_uid)
        for uid in result.analysed_instances:
            _source(manifest, frozen, uid, "AnalysisResult.analysed_instances")
        located = []
        for index, finding in enumerate(result.findings):
            series, image = _source(manifest, frozen, finding.sop_instance_uid,
                                    f"finding {index} ({finding.label!r})")
            located.append(LocatedFinding(index=index, finding=finding, image=image, series=series))
        for each in located:
            _check_box(each)
        return cls(manifest=manifest, result=result, sources=frozen, findings=tuple(located), _token=_CHECKED)

    def located_findings(self) -> list[LocatedFinding]:
        """The result's findings, each with its source image and series (located once, by :meth:`check`)."""
        return list(self.findings)

    def evidence(self) -> list[Dataset]:
        """Every source instance, in manifest order (the first one lends the SR its patient/study module)."""
        order = {instance.sop_instance_uid: n for n, (_, instance) in enumerate(self.manifest.instances())}
        return sorted(self.sources.values(), key=lambda ds: order.get(str(ds.SOPInstanceUID), len(order)))

    def primary_series(self) -> SeriesEntry:
        """The series the model looked at (of the first finding, else the first analysed image)."""
        uids = [f.sop_instance_uid for f in self.result.findings] + list(self.result.analysed_instances)
        if uids:
            return self.manifest.find_instance(uids[0])[0]
        if not self.manifest.series:
            raise ValueError(f"manifest of study {self.manifest.study_instance_uid} has no series")
        return self.manifest.series[0]

    def analysed_images(self) -> list[tuple[SeriesEntry, list[AnalysedImage]]]:
        """The images the model read (AnalysisResult.analysed_instances, and any image a finding is on), each with
        the frames read of a multi-frame image, per series; series and images in manifest order."""
        uids = list(dict.fromkeys([*self.result.analysed_instances,
                                   *(f.sop_instance_uid for f in self.result.findings)]))
        found: dict[str, tuple[SeriesEntry, InstanceEntry]] = {}
        for uid in uids:
            found[uid] = self.manifest.find_instance(uid)
        groups: list[tuple[SeriesEntry, list[AnalysedImage]]] = []
        for series in self.manifest.series:
            members = [AnalysedImage(instance, self.sources[instance.sop_instance_uid],
                                     tuple(self._frames_read(instance)))
                       for instance in series.instances if instance.sop_instance_uid in found]
            if members:
                groups.append((series, members))
        return groups

    def _frames_read(self, instance: InstanceEntry) -> list[int]:
        uid = instance.sop_instance_uid
        frames = set(self.result.analysed_frames.get(uid, []))
        frames.update(f.frame_number for f in self.result.findings
                      if f.sop_instance_uid == uid and f.frame_number is not None)
        return sorted(frames)

    def annotated_images(self) -> list[tuple[Dataset, list[LocatedFinding]]]:
        """Each image that has findings, with its findings, in the order the images first appear."""
        groups: dict[str, list[LocatedFinding]] = {}
        for located in self.located_findings():
            groups.setdefault(located.finding.sop_instance_uid, []).append(located)
        return [(self.sources[uid], findings) for uid, findings in groups.items()]


def _source(manifest: StudyManifest, sources: Mapping[str, Dataset], uid: str, what: str
            ) -> tuple[SeriesEntry, Dataset]:
    try:
        series, _ = manifest.find_instance(uid)
    except KeyError as error:
        raise ValueError(f"{what}: SOP Instance UID {uid} is not in the study manifest") from error
    if uid not in sources:
        raise ValueError(f"{what}: SOP Instance UID {uid} has no source dataset; pass every referenced "
                         f"instance in sources")
    return series, sources[uid]


def _check_box(located: LocatedFinding) -> None:
    image, finding = located.image, located.finding
    what = f"finding {located.index} ({finding.label!r}) on SOP Instance UID {finding.sop_instance_uid}"
    if "Rows" not in image or "Columns" not in image:
        raise ValueError(f"{what}: the source dataset has no Rows/Columns: it is not an image a box can be on")
    x1, y1, x2, y2 = finding.box
    if not (0 <= x1 < x2 <= image.Columns and 0 <= y1 < y2 <= image.Rows):
        raise ValueError(f"{what}: box {finding.box} must lie within the image, 0 <= x1 < x2 <= Columns "
                         f"({image.Columns}) and 0 <= y1 < y2 <= Rows ({image.Rows})")
    frames = int(image.get("NumberOfFrames", 1) or 1)
    if frames > 1 and finding.frame_number is None:
        raise ValueError(f"{what}: frame_number is required on a multi-frame image ({frames} frames)")
    if finding.frame_number is not None and finding.frame_number > frames:
        raise ValueError(f"{what}: frame_number {finding.frame_number} must be <= NumberOfFrames ({frames})")


def box_polyline(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """A box as a closed polyline of 5 (column, row) points, clockwise from the top-left, first = last."""
    x1, y1, x2, y2 = box
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
