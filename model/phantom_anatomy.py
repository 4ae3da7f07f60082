"""Procedural anatomy and findings for the phantom studies, drawn with numpy.

Each ``render_*`` function samples everything it needs from the generator first (anatomy, findings, noise),
then paints. ``paint_findings=False`` paints the same image without the findings — same random draws, same
noise — which is how the tests prove that each truth box holds exactly what was drawn.

Radiographs are drawn as density in [0, 1] (bright = dense), CT in Hounsfield units, MR in arbitrary signal
units (FLAIR-like: oedema bright, CSF dark). Sides are the patient's: on a PA/AP radiograph and on an axial
slice seen from the feet, the patient's right is on the image's left (low column numbers).
Boxes are (x1, y1, x2, y2) pixel edges: the drawn pixels of columns x1..x2-1 and rows y1..y2-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model.prompts import RADIOGRAPH_LABELS

NORMAL_CTR = (0.38, 0.47)
ENLARGED_CTR = (0.56, 0.66)


@dataclass(frozen=True)
class DrawnFinding:
    label: str
    box: tuple[int, int, int, int]
    laterality: str | None
    site: str
    image_index: int = 0  # which image of the series shows it (CT/MR: the slice with the largest section)
    size_mm: float = 0.0


@dataclass
class Rendering:
    images: list[np.ndarray]  # float32 per image: density (radiograph), HU (CT) or signal (MR)
    findings: list[DrawnFinding]
    pixel_spacing_mm: float
    slice_positions_mm: list[float] = field(default_factory=lambda: [0.0])
    ctr: float | None = None  # cardiothoracic ratio of a radiograph
    # CT/MR: every visible section of every lesion, one per slice it crosses (the truth findings are the
    # largest ones); what box training tasks read on each slice. Empty for a radiograph (its findings).
    sections: list[DrawnFinding] = field(default_factory=list)

    @property
    def drawn(self) -> list[DrawnFinding]:
        """Every lesion as drawn, image by image: the CT/MR sections, or a radiograph's findings."""
        return self.sections or self.findings


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a coarse normal grid bicubically upsampled to *shape*."""
    coarse = rng.standard_normal((shape[0] // cell + 2, shape[1] // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def bbox(mask: np.ndarray, row0: int = 0, col0: int = 0) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (col0 + int(cols[0]), row0 + int(rows[0]), col0 + int(cols[-1]) + 1, row0 + int(rows[-1]) + 1)


def _window(shape: tuple[int, int], cx: float, cy: float, radius: float) -> tuple[slice, slice, int, int]:
    r0, r1 = max(0, int(cy - radius) - 2), min(shape[0], int(cy + radius) + 3)
    c0, c1 = max(0, int(cx - radius) - 2), min(shape[1], int(cx + radius) + 3)
    return slice(r0, r1), slice(c0, c1), r0, c0


def ellipse_value(y: np.ndarray, x: np.ndarray, cx: float, cy: float, *, ax: float, ay: float) -> np.ndarray:
    """The ellipse equation value ((x-cx)/ax)² + ((y-cy)/ay)²: < 1 inside."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


