"""Grayscale Softcopy Presentation States: the AI boxes and labels drawn by any PACS viewer.

One GSPS per annotated image (an image with at least one finding): each box a closed POLYLINE in image
pixels with its label as a text object anchored at the top-left corner, on one graphic layer. The image's
own VOI window is kept; an image without one gets a window spanning its pixel values, so the viewer shows
the same contrast as the overlay PNG. The label says "AI" and "preliminary" until a radiologist signs; the
signed states are new instances (own UIDs) in the same series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from model.result import AnalysisResult
from reporting.context import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    LocatedFinding,
    ReportInputs,
    box_polyline,
    software_version,
    tracking_uid,
)
from reporting.overlay import finding_caption, frame_values, full_range_window
from reporting.sr import processing_equipment
from reporting.uids import OutputKind, output_uid
from workers.manifest import StudyManifest

logger = logging.getLogger(__name__)

GSPS_SERIES_NUMBER = 9903
SIGNED_FIRST_INSTANCE_NUMBER = 1001  # draft states are numbered from 1
LAYER = hd.pr.GraphicLayer(
    layer_name="AI_FINDINGS",
    order=1,
    description="AI findings (raddraft)",
    display_color=hd.color.CIELabColor.from_string("yellow"),
)


def of_multiframe_iod(image: Dataset) -> bool:
    """Whether *image* belongs to a multi-frame IOD: the Multi-frame Module makes Number of Frames Type 1 there,
    and no single-frame IOD has it (the test highdicom's presentation-state code applies, without its private
    helper)."""
    return "NumberOfFrames" in image


def window_of(image: Dataset) -> hd.pr.SoftcopyVOILUTTransformation | None:
    """None when the image carries its own VOI (highdicom copies it); else a window over its pixel values.

    A legacy multi-frame image's own window is passed explicitly (highdicom would look for it in functional
    groups, see ``highdicom_view``); its VOI LUT data, if that is all it has, is replaced by the full range.
    """
    legacy_multiframe = of_multiframe_iod(image) and "SharedFunctionalGroupsSequence" not in image
    if "WindowCenter" in image and "WindowWidth" in image:
        if not legacy_multiframe:
            return None
        explanation = image.get("WindowCenterWidthExplanation")
        return hd.pr.SoftcopyVOILUTTransformation(
            window_center=[float(np.atleast_1d(image.WindowCenter)[0])],
            window_width=[float(np.atleast_1d(image.WindowWidth)[0])],
            window_explanation=[str(np.atleast_1d(explanation)[0])] if explanation else None,
        )
    if "VOILUTSequence" in image and not legacy_multiframe:
        return None
    frames = int(image.get("NumberOfFrames", 1) or 1)
    values = np.concatenate([frame_values(image, n).ravel() for n in range(1, frames + 1)])
    center, width = full_range_window(values)
    # One-element lists: highdicom 0.28 splits a plain-string explanation into characters.
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[center], window_width=[width], window_explanation=["AI: full pixel range"]
    )


def highdicom_view(image: Dataset) -> Dataset:
    """The image as highdicom's presentation-state code can read it.

    highdicom takes every image of a multi-frame IOD (Multi-frame SC, US/XA/NM multi-frame, even with one frame)
    for an enhanced one and reads its rescale and window from functional groups. A legacy multi-frame image has
    them at the top level: a shallow copy gets them as shared functional groups (the source is not changed).
    """
    if not of_multiframe_iod(image) or "SharedFunctionalGroupsSequence" in image:
        return image
    shared = Dataset()
    if "RescaleSlope" in image or "RescaleIntercept" in image:
        transformation = Dataset()
        transformation.RescaleSlope = image.get("RescaleSlope", 1)
        transformation.RescaleIntercept = image.get("RescaleIntercept", 0)
        transformation.RescaleType = image.get("RescaleType", "US")
        shared.PixelValueTransformationSequence = [transformation]
    view = Dataset()  # a new element dictionary over the same elements: adding to it leaves the source alone
    for element in image:
        view.add(element)
    view.SharedFunctionalGroupsSequence = [shared]
    view.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(int(image.get("NumberOfFrames", 1) or 1))]
    return view


def _annotation(image: Dataset, findings: Sequence[LocatedFinding], result: AnalysisResult,
                signed: bool) -> list[hd.pr.GraphicAnnotation]:
    by_frame: dict[int | None, list[LocatedFinding]] = {}
    for located in findings:
        by_frame.setdefault(located.frame_number, []).append(located)
    annotations = []
    for frame, members in by_frame.items():
        graphics, texts = [], []
        for located in members:
            tracking = dict(
                tracking_id=f"Finding {located.index + 1}",
                tracking_uid=tracking_uid(result, located.index),
            )
            graphics.append(hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array(box_polyline(located.finding.box), dtype=np.float64),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                **tracking,
            ))
            x1, y1, _, _ = located.finding.box
            texts.append(hd.pr.TextObject(
                text_value=finding_caption(located, signed),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(x1, y1),
                anchor_point_visible=False,
                **tracking,
            ))
        annotations.append(hd.pr.GraphicAnnotation(
            referenced_images=[image],
            graphic_layer=LAYER,
            referenced_frame_number=frame,
            graphic_objects=graphics,
            text_objects=texts,
        ))
    return annotations


def build_presentation_states(
    manifest: StudyManifest,
    result: AnalysisResult,
    sources: Sequence[Dataset],
    signed: bool = False,
) -> list[hd.pr.GrayscaleSoftcopyPresentationState]:
    """One GSPS per image with findings, in the order the images first appear among the findings.

    The source datasets of annotated images need their pixel data when they carry no VOI window.
    """
    inputs = ReportInputs.check(manifest, result, sources)
    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    # The signed states say "signed" and hold only the accepted findings: new instances in the same series
    # (numbered from SIGNED_FIRST_INSTANCE_NUMBER), never the draft's UIDs: a PACS that already holds a UID
    # keeps (or replaces) that instance, so reusing it would lose the signed labels or the draft.
    kind, first_number = (OutputKind.GSPS_FINAL, SIGNED_FIRST_INSTANCE_NUMBER) if signed else (OutputKind.GSPS, 1)
    states = []
    for n, (image, findings) in enumerate(inputs.annotated_images()):
        if image.get("SamplesPerPixel", 1) != 1:
            raise ValueError(f"SOP Instance UID {image.SOPInstanceUID}: a grayscale presentation state needs "
                             f"SamplesPerPixel 1, the image has {image.SamplesPerPixel}")
        window = window_of(image)
        inverse = image.get("PhotometricInterpretation") == "MONOCHROME1"
        view = highdicom_view(image)
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[view],
            series_instance_uid=output_uid(*uid_args, OutputKind.GSPS_SERIES),
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=output_uid(*uid_args, kind, n),
            instance_number=first_number + n,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=result.model.name,
            software_versions=software_version(),
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_label="AI_FINDINGS",
            content_description=("AI findings, signed" if signed else "AI findings, preliminary: not verified"),
            graphic_annotations=_annotation(view, findings, result, signed),
            graphic_layers=[LAYER],
            institution_name=manifest.study.institution_name or None,
            voi_lut_transformations=[window] if window is not None else None,
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE) if inverse else None,
            contributing_equipment=[processing_equipment(result.model)],
            series_description="AI findings overlay",
            series_date=result.created_at.date(),
            series_time=result.created_at.time(),
        )
        # General Series Laterality (Type 2C): the image's laterality, or empty (unknown) when it gives none.
        state.Laterality = image.get("Laterality") or image.get("ImageLaterality") or ""
        states.append(state)
    logger.info("built %d presentation state(s) for episode %d", len(states), result.episode_id)
    return states
