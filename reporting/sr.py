"""The AI findings as a Comprehensive 3D SR, TID 1500 Measurement Report, following IHE AI Results.

One TID 1410 Planar ROI group per finding: tracking identifier (the model's label as text) + tracking UID,
the coded finding type, finding site and laterality when known, the box as a closed POLYLINE SCOORD on the
source image, and the algorithm (TID 4019). The observer is the algorithm (DEVICE). A study where the model
localized nothing gets one TID 1501 group saying so (TID 1500 needs at least one group): coded "No abnormality"
only when the report text states a normal study, otherwise with no finding type, so that the SR never
contradicts a narrative that states an unlocalized finding (see :func:`_no_finding_group`).

What was analysed. The TID 1600 Image Library lists every image the model read, one Image Library Group per
series (its modality and frame of reference shared), each image with its size and, of a multi-frame image, the
frames read (ReferencedFrameNumber); a TID 1500 Qualitative Evaluations container holds one text per analysed
series naming it (number, description when it has one, modality) and how many of its images or frames were read.
Both are built from the attributes that are there: an empty or absent Type 2/3 attribute (series number,
description, frame of reference) leaves its item out, never the document.

Grounded drafts (issue 19, reporting/consistency.py): the same Qualitative Evaluations container records which
stated findings the AI did not localize (coded, 99RADDRAFT RD001), which boxes the text does not state (RD002,
and "(not stated in the draft text)" in the group's tracking identifier), which sentences state each box, and a
study-level count (:func:`consistency_evaluations`). A result written before grounding, or signed, has none.

How OHIF 3.13 (@ohif/app 3.13.2, checked in its bundled source) reads a group (issue 20; tests/test_ohif_sr.py):

* Before hydration, the SR viewport's DICOMSRDisplay preview (extensions/cornerstone-dicom-sr/src/
  getSopClassHandlerModule.ts, _processTID1410Measurement) labels a box with its NUM items and then the first
  Finding Site (363698007, SCT) only: "363698007: Pleura". Nothing else in a TID 1410 group changes that text.
* The group is rehydratable: @cornerstonejs/adapters registers the RectangleROI adapter for a SCOORD named
  "Image Region" (111030, DCM), POLYLINE, 4 or 5 points, which is our closed box. Hydration (OHIF's "Do you want to
  continue tracking measurements for this study?", or at once with disableConfirmationPrompts) makes each group a
  RectangleROI measurement on the source image: hydrateStructuredReport.ts sets annotation.data.finding from the
  Finding (121071) CODE and findingSites from the Finding Sites; its label (getLabelFromDCMJSImportedToolData)
  comes only from a TEXT "Comment" (121106, DCM) or a CORNERSTONEJS free-text code, so it stays empty and the
  measurement panel (useMeasurements.ts mapMeasurementToDisplay: label || finding.text || firstSite.text) shows
  the coded finding type's meaning ("Pleural effusion"), the sites' meanings below it.
* Laterality (a concept modifier of the Finding Site) is read by neither. A Comment would carry it into OHIF's label,
  but PixelMed's TID 1410 has no such row ("Content Item not in template"), so the SR does not write one.

Draft: COMPLETE / UNVERIFIED / PRELIMINARY. Final (after a radiologist signs): VERIFIED / FINAL, with the
verifying observer and organization, and the draft referenced as its predecessor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DT

from core.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, software_version
from core.manifest import SeriesEntry, StudyManifest
from core.result import AnalysisResult, ModelIdentity
from reporting import codes as rcodes
from reporting.consistency import NOT_LOCALIZED, NOT_STATED, DraftGrounding, draft_grounding, finding_words, is_box_only
from reporting.context import (
    AnalysedImage,
    LocatedFinding,
    ReportInputs,
    Signoff,
    box_polyline,
    previous_versions,
    tracking_uid,
)
from reporting.uids import OutputKind, device_uid, output_uid

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
DRAFT_INSTANCE_NUMBER = 1  # signed version n is instance 1 + n of the series


def algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version and each parameter as ``key=value``."""
    parameters = [f"{key}={value}" for key, value in sorted(model.parameters.items())]
    # No "Algorithm Manufacturer" row: the device observer context names the manufacturer already.
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters or None)


def device_observer_context(model: ModelIdentity) -> hd.sr.ObserverContext:
    """TID 1002 observer of type DEVICE: the algorithm that produced the content."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model.name, model.version),
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}",
        ),
    )


def processing_equipment(model: ModelIdentity) -> hd.ContributingEquipment:
    """Contributing Equipment entry for the AI that made the content (the source scanner is added by highdicom)."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_description="AI analysis: findings and draft report, preliminary until signed",
    )


