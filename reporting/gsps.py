"""Softcopy Presentation States: the AI boxes and labels drawn by any PACS viewer.

One presentation state per annotated series (more where its images cannot share one, see :func:`fit_key`): it
references every image of the series that fits it, so a viewer keeps the presentation when the reader scrolls to
another slice, and its graphic annotations reference only the boxed image (and frame). Each box is a closed
POLYLINE in image pixels with its label as a text object anchored at the top-left corner, on one graphic layer.

- A grayscale image (MONOCHROME1/2) gets a Grayscale Softcopy Presentation State with exactly one VOI window
  (dcmtk refuses a window of several values): the image's first window (else its first VOI LUT), else for CT
  the soft-tissue default (:data:`CT_DEFAULT_WINDOW`, in Hounsfield units: the VOI applies after the Modality
  LUT the state copies), else a window spanning the pixel values. The image's own overlay planes are
  activated on a layer of their own.
- A colour image (RGB, YBR_*) gets a Color Softcopy Presentation State with the image's ICC profile, else sRGB.
- Any other image (PALETTE COLOR, ...) gets no presentation state: the reason is returned, for ``outputs.json``.

The label says "AI" and "preliminary" until a radiologist signs; the signed states are new instances (own UIDs)
in the same series.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from PIL import ImageCms
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from core.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, software_version
from core.result import AnalysisResult
from reporting.context import LocatedFinding, ReportInputs, box_polyline, tracking_uid
from reporting.overlay import finding_caption, frame_values, full_range_window
from reporting.sr import processing_equipment
from reporting.uids import OutputKind, output_uid

logger = logging.getLogger(__name__)

GSPS_SERIES_NUMBER = 9903
SIGNED_FIRST_INSTANCE_NUMBER = 1001  # draft states are numbered from 1
LAYER = hd.pr.GraphicLayer(
    layer_name="AI_FINDINGS",
    order=1,
    description="AI findings (raddraft)",
    display_color=hd.color.CIELabColor.from_string("yellow"),
)
# The image's own overlay planes (group 60xx), activated by the state on a layer of their own (layers are
# rendered lowest GraphicLayerOrder first: the AI boxes, then the image's overlays).
OVERLAY_LAYER = hd.pr.GraphicLayer(
    layer_name="IMAGE_OVERLAY",
    order=2,
    description="Overlay planes of the image",
)
# Soft-tissue window (W400/L40 HU) for a CT image that carries no window of its own: the full range of a CT
# (air to metal) shows the body as one grey. The state copies the image's rescale (Modality LUT), and viewers
# (dcmtk, highdicom's model of PS3.3 C.11.2) apply the VOI window to its output: these are Hounsfield units.
CT_DEFAULT_WINDOW = (40.0, 400.0, "AI: CT soft tissue default (the image has no window)")
FULL_RANGE_EXPLANATION = "AI: full pixel range"
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
LATERALITIES = ("R", "L")  # General Series Laterality's enumerated values
# Body Part Examined defined terms (PS3.16 Annex L) of unpaired parts, each one dciodvfy takes for unpaired too:
# a state over them has no Laterality (an empty one "should be absent ... if an unpaired body part").
UNPAIRED_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BLADDER", "BRAIN", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "COCCYX",
    "COLON", "CSPINE", "ESOPHAGUS", "FACE", "HEAD", "HEADNECK", "HEART", "JAW", "LIVER", "LSPINE", "NECK",
    "NECKCHEST", "NECKCHESTABDOMEN", "PANCREAS", "PELVIS", "PROSTATE", "RECTUM", "SKULL", "SPINE", "SPLEEN",
    "SSPINE", "STOMACH", "THYROID", "TRACHEA", "TSPINE", "UTERUS", "WHOLEBODY",
})


def of_multiframe_iod(image: Dataset) -> bool:
    """Whether *image* belongs to a multi-frame IOD: the Multi-frame Module makes Number of Frames Type 1 there,
    and no single-frame IOD has it (the test highdicom's presentation-state code applies, without its private
    helper)."""
    return "NumberOfFrames" in image


def presentation_kind(image: Dataset) -> str | None:
    """``"grayscale"``, ``"color"``, or None when no softcopy presentation state highdicom builds fits the image
    (PALETTE COLOR: the pseudo-colour state is for grayscale images; an unknown photometric interpretation)."""
    photometric = str(image.get("PhotometricInterpretation", ""))
    samples = int(image.get("SamplesPerPixel", 1) or 1)
    if photometric in GRAYSCALE and samples == 1:
        return "grayscale"
    if photometric in COLOR and samples == 3:
        return "color"
    return None


def fit_key(image: Dataset) -> Hashable:
    """Images with the same key can share one presentation state: highdicom requires one series, the same
    Rows/Columns and rescale (a state has one Modality LUT), and a multi-frame image alone. The photometric
    interpretation decides the state's class (and the grayscale Presentation LUT), the ICC profile the colour
    state's."""
    kind = presentation_kind(image)
    key: tuple[Hashable, ...] = (str(image.SeriesInstanceUID), kind, str(image.get("PhotometricInterpretation")),
                                 int(image.Rows), int(image.Columns))
    if kind == "grayscale":
        key += tuple(str(image.get(k, "")) for k in ("RescaleSlope", "RescaleIntercept", "RescaleType"))
    elif kind == "color":
        key += (bytes(image.get("ICCProfile", b"")),)
    if of_multiframe_iod(image):
        key += (str(image.SOPInstanceUID),)
    return key


