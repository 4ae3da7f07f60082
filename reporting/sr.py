"""The AI findings as a Comprehensive 3D SR, TID 1500 Measurement Report, following IHE AI Results.

One TID 1410 Planar ROI group per finding: tracking identifier (the model's label as text) + tracking UID,
the coded finding type, finding site and laterality when known, the box as a closed POLYLINE SCOORD on the
source image, and the algorithm (TID 4019). The observer is the algorithm (DEVICE). A study where the model
localized nothing gets one TID 1501 group saying so (TID 1500 needs at least one group): coded "No abnormality"
only when the report text states a normal study, otherwise with no finding type, so that the SR never
contradicts a narrative that states an unlocalized finding (see :func:`_no_finding_group`).

Draft: COMPLETE / UNVERIFIED / PRELIMINARY. Final (after a radiologist signs): VERIFIED / FINAL, with the
verifying observer and organization, and the draft referenced as its predecessor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DT

from model.result import AnalysisResult, ModelIdentity
from reporting import codes as rcodes
from reporting.context import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    LocatedFinding,
    ReportInputs,
    Signoff,
    box_polyline,
    software_version,
    superseded_documents,
    tracking_uid,
)
from reporting.uids import OutputKind, device_uid, output_uid
from workers.manifest import StudyManifest

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
DRAFT_INSTANCE_NUMBER = 1
FINAL_INSTANCE_NUMBER = 2


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
    """The TID 1500 content tree of the findings."""
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                     | hd.sr.MeasurementsAndQualitativeEvaluations]
    groups = [_finding_group(located, inputs.result) for located in inputs.located_findings()]
    if not groups:
        groups = [_no_finding_group(inputs)]
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer_context(
            inputs.result.model)),
        procedure_reported=procedure_reported(inputs),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )


def build_findings_sr(
    manifest: StudyManifest,
    result: AnalysisResult,
    sources: Sequence[Dataset],
    signoff: Signoff | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The findings SR: the preliminary draft, or with ``signoff`` the verified final version."""
    inputs = ReportInputs.check(manifest, result, sources)
    final = signoff is not None
    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    draft_uid = output_uid(*uid_args, OutputKind.SR_DRAFT)
    series_uid = output_uid(*uid_args, OutputKind.SR_SERIES)
    created = result.created_at
    content_at = signoff.signed_at if signoff is not None else created
    sr = hd.sr.Comprehensive3DSR(
        evidence=inputs.evidence(),
        content=build_measurement_report(inputs),
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=output_uid(*uid_args, OutputKind.SR_FINAL) if final else draft_uid,
        instance_number=FINAL_INSTANCE_NUMBER if final else DRAFT_INSTANCE_NUMBER,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=final,
        is_verified=final,
        institution_name=manifest.study.institution_name or None,
        verifying_observer_name=signoff.verifying_observer_name if signoff else None,
        verifying_organization=signoff.verifying_organization if signoff else None,
        previous_versions=([_draft_reference(inputs, draft_uid, series_uid)] if final else [])
        + superseded_documents(result, "sr") or None,
        contributing_equipment=[processing_equipment(result.model)],
        series_description="AI findings (signed)" if final else "AI findings (preliminary)",
        manufacturer_model_name=result.model.name,
        software_versions=software_version(),
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_date=content_at.date(),
        content_time=content_at.time(),
        series_date=created.date(),
        series_time=created.time(),
    )
    if signoff is not None:  # highdicom stamps "now"; the signature time makes a rebuilt final identical
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(signoff.signed_at)
    logger.info("built %s findings SR with %d finding(s) for episode %d", "final" if final else "draft",
                len(result.findings), result.episode_id)
    return sr


def _draft_reference(inputs: ReportInputs, draft_uid: str, series_uid: str) -> Dataset:
    """Just enough of the draft to list it in Predecessor Documents Sequence."""
    reference = Dataset()
    reference.SOPClassUID = Comprehensive3DSRStorage
    reference.SOPInstanceUID = draft_uid
    reference.StudyInstanceUID = inputs.manifest.study_instance_uid
    reference.SeriesInstanceUID = series_uid
    return reference