def procedure_reported(inputs: ReportInputs) -> hd.sr.CodedConcept:
    series = inputs.primary_series()
    return hd.sr.CodedConcept.from_code(rcodes.procedure_code(series.modality))


def _finding_group(
    located: LocatedFinding, result: AnalysisResult
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    finding, image = located.finding, located.image
    coded = rcodes.lookup_finding(finding.label)
    if coded.is_fallback:
        logger.info("finding %d: label %r is not in the code table; coded as generic %s", located.index,
                    coded.text, coded.finding_type.meaning)
    frames = [finding.frame_number] if finding.frame_number is not None else None
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(box_polyline(finding.box), dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
            referenced_frame_numbers=frames,
        ),
    )
    site = rcodes.finding_site(coded, finding.site, located.series.body_part_examined)
    finding_sites = None
    if site is not None:
        laterality = rcodes.LATERALITY_CODES[finding.laterality] if finding.laterality else None
        finding_sites = [hd.sr.FindingSite(anatomic_location=site, laterality=laterality)]
    elif finding.laterality:
        logger.debug("finding %d: laterality %s kept as text only (no finding site to qualify)", located.index,
                     finding.laterality)
    words = " ".join(w for w in (finding.laterality or "", finding.label.strip()) if w)
    if is_box_only(result, located.index):
        words += f" ({NOT_STATED})"
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(result, located.index),
            identifier=f"Finding {located.index + 1}: {words}",
        ),
        referenced_region=region,
        finding_type=coded.finding_type,
        algorithm_id=algorithm_identification(result.model),
        finding_sites=finding_sites,
    )


# The private scheme of the consistency codes (reporting/codes.py RD001, RD002), registered in the SR that uses them.
def raddraft_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item of 99RADDRAFT (a new one per document)."""
    return CodingSchemeIdentificationItem(designator=rcodes.RADDRAFT_SCHEME, name=rcodes.RADDRAFT_SCHEME_NAME,
                                          responsible_organization=MANUFACTURER)

NO_FINDING_IDENTIFIER = "No localized finding"
NOT_LOCALIZED_IDENTIFIER = "No localized finding: the AI drew no box; the report text is in the narrative report"


def _no_finding_group(inputs: ReportInputs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one TID 1501 group of a study where the model drew no box, on the analysed images.

    * The report states a normal study (:func:`reporting.codes.report_states_normal`): finding type
      "No abnormality" (111286, DCM), tracking identifier :data:`NO_FINDING_IDENTIFIER`.
    * Otherwise (the report states a finding the model did not localize, or says nothing either way): no finding
      type (TID 1501 row 3b is optional, and every code would be a claim: "No abnormality" denies what the
      narrative states, the generic "Finding" asserts one with nothing behind it); the tracking identifier
      :data:`NOT_LOCALIZED_IDENTIFIER` says that the AI localized nothing and where its words are.
    """
    result = inputs.result
    analysed = [inputs.sources[uid] for uid in result.analysed_instances] or inputs.evidence()
    normal = rcodes.report_states_normal(result.report)
    logger.info("episode %d: no box; the report text %s, so the SR group %s", result.episode_id,
                "states a normal study" if normal else "does not state a normal study",
                "says no abnormality" if normal else "says only that the AI localized nothing")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=output_uid(result.study_instance_uid, result.episode_id, result.model.version,
                           OutputKind.FINDING, 0),
            identifier=NO_FINDING_IDENTIFIER if normal else NOT_LOCALIZED_IDENTIFIER,
        ),
        algorithm_id=algorithm_identification(result.model),
        finding_type=rcodes.NO_ABNORMALITY if normal else None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in analysed
                       if "Rows" in image],
    )


