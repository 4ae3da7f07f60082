"""Box refinement: the model's box of a focal lesion snapped to the lesion's edge in the image.

Why. Boxes come out of the model as text on a 0–100 grid, so one grid unit is 1/100 of the image's long side:
2.6 px on a 256-pixel CT slice, 8 px on a radiograph. A 6-pixel lung nodule boxed one unit off on two sides
has an IoU of about 0.3 with the nodule, however well the model found it. The model finds the lesion; this
module measures it in the source pixels, the way a reader's "click to measure" tool does.

Which findings. Only focal lesions (:data:`FOCAL_LABELS`: nodule, mass) on CT and on projection radiographs
(CR, DX). Other labels (effusion, pneumothorax, consolidation, cardiomegaly, MR tumour and oedema) and other
modalities keep the model's box. A finding the image does not support in the way described below also keeps
the model's box: refinement never adds or relabels a finding, it only moves its box (and, on CT, its slice; two
findings of one nodule that end up on the same slice are kept once).

CT (in Hounsfield units, whatever window the image stores). A solid nodule is soft tissue in aerated lung. The
pixels above :attr:`RefinePolicy.ct_threshold_hu` (−600 HU: aerated lung is about −850, a solid nodule is soft
tissue, and most of its partial-volume rim counts) are cut into 4-connected components inside a search window,
the model's box grown by ``reach`` of its size on every side. Components touching the window's border (chest
wall, mediastinum, vessels running out of the window), longer than ``max_growth`` times the model box's longer
side, or smaller than ``min_pixels`` are not the lesion; of the rest, the one whose centre is nearest the model
box's centre gives the box (its tight pixel bounding box). Then the lesion is followed through the neighbouring
analysed slices of the series: the same search around the refined box on the next slice up and down, as long as
the cross-section there has more pixels and its centre stays within half the box's side; the finding moves to
the slice where the cross-section is largest, the nodule's centre slice. Findings that end up as the same lesion
on the same slice (IoU ≥ 0.5) are kept once.

Radiographs (display values, bright = dense). A nodule or mass is a rounded opacity added on the lung. Its centre
is the maximum of a difference of Gaussians (σ = R/2 minus σ = 1.2 R, R the model box's mean half side) within
``radiograph_reach`` times the box's longer side of the model box's centre; its radius is where the smoothed
radial profile falls below ``radiograph_edge`` of the way from the centre value down to the background (the
median of the ring at 2.1–2.4 R), divided by cos 30° (a dome-shaped opacity is at half its height at 0.87 of its
radius). No positive response, a centre no brighter than the background, or no edge within 2.4 R: the model's
box stays.

The defaults were chosen on a validation phantom set (seed 800001), never on the held-out set that
``raddraft evaluate`` figures in the README come from; ``raddraft evaluate`` prints the model's own boxes'
counts beside the refined ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from core.result import Finding
from model.imaging import decode_frame, display_values, frame_header
from model.slices import finding_slice, iou, slice_key

logger = logging.getLogger(__name__)

REFINEMENT = "focal-lesion-v1"  # named in the model identity: the SR's algorithm parameters
FOCAL_LABELS = frozenset({"nodule", "mass"})
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RefinePolicy:
    enabled: bool = True
    reach: float = 1.5  # CT search window: the model box grown by this many box sizes on every side
    ct_threshold_hu: float = -600.0
    max_growth: float = 2.5  # a component's longer side / the model box's longer side, at most
    min_pixels: int = 9
    radiograph_reach: float = 0.7  # centre search radius / the model box's longer side
    radiograph_edge: float = 0.5  # where between centre value and background the edge lies

    def __post_init__(self) -> None:
        if self.reach <= 0 or self.radiograph_reach <= 0:
            raise ValueError(f"reach {self.reach} and radiograph_reach {self.radiograph_reach} must be positive")
        if self.max_growth < 1.0:
            raise ValueError(f"max_growth {self.max_growth} must be at least 1")
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels {self.min_pixels} must be at least 1")
        if not 0.0 < self.radiograph_edge < 1.0:
            raise ValueError(f"radiograph_edge {self.radiograph_edge} must be in (0, 1)")


@dataclass(frozen=True)
class Component:
    pixels: int
    box: Box  # source pixels, tight: (first column, first row, last column + 1, last row + 1)

    @property
    def centre(self) -> tuple[float, float]:
        return _centre(self.box)


def hounsfield(ds: Dataset, frame: int = 0) -> np.ndarray:
    """One frame (0-based; the first by default) of a CT image in Hounsfield units (the Modality LUT applied: of an
    enhanced CT, the frame's own from its functional groups)."""
    stored, _ = decode_frame(ds, frame)
    return np.asarray(apply_modality_lut(stored, frame_header(ds, frame)), dtype=np.float32)


def components(mask: np.ndarray) -> list[tuple[int, slice, slice]]:
    """4-connected components of a small boolean image: (pixel count, row slice, column slice) each."""
    seen = np.zeros(mask.shape, dtype=bool)
    rows, cols = mask.shape
    found = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, count = [(int(r0), int(c0))], 0
        r_min, r_max, c_min, c_max = int(r0), int(r0), int(c0), int(c0)
        while stack:
            r, c = stack.pop()
            count += 1
            r_min, r_max, c_min, c_max = min(r_min, r), max(r_max, r), min(c_min, c), max(c_max, c)
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        found.append((count, slice(r_min, r_max + 1), slice(c_min, c_max + 1)))
    return found


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def ct_component(hu: np.ndarray, box: Box, policy: RefinePolicy) -> Component | None:
    """The nodule-like component nearest the centre of *box* on one CT slice (module docstring), or None."""
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    left, top = max(0, math.floor(x1 - policy.reach * width)), max(0, math.floor(y1 - policy.reach * height))
    right = min(hu.shape[1], math.ceil(x2 + policy.reach * width))
    bottom = min(hu.shape[0], math.ceil(y2 + policy.reach * height))
    if right - left < 3 or bottom - top < 3:
        return None
    window = hu[top:bottom, left:right] > policy.ct_threshold_hu
    cx, cy = _centre(box)
    limit = policy.max_growth * max(width, height)
    best: tuple[float, Component] | None = None
    for count, rs, cs in components(window):
        if rs.start == 0 or cs.start == 0 or rs.stop == window.shape[0] or cs.stop == window.shape[1]:
            continue  # runs out of the window: part of a larger structure
        if count < policy.min_pixels or max(rs.stop - rs.start, cs.stop - cs.start) > limit:
            continue
        found = Component(count, (float(left + cs.start), float(top + rs.start), float(left + cs.stop),
                                  float(top + rs.stop)))
        fx, fy = found.centre
        distance = math.hypot(fx - cx, fy - cy)
        if best is None or distance < best[0]:
            best = (distance, found)
    return best[1] if best else None


def follow_slices(hus: Sequence[np.ndarray], index: int, start: Component, policy: RefinePolicy
                  ) -> tuple[int, Component]:
    """From slice *index*, the neighbouring slice (and its component) where the lesion's cross-section is largest."""
    best_index, best = index, start
    for step in (-1, 1):
        k, current = index + step, start
        while 0 <= k < len(hus):
            found = ct_component(hus[k], current.box, policy)
            if found is None or found.pixels <= current.pixels:
                break
            side = max(current.box[2] - current.box[0], current.box[3] - current.box[1])
            if math.hypot(found.centre[0] - current.centre[0], found.centre[1] - current.centre[1]) > side / 2:
                break
            current = found
            if current.pixels > best.pixels:
                best_index, best = k, current
            k += step
    return best_index, best


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders; each axis is convolved through the FFT (a mass's kernel
    is hundreds of pixels wide)."""
    radius = max(1, int(3 * sigma + 1))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    blurred = np.pad(image, radius, mode="reflect")
    for axis in (0, 1):
        length = blurred.shape[axis] + kernel.size - 1
        shape = [1, 1]
        shape[axis] = -1
        spectrum = np.fft.rfft(blurred, n=length, axis=axis) * np.fft.rfft(kernel, n=length).reshape(shape)
        keep = [slice(None), slice(None)]
        keep[axis] = slice(2 * radius, blurred.shape[axis])  # the fully overlapped part: the image's own pixels
        blurred = np.fft.irfft(spectrum, n=length, axis=axis)[tuple(keep)]
    return blurred


def radiograph_box(display: np.ndarray, box: Box, policy: RefinePolicy) -> Box | None:
    """The rounded opacity near *box* on a radiograph's display values (module docstring), or None."""
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    radius0 = (width + height) / 4
    cx, cy = _centre(box)
    reach = policy.radiograph_reach * max(width, height)
    margin = reach + 2.5 * radius0
    left, top = max(0, int(cx - margin)), max(0, int(cy - margin))
    right, bottom = min(display.shape[1], int(cx + margin)), min(display.shape[0], int(cy + margin))
    if right - left < 8 or bottom - top < 8 or radius0 < 1.0:
        return None
    window = display[top:bottom, left:right].astype(np.float64)
    response = _gaussian(window, radius0 / 2) - _gaussian(window, radius0 * 1.2)
    rr, cc = np.mgrid[0:window.shape[0], 0:window.shape[1]]
    near = np.hypot(cc + 0.5 + left - cx, rr + 0.5 + top - cy) <= reach
    if not near.any():
        return None
    response = np.where(near, response, -np.inf)
    pr, pc = np.unravel_index(int(np.argmax(response)), response.shape)
    if response[pr, pc] <= 0:
        return None
    smooth = _gaussian(window, max(1.0, radius0 / 8))
    rho = np.hypot(cc - pc, rr - pr)
    ring = (rho >= 2.1 * radius0) & (rho <= 2.4 * radius0)
    if not ring.any():
        return None
    background, peak = float(np.median(smooth[ring])), float(smooth[pr, pc])
    if peak <= background:
        return None
    edge = background + policy.radiograph_edge * (peak - background)
    half_bins = np.floor(2 * rho).astype(np.int64).ravel()  # bin i: i/2 <= rho < (i + 1)/2
    sums = np.bincount(half_bins, weights=smooth.ravel())
    counts = np.bincount(half_bins)
    for twice_r in range(2, math.ceil(4.8 * radius0)):  # r = 1, 1.5, … below 2.4 R
        i = twice_r - 1  # the band r - 0.5 <= rho < r + 0.5 is bins i and i + 1
        count = counts[i:i + 2].sum()
        if count and sums[i:i + 2].sum() / count < edge:
            radius = twice_r / 2 / math.cos(math.pi / 6)
            x, y = left + pc + 0.5, top + pr + 0.5
            return (max(0.0, x - radius), max(0.0, y - radius), min(float(display.shape[1]), x + radius),
                    min(float(display.shape[0]), y + radius))
    return None


def _dedupe(findings: list[Finding]) -> list[Finding]:
    kept: list[Finding] = []
    for finding in findings:
        if any(k.label == finding.label and finding_slice(k) == finding_slice(finding)
               and iou(k.box, finding.box) >= 0.5 for k in kept):
            continue
        kept.append(finding)
    return kept


def refine_findings(findings: Sequence[Finding], datasets: Sequence[Dataset],
                    displays: Sequence[np.ndarray] | None = None, policy: RefinePolicy | None = None, *,
                    frames: Sequence[int | None] | None = None) -> list[Finding]:
    """*findings* of one series (*datasets* its slices in spatial order; *displays* their display values when the
    caller has them, else they are computed where needed) with the boxes of focal lesions refined; same order, at
    most fewer (same-slice duplicates after following slices). A slice that is a frame of a multi-frame image is
    its dataset with its 1-based number in *frames* (None for a single-frame image; all None when not given)."""
    policy = policy or RefinePolicy()
    if not policy.enabled or not findings:
        return list(findings)
    numbers = list(frames) if frames is not None else [None] * len(datasets)
    if len(numbers) != len(datasets):
        raise ValueError(f"frames has {len(numbers)} entries for {len(datasets)} slices")
    modality = str(datasets[0].get("Modality", "")).upper()
    if modality not in RADIOGRAPH_MODALITIES and modality != "CT":
        return list(findings)
    index = {slice_key(str(ds.SOPInstanceUID), number): k
             for k, (ds, number) in enumerate(zip(datasets, numbers, strict=True))}
    hus: list[np.ndarray] = [hounsfield(ds, (number or 1) - 1) for ds, number in zip(datasets, numbers, strict=True)
                             ] if modality == "CT" and any(f.label in FOCAL_LABELS for f in findings) else []
    refined = []
    for finding in findings:
        k = index.get(finding_slice(finding))
        if finding.label not in FOCAL_LABELS or k is None:
            refined.append(finding)
            continue
        if modality == "CT":
            found = ct_component(hus[k], finding.box, policy)
            if found is None:
                refined.append(finding)
                continue
            k, found = follow_slices(hus, k, found, policy)
            update = {"box": found.box, "sop_instance_uid": str(datasets[k].SOPInstanceUID),
                      "frame_number": numbers[k]}
        else:
            display = displays[k] if displays is not None else display_values(datasets[k], (numbers[k] or 1) - 1)
            box = radiograph_box(display, finding.box, policy)
            if box is None:
                refined.append(finding)
                continue
            update = {"box": box}
        logger.debug("refined the box of %r from %s to %s", finding.label, finding.box, update["box"])
        refined.append(finding.model_copy(update=update))
    return _dedupe(refined) if modality == "CT" else refined