def _first(value: object) -> object:
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def own_window(image: Dataset) -> tuple[float, float, str | None, str | None] | None:
    """The image's first VOI window (center, width, explanation, VOI LUT function): at the top level, else in
    the shared functional groups, else in the first frame's (an enhanced image); None when it has none."""
    holders = [image]
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if image.get(sequence):
            groups = image.get(sequence)[0]
            if groups.get("FrameVOILUTSequence"):
                holders.append(groups.FrameVOILUTSequence[0])
    for holder in holders:
        center, width = _first(holder.get("WindowCenter")), _first(holder.get("WindowWidth"))
        if center is None or width is None:
            continue
        explanation = _first(holder.get("WindowCenterWidthExplanation"))
        function = holder.get("VOILUTFunction")
        return (float(center), max(float(width), 1.0), str(explanation) if explanation else None,
                str(function) if function else None)
    return None


def own_voi_lut(image: Dataset) -> hd.VOILUT | None:
    """The image's first VOI LUT as a presentation state may hold it: PS3.3 C.11.8 allows 8 or 16 bits per entry
    only, so a LUT of other bits (12 is common) is rescaled to 16 bits, the same output range; None when it
    cannot be read (a negative first mapped value, data not of the descriptor's length)."""
    item = image.VOILUTSequence[0]
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW, in the byte order the source was read in
        big_endian = image.original_encoding[1] is False
        dtype = "u1" if bits == 8 and len(raw) == entries else (">u2" if big_endian else "<u2")
        data = np.frombuffer(raw, dtype=dtype).astype(np.uint32)
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.int64)).astype(np.uint32)
    if first_mapped < 0 or first_mapped >= 2**16 or data.size != entries or not 8 <= bits <= 16:
        logger.info("SOP Instance UID %s: its VOI LUT (descriptor %s) is not used", image.SOPInstanceUID,
                    list(item.LUTDescriptor))
        return None
    scale = 65535 / (2**bits - 1)
    lut_data = data.astype(np.uint8) if bits == 8 else np.round(data * scale).astype(np.uint16)
    explanation = item.get("LUTExplanation")
    return hd.VOILUT(first_mapped_value=first_mapped, lut_data=lut_data,
                     lut_explanation=str(explanation) if explanation else None)