def build_measurement_report(inputs: ReportInputs) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of the findings, with the image library and the analysed series."""
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                     | hd.sr.MeasurementsAndQualitativeEvaluations]
    groups = [_finding_group(located, inputs.result) for located in inputs.located_findings()]
    if not groups:
        groups = [_no_finding_group(inputs)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer_context(
            inputs.result.model)),
        procedure_reported=procedure_reported(inputs),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    analysed = inputs.analysed_images()
    content = report[0].ContentSequence
    evaluations: hd.sr.ContainerContentItem | None = None
    if analysed:
        measurements = next(n for n, item in enumerate(content)
                            if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value)
        content.insert(measurements, image_library(analysed))  # TID 1500 row 5, before row 6
        evaluations = analysed_series_texts(inputs.manifest, analysed)  # row 12
    grounding = draft_grounding(inputs.result)
    if grounding is not None:
        if evaluations is None:
            evaluations = _qualitative_evaluations()
        evaluations.ContentSequence.extend(consistency_evaluations(grounding))
    if evaluations is not None:
        content.append(evaluations)
    return report


_PIXELS = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
_SOURCE = hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT")  # as highdicom's library
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(value="C0034375", meaning="Qualitative Evaluations",
                                             scheme_designator="UMLS")
_ACQUISITION_MODALITIES = {code.value: code for code in (getattr(codes.cid29, name) for name in codes.cid29.dir())}


def image_library(analysed: Sequence[tuple[SeriesEntry, Sequence[AnalysedImage]]]) -> hd.sr.ContainerContentItem:
    """TID 1600: an Image Library Group (TID 1602 shared descriptors: modality, frame of reference) per analysed
    series, with a TID 1601 entry per analysed image (its frames read, its rows and columns).

    highdicom's own library (``MeasurementReport(referenced_images=...)``) needs Type 2/3 attributes that real
    images leave empty or lack (Patient Orientation, Imager Pixel Spacing, Slice Thickness) and the geometry of a
    single-frame image at the top level, so it is built here from the items that the image has."""
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    for series, members in analysed:
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence()
        modality = _ACQUISITION_MODALITIES.get(series.modality.upper())
        if modality is not None:
            group.ContentSequence.append(hd.sr.CodeContentItem(
                name=codes.DCM.Modality, value=modality,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT))
        frames_of_reference = {str(m.image.get("FrameOfReferenceUID") or "") for m in members}
        if len(frames_of_reference) == 1 and (uid := frames_of_reference.pop()):
            group.ContentSequence.append(hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID, value=uid,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT))
        for member in members:
            group.ContentSequence.append(_library_entry(member))
        library.ContentSequence.append(group)
    return library


def _library_entry(member: AnalysedImage) -> hd.sr.ImageContentItem:
    image = member.image
    entry = hd.sr.ImageContentItem(
        name=_SOURCE, referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID,
        referenced_frame_numbers=list(member.frames) or None,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    entry.ContentSequence = hd.sr.ContentSequence()
    for name, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        value = image.get(keyword)
        if value:
            entry.ContentSequence.append(hd.sr.NumContentItem(
                name=name, value=int(value), unit=_PIXELS,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT))
    return entry


def analysed_series_texts(manifest: StudyManifest, analysed: Sequence[tuple[SeriesEntry, Sequence[AnalysedImage]]]
                          ) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: Qualitative Evaluations holding one Comment per analysed series
    (:func:`analysed_series_text`)."""
    container = _qualitative_evaluations()
    for series, members in analysed:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=analysed_series_text(series, members),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return container


