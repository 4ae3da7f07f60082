"""The narrative draft report (FINDINGS, IMPRESSION) as its own SR document: Enhanced SR, TID 2000.

TID 1500 takes no free text, so the model's prose goes into a Basic Diagnostic Imaging Report: a
"Diagnostic Imaging Report" container whose observer is the algorithm (DEVICE), with a "Findings" section
holding a "Finding" TEXT item and an "Impressions" section holding an "Impression" TEXT item; a grounded
draft marks what the AI did not localize and lists what it localized but the text does not state
(:func:`section_texts`). Same study as the images, its own series; the same flag rules as the findings SR
(draft PRELIMINARY/UNVERIFIED, final FINAL/VERIFIED with the draft as predecessor).
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.uid import EnhancedSRStorage
from pydicom.valuerep import DT

from core.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, software_version
from core.result import AnalysisResult, DraftReport
from reporting import codes as rcodes
from reporting.consistency import draft_grounding
from reporting.context import ReportInputs, Signoff, previous_versions
from reporting.sr import device_observer_context, processing_equipment
from reporting.uids import OutputKind, output_uid

logger = logging.getLogger(__name__)

NARRATIVE_SERIES_NUMBER = 9902
DRAFT_INSTANCE_NUMBER = 1  # signed version n is instance 1 + n of the series

_LANGUAGE = hd.sr.CodedConcept(value="en-US", scheme_designator="RFC5646", meaning="English (United States)")


def _section(heading: hd.sr.CodedConcept, item_name: hd.sr.CodedConcept, *texts: str) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(name=heading, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    section.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=item_name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in texts
    ])
    return section


def section_texts(report: DraftReport, result: AnalysisResult) -> tuple[list[str], list[str]]:
    """The "Finding" texts of the Findings section and the "Impression" texts of the Impressions section.

    A grounded preliminary draft (reporting/consistency.py) has " [not localized by the AI]" after each sentence
    no box supports; when anything is not grounded the Findings section also holds one "Localized by the AI, not
    stated in the draft text: <label> (<side>)" per box-only finding and the study-level "AI consistency: ..."
    line, each a Finding of its own. Any other result: the report's two texts, as they are."""
    grounding = draft_grounding(result) if report == result.report else None
    if grounding is None:
        findings, impression = report.findings.strip(), report.impression.strip()
        return ([findings] if findings else []), ([impression] if impression else [])
    findings, impression = grounding.annotated("findings").strip(), grounding.annotated("impression").strip()
    extra = [*grounding.box_only_lines(), grounding.summary()] if grounding.flagged else []
    return ([findings] if findings else []) + extra, ([impression] if impression else [])


def build_report_content(report: DraftReport, result: AnalysisResult) -> hd.sr.ContainerContentItem:
    """The TID 2000 content tree; a section whose text is empty is left out, a report with no text refused."""
    if not report.findings.strip() and not report.impression.strip():
        raise ValueError("DraftReport.findings and DraftReport.impression are both empty: a narrative report needs "
                         "text in at least one of them")
    findings, impression = section_texts(report, result)
    sections = []
    if findings:
        sections.append(_section(hd.sr.CodedConcept.from_code(rcodes.FINDINGS_SECTION),
                                 hd.sr.CodedConcept.from_code(rcodes.FINDING_TEXT), *findings))
    if impression:
        sections.append(_section(hd.sr.CodedConcept.from_code(rcodes.IMPRESSIONS_SECTION),
                                 hd.sr.CodedConcept.from_code(rcodes.IMPRESSION_TEXT), *impression))
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept.from_code(rcodes.DIAGNOSTIC_IMAGING_REPORT),
        is_content_continuous=False,
        template_id="2000",
    )
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(_LANGUAGE))
    content.extend(hd.sr.ObservationContext(observer_device_context=device_observer_context(result.model)))
    content.extend(sections)
    root.ContentSequence = content
    return root


def build_narrative_sr(inputs: ReportInputs, signoff: Signoff | None = None) -> hd.sr.EnhancedSR:
    """The narrative report SR: the preliminary draft, or with ``signoff`` the verified version ``signoff.version``.

    For a signed version pass the inputs of the result holding the text the radiologist signed (it may differ from
    the draft).
    """
    manifest, result = inputs.manifest, inputs.result
    final = signoff is not None
    version = signoff.version if signoff is not None else 0
    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    series_uid = output_uid(*uid_args, OutputKind.NARRATIVE_SERIES)
    created = result.created_at
    content_at = signoff.signed_at if signoff is not None else created
    sr = hd.sr.EnhancedSR(
        evidence=inputs.evidence(),
        content=build_report_content(result.report, result),
        series_instance_uid=series_uid,
        series_number=NARRATIVE_SERIES_NUMBER,
        sop_instance_uid=output_uid(*uid_args, OutputKind.NARRATIVE, version=version),
        instance_number=DRAFT_INSTANCE_NUMBER + version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=final,
        is_verified=final,
        institution_name=manifest.study.institution_name or None,
        verifying_observer_name=signoff.verifying_observer_name if signoff else None,
        verifying_organization=signoff.verifying_organization if signoff else None,
        previous_versions=previous_versions(result, signoff, OutputKind.NARRATIVE, EnhancedSRStorage,
                                            series_uid) or None,
        contributing_equipment=[processing_equipment(result.model)],
        series_description="AI draft report (signed)" if final else "AI draft report (preliminary)",
        manufacturer_model_name=result.model.name,
        software_versions=software_version(),
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_date=content_at.date(),
        content_time=content_at.time(),
        series_date=created.date(),
        series_time=created.time(),
    )
    if signoff is not None:
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(signoff.signed_at)
    logger.info("built %s narrative SR for episode %d", "final" if final else "draft", result.episode_id)
    return sr