def window_of(images: Sequence[Dataset]) -> hd.pr.SoftcopyVOILUTTransformation:
    """The one VOI window of a grayscale state over *images* (the annotated images it references, first one
    first): the first image's own first window, else its first VOI LUT, else the CT default, else the full range
    of their pixel values (pixel data needed only then). Always explicit, one value each: given none, highdicom
    would copy every window of the image (dcmtk refuses a multi-valued one) or read a multi-frame image's from
    functional groups."""
    for image in images:
        window = own_window(image)
        if window is not None:
            center, width, explanation, function = window
            return hd.pr.SoftcopyVOILUTTransformation(
                window_center=[center], window_width=[width],
                # One-element lists: highdicom 0.28 splits a plain-string explanation into characters.
                window_explanation=[explanation] if explanation else None,
                voi_lut_function=function,
            )
    for image in images:
        lut = own_voi_lut(image) if image.get("VOILUTSequence") else None
        if lut is not None:
            return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[lut])
    if str(images[0].get("Modality", "")) == "CT":
        center, width, explanation = CT_DEFAULT_WINDOW
    else:
        values = np.concatenate([frame_values(image, n).ravel() for image in images
                                 for n in range(1, int(image.get("NumberOfFrames", 1) or 1) + 1)])
        center, width = full_range_window(values)
        explanation = FULL_RANGE_EXPLANATION
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[center], window_width=[width], window_explanation=[explanation]
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


def overlay_groups(images: Sequence[Dataset]) -> list[int]:
    """The overlay groups (0x6000, 0x6002, ... 0x601E) that hold Overlay Data in any of *images*."""
    return [group for group in range(0x6000, 0x6020, 2) if any(Tag(group, 0x3000) in image for image in images)]


def laterality_of(images: Sequence[Dataset]) -> str | None:
    """General Series Laterality of a state over *images*: R or L when every image says so (its Laterality, else
    Image Laterality), else None (an image's B or U is no value of the series attribute, nor are two sides)."""
    found = {str(image.get("Laterality") or image.get("ImageLaterality") or "").strip().upper() for image in images}
    if len(found) == 1 and (value := found.pop()) in LATERALITIES:
        return value
    return None


def input_profile(profile: bytes) -> bytes:
    """*profile* as an input-device ("scnr") profile, as PS3.3 C.11.15.1.1 wants a presentation state's ICC
    Profile to be (highdicom refuses another class): a display ("mntr") profile, which Little CMS makes and some
    modalities write, describes the same RGB to PCS conversion, so only its header's Profile/Device Class field
    (bytes 12-15, ICC.1 7.2.5) is changed; its Profile ID (bytes 84-99, an MD5 of the rest) becomes zero, "not
    computed" (7.2.18), as the change would break it."""
    if profile[12:16] != b"mntr":
        return profile
    return profile[:12] + b"scnr" + profile[16:84] + bytes(16) + profile[100:]


def _set_anatomy(state: Dataset, images: Sequence[Dataset]) -> None:
    """General Series Body Part Examined (Type 3) of *images*, when they share one, and Laterality (Type 2C,
    required for a paired body part, and by dciodvfy when no body part is named): R or L as the images say,
    else absent for a body part known to be unpaired, else empty (the side is unknown)."""
    parts = {str(image.get("BodyPartExamined") or "").strip().upper() for image in images}
    part = parts.pop() if len(parts) == 1 else ""
    if part:
        state.BodyPartExamined = part
    laterality = laterality_of(images)
    if laterality is not None:
        state.Laterality = laterality
    elif part not in UNPAIRED_BODY_PARTS:
        state.Laterality = ""