# --- chest radiograph ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lung:
    side: str
    cx: float
    cy: float
    ax: float
    ay: float
    dome_base: float  # diaphragm row at the lateral costophrenic angle
    dome_height: float

    def dome(self, x: np.ndarray | float) -> np.ndarray | float:
        t = np.clip((np.asarray(x, dtype=np.float32) - self.cx) / self.ax, -1.0, 1.0)
        return self.dome_base - self.dome_height * (1.0 - t**2)

    def mask(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (ellipse_value(y, x, self.cx, self.cy, ax=self.ax, ay=self.ay) < 1.0) & (y < self.dome(x))

    def contains_disc(self, cx: float, cy: float, r: float) -> bool:
        inside = ((cx - self.cx) / max(self.ax - r, 1.0)) ** 2 + ((cy - self.cy) / max(self.ay - r, 1.0)) ** 2 < 1
        return bool(inside and cy + r < float(self.dome(cx)) - 2)

    @property
    def top(self) -> float:
        return self.cy - self.ay

    def zone(self, row: float) -> str:
        t = (row - self.top) / max(self.dome_base - self.top, 1.0)
        return "upper zone" if t < 1 / 3 else "mid zone" if t < 2 / 3 else "lower zone"


def render_radiograph(
    rng: np.random.Generator, rows: int, cols: int, labels: Sequence[str], *, paint_findings: bool = True
) -> Rendering:
    """A PA/AP chest radiograph with the given findings (``nodule`` may appear twice)."""
    spacing = float(rng.uniform(380.0, 430.0)) / cols  # mm per pixel: a chest ~40 cm wide
    y = np.arange(rows, dtype=np.float32)[:, None]
    x = np.arange(cols, dtype=np.float32)[None, :]
    cx = cols * float(rng.uniform(0.48, 0.52))
    body_hw = cols * float(rng.uniform(0.40, 0.46))
    lateral = body_hw * float(rng.uniform(0.86, 0.9))  # inner margin of the ribs
    medial = cols * float(rng.uniform(0.05, 0.07))
    lung_top = rows * float(rng.uniform(0.08, 0.14))
    dome_base = rows * float(rng.uniform(0.72, 0.8))
    lungs = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        ax = (lateral - medial) / 2
        ay = (dome_base - lung_top) / 2 * float(rng.uniform(1.05, 1.15))
        lungs[side] = _Lung(side, cx + sign * (lateral + medial) / 2, lung_top + ay, ax, ay,
                            dome_base + (rows * 0.02 if side == "left" else 0.0), rows * float(rng.uniform(0.06, 0.1)))
    ctr = float(rng.uniform(*(ENLARGED_CTR if "cardiomegaly" in labels else NORMAL_CTR)))
    normal_ctr = float(rng.uniform(*NORMAL_CTR))  # the heart drawn when cardiomegaly is left unpainted
    if "cardiomegaly" not in labels:
        normal_ctr = ctr
    heart_cx = cx + 0.18 * ctr * lateral
    heart_cy = dome_base - rows * 0.1
    heart_ay = rows * float(rng.uniform(0.11, 0.14))
    tissue, lung_density, heart_density = (float(rng.uniform(a, b)) for a, b in ((0.4, 0.46), (0.12, 0.17),
                                                                                 (0.54, 0.6)))
    rib_gap = (dome_base - lung_top) / 9.5
    rib_phase = float(rng.uniform(0.2, 0.6))
    markings = smooth_noise(rng, (rows, cols), max(4, cols // 80))
    texture = smooth_noise(rng, (rows, cols), max(3, cols // 40))
    grain = rng.standard_normal((rows, cols)).astype(np.float32)
    plans = _plan_radiograph_findings(rng, labels, lungs, spacing, (rows, cols))

    # anatomy
    shoulder = np.clip(y / (rows * 0.2), 0.0, 1.0)
    half_width = body_hw * (0.72 + 0.28 * shoulder)
    body = np.abs(x - cx) < half_width
    image = np.where(body, np.float32(tissue), np.float32(0.05))
    lung_masks = {side: lung.mask(y, x) for side, lung in lungs.items()}
    lung_any = lung_masks["right"] | lung_masks["left"]
    ptx_region = np.zeros((rows, cols), dtype=bool)
    if paint_findings:
        for plan in plans:
            if plan["label"] == "pneumothorax":
                ptx_region |= plan["region"](y, x) & lung_masks[plan["side"]]
    hilar = np.clip(1.25 - np.abs(x - cx) / lateral, 0.3, 1.0)
    image = np.where(lung_any, lung_density + 0.035 * markings * hilar * ~ptx_region, image)
    image = np.where(ptx_region, np.float32(0.07), image)
    below = body & (y > lungs["right"].dome(x)) & (y > lungs["left"].dome(x))
    image = np.where(below & ~lung_any, np.float32(tissue + 0.08), image)
    mediastinum = (np.abs(x - cx) < medial) & (y > lung_top * 0.6)
    image = np.where(mediastinum, np.float32(tissue + 0.1), image)
    drawn_ctr = ctr if paint_findings else normal_ctr
    heart_ax = drawn_ctr * lateral
    heart = (ellipse_value(y, x, heart_cx, heart_cy, ax=heart_ax, ay=heart_ay) < 1.0) & (y < dome_base + rows * 0.02)
    image = np.where(heart, np.float32(heart_density), image)
    spine = np.abs(x - cx) < cols * 0.035
    image = image + np.where(spine & body, np.float32(0.06), np.float32(0.0))
    ribs = np.zeros((rows, cols), dtype=bool)
    for k in range(10):
        for lung in lungs.values():
            offset = lung_top + (k + rib_phase) * rib_gap
            curve = offset + rib_gap * 1.2 * ((x - cx) / lateral) ** 2 - rib_gap * 0.3
            ribs |= (np.abs(y - curve) < rib_gap * 0.22) & (np.abs(x - lung.cx) < lung.ax * 1.08)
    image = image + np.where(ribs & body, np.float32(0.06), np.float32(0.0))
    clavicle = np.abs(y - (lung_top + 0.3 * np.abs(x - cx) * 0.35)) < rows * 0.012
    image = image + np.where(clavicle & (np.abs(x - cx) < lateral * 0.85) & body, np.float32(0.07),
                             np.float32(0.0))

    findings = []
    for plan in plans:
        if plan["label"] == "cardiomegaly":
            box = bbox(heart if paint_findings else
                        (ellipse_value(y, x, heart_cx, heart_cy, ax=ctr * lateral, ay=heart_ay) < 1.0)
                        & (y < dome_base + rows * 0.02))
            findings.append(DrawnFinding("cardiomegaly", box, None, "heart", size_mm=2 * ctr * lateral * spacing))
            continue
        box = plan["paint"](image, (y, x), lung_masks[plan["side"]], texture, on=paint_findings)
        findings.append(DrawnFinding(plan["label"], box, plan["side"], plan["site"], size_mm=plan["size_mm"]))
    image = image + 0.008 * grain
    return Rendering([np.clip(image, 0.0, 1.0)], findings, spacing, ctr=ctr if paint_findings else normal_ctr)


def _plan_radiograph_findings(
    rng: np.random.Generator, labels: Sequence[str], lungs: dict[str, _Lung], spacing: float, shape: tuple[int, int]
) -> list[dict]:
    """Sample each finding's place and shape; returns painter closures (the random draws happen here)."""
    plans: list[dict] = []
    used_sides: dict[str, str] = {}
    for label in labels:
        if label == "cardiomegaly":
            plans.append({"label": label})
            continue
        side = _pick_side(rng, label, used_sides)
        first_nodule = next((plan["side"] for plan in plans if plan["label"] == "nodule"), None)
        if label == "nodule" and first_nodule is not None:  # a second nodule goes to the other lung
            other = "left" if first_nodule == "right" else "right"
            side = other if used_sides.get(other) != "pneumothorax" else side
        used_sides.setdefault(side, label)
        lung = lungs[side]
        if label in ("nodule", "mass"):
            plans.append(_plan_blob(rng, label, lung, spacing))
        elif label == "pleural effusion":
            plans.append(_plan_effusion(rng, lung))
        elif label == "pneumothorax":
            plans.append(_plan_pneumothorax(rng, lung))
        elif label == "consolidation":
            plans.append(_plan_consolidation(rng, lung, spacing, shape))
        else:
            raise ValueError(f"radiograph finding label {label!r} must be one of {RADIOGRAPH_LABELS}")
    return plans


def _pick_side(rng: np.random.Generator, label: str, used: dict[str, str]) -> str:
    """A pneumothorax never shares a side with another lung finding."""
    sides = ["right", "left"]
    if label == "pneumothorax":
        sides = [s for s in sides if s not in used] or sides
    else:
        sides = [s for s in sides if used.get(s) != "pneumothorax"] or sides
    return str(rng.choice(sides))


def _place(rng: np.random.Generator, lung: _Lung, radius: float, spread: float, skip_top: float
           ) -> tuple[float, float]:
    """A random centre for a disc of *radius* inside *lung* (100 tries), else the lung's own centre."""
    for _ in range(100):
        cx = float(rng.uniform(lung.cx - lung.ax * spread, lung.cx + lung.ax * spread))
        cy = float(rng.uniform(lung.top + lung.ay * skip_top, lung.dome_base))
        if lung.contains_disc(cx, cy, radius):
            return cx, cy
    return lung.cx, lung.cy


def _plan_blob(rng: np.random.Generator, label: str, lung: _Lung, spacing: float) -> dict:
    diameter = float(rng.uniform(8.0, 25.0) if label == "nodule" else rng.uniform(35.0, 60.0))
    radius = diameter / 2 / spacing
    lobes, phase = int(rng.integers(3, 6)), float(rng.uniform(0, 2 * np.pi))
    lobulation = 0.06 if label == "nodule" else 0.15
    amplitude = float(rng.uniform(0.2, 0.3))
    cx, cy = _place(rng, lung, radius * (1 + lobulation) + 2, 1.0, 0.0)

    def paint(image: np.ndarray, yx: tuple[np.ndarray, np.ndarray], lung_mask: np.ndarray, texture: np.ndarray,
              *, on: bool) -> tuple[int, int, int, int]:
        y, x = yx
        rs, cs, r0, c0 = _window(image.shape, cx, cy, radius * (1 + lobulation) + 1)
        yy, xx = y[rs, :] - cy, x[:, cs] - cx
        rho = np.sqrt(xx**2 + yy**2)
        edge = radius * (1 + lobulation * np.sin(lobes * np.arctan2(yy, xx) + phase))
        profile = np.clip(1.0 - (rho / edge) ** 2, 0.0, None) ** 0.5
        if on:
            image[rs, cs] += amplitude * profile * (1.0 + 0.1 * texture[rs, cs])
        return bbox(profile > 0, r0, c0)

    return {"label": label, "side": lung.side, "site": lung.zone(cy), "size_mm": diameter, "paint": paint}


def _plan_effusion(rng: np.random.Generator, lung: _Lung) -> dict:
    height = (lung.dome_base - lung.top) * float(rng.uniform(0.18, 0.38))
    meniscus = height * float(rng.uniform(0.25, 0.5))
    fade = max(3.0, height * 0.08)
    density = float(rng.uniform(0.48, 0.55))
    lateral_sign = 1.0 if lung.side == "left" else -1.0

    def paint(image: np.ndarray, yx: tuple[np.ndarray, np.ndarray], lung_mask: np.ndarray, texture: np.ndarray,
              *, on: bool) -> tuple[int, int, int, int]:
        y, x = yx
        t = np.clip(lateral_sign * (x - lung.cx) / lung.ax * 0.5 + 0.5, 0.0, 1.0)  # 0 medial → 1 lateral
        level = lung.dome_base - height - meniscus * t**2
        alpha = np.clip((y - level) / fade, 0.0, 1.0) * lung_mask
        if on:
            np.copyto(image, image * (1 - alpha) + density * alpha, where=alpha > 0)
        return bbox(alpha > 0)

    return {"label": "pleural effusion", "side": lung.side, "site": "base", "size_mm": 0.0, "paint": paint}


def _plan_pneumothorax(rng: np.random.Generator, lung: _Lung) -> dict:
    collapse = float(rng.uniform(0.15, 0.35))
    medial_sign = -1.0 if lung.side == "left" else 1.0
    ccx = lung.cx + medial_sign * lung.ax * collapse
    ccy = lung.cy + lung.ay * collapse * 0.8
    cax, cay = lung.ax * (1 - collapse), lung.ay * (1 - collapse * 0.8)
    line = float(rng.uniform(0.01, 0.018))  # pleural line: 1–3 pixels

    def region(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ellipse_value(y, x, ccx, ccy, ax=cax, ay=cay) >= 1.0

    def paint(image: np.ndarray, yx: tuple[np.ndarray, np.ndarray], lung_mask: np.ndarray, texture: np.ndarray,
              *, on: bool) -> tuple[int, int, int, int]:
        y, x = yx
        value = ellipse_value(y, x, ccx, ccy, ax=cax, ay=cay)
        rim = lung_mask & (value >= 1.0)
        pleura = lung_mask & (value < 1.0) & (value >= 1.0 - line)
        if on:
            image[pleura] = np.float32(0.3)
        return bbox(rim | pleura)

    return {"label": "pneumothorax", "side": lung.side, "site": "apex", "size_mm": 0.0, "paint": paint,
            "region": region}


def _plan_consolidation(rng: np.random.Generator, lung: _Lung, spacing: float, shape: tuple[int, int]) -> dict:
    radius = float(rng.uniform(25.0, 55.0)) / spacing
    cx, cy = _place(rng, lung, radius * 0.5, 0.6, 0.5)
    patches = smooth_noise(rng, shape, max(3, int(radius / 3)))
    amplitude = float(rng.uniform(0.18, 0.26))

    def paint(image: np.ndarray, yx: tuple[np.ndarray, np.ndarray], lung_mask: np.ndarray, texture: np.ndarray,
              *, on: bool) -> tuple[int, int, int, int]:
        y, x = yx
        rs, cs, r0, c0 = _window(image.shape, cx, cy, radius)
        rho = np.sqrt((x[:, cs] - cx) ** 2 + (y[rs, :] - cy) ** 2) / radius
        strength = np.maximum(1.2 - rho + 0.45 * patches[rs, cs], 0.8 * (rho < 0.35))  # a solid core
        strength = np.clip(strength, 0.0, 1.0) * (rho < 1.0) * lung_mask[rs, cs]
        strength = np.where(strength > 0.15, strength, 0.0)
        if on:
            image[rs, cs] += amplitude * strength
        box = bbox(strength > 0, r0, c0)
        if box is None:
            raise ValueError(f"consolidation centre ({cx:.0f}, {cy:.0f}) lies outside the {lung.side} lung")
        return box

    return {"label": "consolidation", "side": lung.side, "site": lung.zone(cy), "size_mm": 2 * radius * spacing,
            "paint": paint}
