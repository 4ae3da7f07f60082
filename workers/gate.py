"""The analysis gate: which instances of a study the model reads, and why the others are not read.

The bundled model (and MiniGPT-Med) was made for projection radiographs and cross-sectional grey-scale images.
An instance is read only when every rule below lets it through; the first rule it fails is its reason:

1. **Not an AI/derived object** (the rule of :mod:`dicom_node.derived`, which also keeps such objects from opening
   an episode): not raddraft's own output (Manufacturer raddraft: an SR, narrative or presentation state it wrote
   and a PACS sent back), not a structured report, key-object selection or presentation state of any vendor.
2. **An image**: it has Rows and Columns (pixel data); segmentations, RT objects, waveforms (ECG) and
   encapsulated documents are not images.
3. **A modality the model reads**: ``analysis_modalities`` (default CR, DX, CT, MR). Ultrasound, NM, secondary
   captures (OT, SC) and the rest are stored but not analysed.
4. **Grey scale**: ``MONOCHROME1`` / ``MONOCHROME2``; colour and palette images (test patterns, fused or
   rendered images) are not what the model was trained on.
5. **Not a secondary capture, not an excluded image type**: a Secondary Capture SOP class (screen captures,
   scanned film, rendered test patterns) is not read; nor is an instance with an ImageType value in
   ``analysis_excluded_image_types`` (default LOCALIZER: a CT topogram or MR scout would otherwise become the
   study's report image). ``DERIVED`` / ``SECONDARY`` values alone are not excluded: scanners mark reformatted
   and reconstructed CT/MR images so, and a radiologist reads those (add them to the setting to keep them out).
6. **A body part the model reads**: ``analysis_body_parts`` (default empty: any; e.g. ``CHEST``) against the
   series' BodyPartExamined; a series with none passes.
7. **A frame that fits the decode limit**: rows x columns x samples x bytes of one frame, from the header, at most
   ``max_decoded_mb`` (default 256 MiB); a larger one (a decompression bomb: a small RLE or JPEG file announcing
   30000 x 30000) is never decoded.

A study with no instance left ends ``not-analysed`` with :meth:`GateDecision.reason`, a count of what was
kept out and why (never a patient value).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from core.manifest import InstanceEntry, SeriesEntry, StudyManifest
from core.settings import Settings
from dicom_node.derived import DerivedKind, derived_kind
from model import decoders

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC Image Storage and the multi-frame SC classes


@dataclass(frozen=True)
class GateRules:
    modalities: frozenset[str] = frozenset({"CR", "DX", "CT", "MR"})
    excluded_image_types: frozenset[str] = frozenset({"LOCALIZER"})
    body_parts: frozenset[str] = frozenset()  # empty: any body part
    max_decoded_bytes: int = int(decoders.DEFAULT_MAX_DECODED_MB * 2**20)  # of one frame

    @classmethod
    def from_settings(cls, settings: Settings) -> GateRules:
        return cls(modalities=frozenset(m.upper() for m in settings.analysis_modalities),
                   excluded_image_types=frozenset(t.upper() for t in settings.analysis_excluded_image_types),
                   body_parts=frozenset(b.upper() for b in settings.analysis_body_parts),
                   max_decoded_bytes=int(settings.max_decoded_mb * 2**20))


@dataclass(frozen=True)
class GateDecision:
    manifest: StudyManifest  # the analysable series and instances only
    refused: Counter[str] = field(default_factory=Counter)  # reason -> instances

    @property
    def analysable(self) -> bool:
        return bool(self.manifest.series)

    def reason(self) -> str:
        """``not analysed: 2 not an image (SR); 1 modality US is not analysed`` style summary."""
        parts = [f"{count} {why}" for why, count in sorted(self.refused.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "not analysed: " + ("; ".join(parts) if parts else "the study has no instance")


def refusal(series: SeriesEntry, instance: InstanceEntry, rules: GateRules) -> str | None:
    """Why the model does not read *instance*, or None when it does."""
    derived = derived_kind(instance.sop_class_uid, instance.manufacturer)
    if derived is DerivedKind.OWN_OUTPUT:
        return str(derived)
    if derived is not None:
        return f"{derived} is not analysed"
    if not instance.has_pixels:
        return f"not an image ({series.modality or 'no modality'})"
    if instance.number_of_frames < 1:
        return "no frames"
    modality = series.modality.upper()
    if modality not in rules.modalities:
        return f"modality {modality or '(none)'} is not analysed"
    if (instance.photometric_interpretation or "").upper() not in GREYSCALE:
        return f"{instance.photometric_interpretation or 'unknown photometric interpretation'} is not grey scale"
    if instance.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture is not analysed"
    excluded = sorted(rules.excluded_image_types.intersection(v.upper() for v in instance.image_type))
    if excluded:
        return f"image type {excluded[0]} is not analysed"
    if rules.body_parts and series.body_part_examined and series.body_part_examined.upper() not in rules.body_parts:
        return f"body part {series.body_part_examined.upper()} is not analysed"
    frame = decoders.decoded_size(instance.rows or 0, instance.columns or 0, 1, instance.samples_per_pixel,
                                  instance.bits_allocated)
    if frame > rules.max_decoded_bytes:
        return (f"a frame would decode to {frame / 2**20:.0f} MiB, over max_decoded_mb "
                f"{rules.max_decoded_bytes / 2**20:.0f}")
    return None


def gate(manifest: StudyManifest, rules: GateRules) -> GateDecision:
    """The manifest cut to what the model reads, with the count of every reason an instance was kept out."""
    refused: Counter[str] = Counter()
    kept: list[SeriesEntry] = []
    for series in manifest.series:
        members = []
        for instance in series.instances:
            why = refusal(series, instance, rules)
            if why is None:
                members.append(instance)
            else:
                refused[why] += 1
        if members:
            kept.append(series.model_copy(update={"instances": members}))
    return GateDecision(manifest.model_copy(update={"series": kept}), refused)