def srgb_profile() -> bytes:
    """An sRGB ICC profile, made by Little CMS (Pillow), as an input profile: for a colour image that carries no
    profile of its own (sRGB is what a viewer assumes for such an image)."""
    return input_profile(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


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


@dataclass
class _StateGroup:
    """The images one presentation state covers: the annotated ones (with their findings) and the others."""

    kind: str
    annotated: list[tuple[Dataset, list[LocatedFinding]]] = field(default_factory=list)
    covered: list[Dataset] = field(default_factory=list)


def _groups(inputs: ReportInputs) -> tuple[list[_StateGroup], list[str]]:
    groups: dict[Hashable, _StateGroup] = {}
    reasons = []
    for image, findings in inputs.annotated_images():
        kind = presentation_kind(image)
        if kind is None:
            reason = (f"SOP Instance UID {image.SOPInstanceUID}: no softcopy presentation state fits Photometric "
                      f"Interpretation {image.get('PhotometricInterpretation', '(absent)')} with SamplesPerPixel "
                      f"{image.get('SamplesPerPixel', '(absent)')} (grayscale: MONOCHROME1/2, colour: RGB/YBR); "
                      f"its findings are in the SR and the overlay PNG")
            reasons.append(reason)
            logger.info("no presentation state: %s", reason)
            continue
        groups.setdefault(fit_key(image), _StateGroup(kind)).annotated.append((image, findings))
    for image in inputs.evidence():  # manifest order: the covered images, and so the state, are deterministic
        if "Rows" in image and "Columns" in image and presentation_kind(image) is not None:
            group = groups.get(fit_key(image))
            if group is not None:
                group.covered.append(image)
    return list(groups.values()), reasons


def build_presentation_state_set(inputs: ReportInputs, version: int = 0) -> tuple[list[hd.SOPClass], list[str]]:
    """The presentation states of the findings of report *version* (0 the draft, n signed version n), one per
    annotated series (per set of its images that can share one), in the order their images first appear among the
    findings; and the reason for each annotated image that no state fits (it has none: not an error, the outbox
    records it as skipped).

    The source datasets of annotated grayscale images need their pixel data when they carry no VOI window and
    are not CT; the other images of the series are referenced, their pixels never read.
    """
    manifest, result = inputs.manifest, inputs.result
    signed = version > 0
    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    # A signed version's states say "signed" and hold only the accepted findings: new instances in the same series
    # (version n numbered from n * 1000 + 1: SIGNED_FIRST_INSTANCE_NUMBER for the first), never the UIDs of another
    # version: a PACS that already holds a UID keeps (or replaces) that instance, so reusing it would lose the
    # signed labels or the draft.
    first_number = 1 + (SIGNED_FIRST_INSTANCE_NUMBER - 1) * version
    groups, reasons = _groups(inputs)
    states: list[hd.SOPClass] = []
    for n, group in enumerate(groups):
        views = {str(image.SOPInstanceUID): highdicom_view(image) for image in group.covered}
        annotated = [image for image, _ in group.annotated]
        annotations = [a for image, findings in group.annotated
                       for a in _annotation(views[str(image.SOPInstanceUID)], findings, result, signed)]
        layers = [LAYER]
        common = dict(
            referenced_images=list(views.values()),
            series_instance_uid=output_uid(*uid_args, OutputKind.GSPS_SERIES),
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=output_uid(*uid_args, OutputKind.GSPS, n, version=version),
            instance_number=first_number + n,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=result.model.name,
            software_versions=software_version(),
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_label="AI_FINDINGS",
            content_description=("AI findings, signed" if signed else "AI findings, preliminary: not verified"),
            graphic_annotations=annotations,
            institution_name=manifest.study.institution_name or None,
            contributing_equipment=[processing_equipment(result.model)],
            series_description="AI findings overlay",
            series_date=result.created_at.date(),
            series_time=result.created_at.time(),
        )
        overlays = overlay_groups(group.covered) if group.kind == "grayscale" else []
        if overlays:
            layers.append(OVERLAY_LAYER)
        if group.kind == "grayscale":
            inverse = annotated[0].get("PhotometricInterpretation") == "MONOCHROME1"
            state: hd.SOPClass = hd.pr.GrayscaleSoftcopyPresentationState(
                **common,
                graphic_layers=layers,
                voi_lut_transformations=[window_of(annotated)],
                presentation_lut_transformation=hd.PresentationLUTTransformation(
                    presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE) if inverse else None,
            )
        else:
            profile = annotated[0].get("ICCProfile")
            state = hd.pr.ColorSoftcopyPresentationState(
                **common,
                graphic_layers=layers,
                icc_profile=input_profile(bytes(profile)) if profile else srgb_profile(),
            )
        # Overlay Activation Module: highdicom has no parameter for it. Each overlay plane of the images is shown
        # on its own layer (PS3.3 C.11.7); an image without that group has nothing to show.
        for group_number in overlays:
            state.add_new(Tag(group_number, 0x1001), "CS", OVERLAY_LAYER.GraphicLayer)
        _set_anatomy(state, group.covered)
        states.append(state)
    logger.info("built %d presentation state(s) for episode %d, %d annotated image(s) without one",
                len(states), result.episode_id, len(reasons))
    return states, reasons


def build_presentation_states(inputs: ReportInputs, version: int = 0) -> list[hd.SOPClass]:
    """The states of :func:`build_presentation_state_set`, without the reasons of the images that have none."""
    return build_presentation_state_set(inputs, version)[0]
