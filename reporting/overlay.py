"""How findings look outside a PACS: an 8-bit PNG of each annotated image with boxes and labels drawn, and a
findings JSON. Both carry the preliminary status until a radiologist signs; neither holds patient identity.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array

from model import decoders
from model.imaging import frame_header
from reporting import codes as rcodes
from reporting.consistency import NOT_IN_TEXT, draft_grounding
from reporting.context import LocatedFinding, ReportInputs, box_polyline, tracking_uid

FINDINGS_SCHEMA_VERSION = 1
BOX_COLOR = (255, 220, 0)  # yellow, as the GSPS graphic layer
BANNER_COLOR = (255, 64, 64)
# zlib level of the PNG (issue 21): Pillow's default (6) spent 184 ms on a 1000 x 866 radiograph, 31.6 % of the io
# worker's CPU; level 1 is about 4x faster for a file a little larger (bench/overlay.py measures both)
PNG_COMPRESS_LEVEL = 1


def finding_caption(located: LocatedFinding, signed: bool) -> str:
    """Text shown next to a box, e.g. ``1 left pneumothorax (AI, preliminary)``; a box of a grounded draft that
    no sentence states says so: ``2 right nodule (not in text) (AI, preliminary)`` (reporting/consistency.py;
    the signed labels are the radiologist's accepted findings and carry no draft consistency)."""
    coded = rcodes.lookup_finding(located.finding.label)
    words = " ".join(w for w in (located.finding.laterality or "", coded.display.lower()) if w)
    if not signed and located.finding.status == "box_only":
        words += f" {NOT_IN_TEXT}"
    return f"{located.index + 1} {words} ({'AI, signed' if signed else 'AI, preliminary'})"


def full_range_window(values: np.ndarray) -> tuple[float, float]:
    """(center, width) of a window spanning every value."""
    low, high = float(np.min(values)), float(np.max(values))
    width = max(high - low, 1.0)
    return low + width / 2, width


def frame_values(image: Dataset, frame_number: int | None) -> np.ndarray:
    """Modality values (after Rescale Slope/Intercept, of the frame's functional groups in an enhanced image) of one
    frame, (rows, columns); only that frame is decoded."""
    decoders.configure()  # the plugins prepare decoded the image with
    decoders.check_decoded_size(image, 1)  # one frame is decoded, never the whole pixel data of a multi-frame
    if int(image.get("NumberOfFrames", 1) or 1) > 1:
        index = (frame_number or 1) - 1
        pixels = pixel_array(image, index=index)
        return np.asarray(apply_modality_lut(pixels, frame_header(image, index)), dtype=np.float64)  # its rescale
    return np.asarray(apply_modality_lut(image.pixel_array, image), dtype=np.float64)


def to_display(image: Dataset, values: np.ndarray) -> np.ndarray:
    """8-bit grey levels: the image's first VOI window (else its full range), linear, MONOCHROME1 inverted."""
    if "WindowCenter" in image and "WindowWidth" in image:
        center = float(np.atleast_1d(image.WindowCenter)[0])
        width = max(float(np.atleast_1d(image.WindowWidth)[0]), 1.0)
    else:
        center, width = full_range_window(values)
    low = center - width / 2
    grey = np.clip((values - low) / width, 0.0, 1.0) * 255.0
    if image.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255.0 - grey
    return grey.round().astype(np.uint8)


def render_overlay(image: Dataset, findings: list[LocatedFinding], signed: bool = False, *,
                   compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of the image (first finding's frame) with every finding's box and caption, plus a status banner
    (*compress_level*: zlib's 0-9, lossless at any level)."""
    if image.get("SamplesPerPixel", 1) != 1:
        raise ValueError(f"SOP Instance UID {image.SOPInstanceUID}: overlay needs a grayscale image "
                         f"(SamplesPerPixel 1), got {image.SamplesPerPixel}")
    frame = findings[0].frame_number if findings else None
    picture = Image.fromarray(to_display(image, frame_values(image, frame))).convert("RGB")
    draw = ImageDraw.Draw(picture)
    short_side = min(picture.size)
    line = max(1, short_side // 300)
    font = ImageFont.load_default(size=max(10, short_side // 40))
    for located in findings:
        if located.frame_number != frame:
            continue  # another frame of a multi-frame image: the PNG shows one frame
        draw.line(box_polyline(located.finding.box), fill=BOX_COLOR, width=line)
        x1, y1, _, _ = located.finding.box
        caption = finding_caption(located, signed)
        _, top, _, bottom = draw.textbbox((0, 0), caption, font=font)
        above = y1 - (bottom - top) - 2 * line
        y_text = above if above >= 0 else y1 + line  # above the box, or inside it at the top edge
        draw.text((x1 + line, y_text), caption, fill=BOX_COLOR, font=font)
    banner = "AI FINDINGS - SIGNED" if signed else "AI DRAFT - PRELIMINARY - NOT VERIFIED"
    draw.text((line * 2, line * 2), banner, fill=BANNER_COLOR, font=font)
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def findings_document(inputs: ReportInputs, overlays: dict[str, str], signed: bool = False) -> dict[str, Any]:
    """The findings as plain data (no patient identity): codes, boxes, tracking UIDs, overlay file names.

    ``overlays`` maps SOP Instance UID to the overlay PNG's file name.
    """
    result = inputs.result
    findings = []
    for located in inputs.located_findings():
        finding = located.finding
        coded = rcodes.lookup_finding(finding.label)
        site = rcodes.finding_site(coded, finding.site, located.series.body_part_examined)
        findings.append({
            "index": located.index,
            "label": finding.label,
            "code": _code(coded.finding_type),
            "coded_as_generic_finding": coded.is_fallback,
            "site": finding.site,
            "site_code": _code(site) if site is not None else None,
            "laterality": finding.laterality,
            "laterality_code": _code(rcodes.LATERALITY_CODES[finding.laterality]) if finding.laterality else None,
            "description": finding.description,
            "sop_instance_uid": finding.sop_instance_uid,
            "frame_number": finding.frame_number,
            "box": list(finding.box),
            "polyline": [list(point) for point in box_polyline(finding.box)],
            "tracking_uid": str(tracking_uid(result, located.index)),
            "overlay": overlays.get(finding.sop_instance_uid),
        })
    document: dict[str, Any] = {
        "schema_version": FINDINGS_SCHEMA_VERSION,
        "study_instance_uid": result.study_instance_uid,
        "episode_id": result.episode_id,
        "status": "final" if signed else "preliminary",
        "model": result.model.model_dump(),
        "report": {"findings": result.report.findings, "impression": result.report.impression},
        "analysed_instances": list(result.analysed_instances),
        "findings": findings,
        "created_at": result.created_at.isoformat(),
    }
    grounding = None if signed else draft_grounding(result)
    if grounding is not None:  # keys added only for a grounded draft: older documents stay as they were
        for entry in findings:
            finding = result.findings[entry["index"]]
            entry.update(status=finding.status, source=finding.source, sentences=list(finding.sentences))
        document["report"]["sentences"] = [sentence.model_dump(mode="json") for sentence in result.report.sentences]
        document["consistency"] = {**grounding.consistency.model_dump(), "flagged": grounding.flagged}
    return document


def findings_json(inputs: ReportInputs, overlays: dict[str, str], signed: bool = False) -> bytes:
    return (json.dumps(findings_document(inputs, overlays, signed), indent=2) + "\n").encode()


def _code(code: Any) -> dict[str, str]:
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}