def _qualitative_evaluations() -> hd.sr.ContainerContentItem:
    """An empty TID 1500 row 12 Qualitative Evaluations container."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence()
    return container


def _coded_evaluation(name: Code, label: str | None) -> hd.sr.CodeContentItem:
    """TID 1500 row 13: *name* = the finding type of *label* (generic "Finding" without one). The side is in the
    Comment that follows: row 13b's concept modifiers (CID 210) are not in PixelMed's context groups."""
    finding_type = rcodes.lookup_finding(label).finding_type if label else rcodes.GENERIC_FINDING
    return hd.sr.CodeContentItem(name=name, value=finding_type, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=codes.DCM.Comment, value=text,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def consistency_evaluations(grounding: DraftGrounding) -> list[hd.sr.ContentItem]:
    """The grounding of the draft as TID 1500 qualitative evaluations (rows 13 and 14), after the analysed series.

    PixelMed's TID 1410 (the edition its validator holds) has no qualitative-evaluation rows, so a finding's
    consistency is not written into its measurement group; each evaluation names the group by its tracking
    identifier ("Finding 2") instead, and the group of a box-only finding says "(not stated in the draft text)"
    in its tracking identifier. In order:

    * per text-only sentence, per label it states: CODE "Stated finding not localized by the AI" (RD001,
      99RADDRAFT) = the label's finding type; then a Comment quoting the sentence;
    * per grounded finding: a Comment naming it and quoting the sentences that state it;
    * per box-only finding: CODE "Localized finding not stated in the draft text" (RD002, 99RADDRAFT) = its
      finding type; then a Comment naming it (its label and side);
    * the study-level Comment "AI consistency: N of M stated findings localized; K boxes not stated in the text".
    """
    result = grounding.result
    items: list[hd.sr.ContentItem] = []
    for _, sentence in grounding.text_only_sentences():
        for label in sentence.labels or [None]:
            items.append(_coded_evaluation(rcodes.NOT_LOCALIZED_FINDING, label))
        items.append(_comment(f'Stated in the draft text, {NOT_LOCALIZED}: "{sentence.text}"'))
    for index, finding in enumerate(result.findings):
        if finding.status == "grounded":
            quoted = " ".join(f'"{result.report.sentences[n].text}"' for n in finding.sentences)
            items.append(_comment(f"Finding {index + 1}, {finding_words(finding)}, is stated in the draft text: "
                                  f"{quoted}"))
    for index, finding in grounding.box_only_findings():
        items.append(_coded_evaluation(rcodes.NOT_STATED_FINDING, finding.label))
        items.append(_comment(f"Finding {index + 1}, {finding_words(finding)}: localized by the AI, {NOT_STATED}"))
    items.append(_comment(grounding.summary()))
    return items


def analysed_series_text(series: SeriesEntry, members: Sequence[AnalysedImage]) -> str:
    """E.g. ``Analysed series 3 "AX T2" (MR): 8 of 40 frames of 1 multi-frame image read`` or
    ``Analysed series 1 (CR): 2 of 2 images read``; no number, description or modality: that part is left out."""
    name = "Analysed series" + (f" {series.series_number}" if series.series_number is not None else "")
    if series.series_description:
        name += f' "{series.series_description}"'
    if series.modality:
        name += f" ({series.modality})"
    images = [instance for instance in series.instances if instance.has_pixels]
    multiframe = [m for m in members if m.instance.is_multiframe]
    single = [m for m in members if not m.instance.is_multiframe]
    parts = []
    if single:
        total = sum(1 for instance in images if not instance.is_multiframe)
        parts.append(f"{len(single)} of {total} image{'s' if total != 1 else ''}")
    if multiframe:
        read = sum(len(m.frames) or 1 for m in multiframe)
        total = sum(m.instance.number_of_frames for m in multiframe)
        parts.append(f"{read} of {total} frames of {len(multiframe)} multi-frame image"
                     f"{'s' if len(multiframe) != 1 else ''}")
    return f"{name}: {' and '.join(parts)} read"


def build_findings_sr(inputs: ReportInputs, signoff: Signoff | None = None) -> hd.sr.Comprehensive3DSR:
    """The findings SR: the preliminary draft, or with ``signoff`` the verified version ``signoff.version``."""
    manifest, result = inputs.manifest, inputs.result
    final = signoff is not None
    version = signoff.version if signoff is not None else 0
    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    series_uid = output_uid(*uid_args, OutputKind.SR_SERIES)
    created = result.created_at
    content_at = signoff.signed_at if signoff is not None else created
    sr = hd.sr.Comprehensive3DSR(
        evidence=inputs.evidence(),
        content=build_measurement_report(inputs),
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=output_uid(*uid_args, OutputKind.SR, version=version),
        instance_number=DRAFT_INSTANCE_NUMBER + version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=final,
        is_verified=final,
        institution_name=manifest.study.institution_name or None,
        verifying_observer_name=signoff.verifying_observer_name if signoff else None,
        verifying_organization=signoff.verifying_organization if signoff else None,
        previous_versions=previous_versions(result, signoff, OutputKind.SR, Comprehensive3DSRStorage,
                                            series_uid) or None,
        contributing_equipment=[processing_equipment(result.model)],
        series_description="AI findings (signed)" if final else "AI findings (preliminary)",
        manufacturer_model_name=result.model.name,
        software_versions=software_version(),
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_date=content_at.date(),
        content_time=content_at.time(),
        series_date=created.date(),
        series_time=created.time(),
        # the private scheme only where its codes are used: text-only statements (RD001), box-only findings (RD002)
        coding_schemes=[raddraft_coding_scheme()] if (grounding := draft_grounding(result)) is not None
        and grounding.flagged else None,
    )
    if signoff is not None:  # highdicom stamps "now"; the signature time makes a rebuilt final identical
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(signoff.signed_at)
    logger.info("built %s findings SR with %d finding(s) for episode %d", "final" if final else "draft",
                len(result.findings), result.episode_id)
    return sr

