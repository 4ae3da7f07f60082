"""Procedural cross-sectional phantoms: chest CT slices with lung nodules, brain MR slices with a tumour.

A lesion is a sphere: every slice it crosses shows its section, and its truth finding is on the slice with
the largest section (the same rule :mod:`model.slices` uses to merge per-slice findings). Every section of at
least :data:`SECTION_MIN_RADIUS_PX` (and always the largest) is also kept in ``Rendering.sections``: training
teaches the box tasks on each slice what that slice shows, so a lesion seen on a neighbour of its truth slice is
never taught as "no abnormality". Slices are ordered head to feet; columns run to the patient's left and rows
to the posterior (axial, seen from the feet).
CT images are in Hounsfield units, MR images in FLAIR-like signal units (oedema bright, CSF dark).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.phantom_anatomy import DrawnFinding, Rendering, bbox, ellipse_value, smooth_noise

CT_SIZE = 256
MR_SIZE = 256
SECTION_MIN_RADIUS_PX = 2.0  # a smaller cap of a sphere is a sliver of a few pixels: not taught as a finding


@dataclass(frozen=True)
class _Sphere:
    side: str
    cx: float  # pixels
    cy: float
    z: float  # mm along the stack (slice k sits at k * slice_spacing)
    radius_mm: float

    def section_px(self, z: float, spacing: float) -> float:
        d2 = self.radius_mm**2 - (z - self.z) ** 2
        return float(np.sqrt(d2)) / spacing if d2 > 0 else 0.0


def _side_of(cx: float, centre: float) -> str:
    return "right" if cx < centre else "left"


# --- chest CT ------------------------------------------------------------------------------------------------


def _ct_lungs(k: int, n: int) -> tuple[float, float, float, float, float]:
    """(dx, dy, ax, ay, heart) of slice k of n as fractions of the image: lungs widen towards the bases."""
    f = (k + 0.5) / n
    grow = 0.85 + 0.2 * np.sin(np.pi * (0.3 + 0.6 * f))
    return 0.19, -0.01, 0.14 * grow, 0.2 * grow, max(0.0, f - 0.35) / 0.65


def render_chest_ct(rng: np.random.Generator, nodules: int, *, paint_findings: bool = True) -> Rendering:
    """Axial chest CT slices (HU) with *nodules* solid lung nodules."""
    size = CT_SIZE
    n = int(rng.integers(4, 7))
    spacing = float(rng.uniform(340.0, 400.0)) / size
    slice_mm = 5.0
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    cx, cy = size / 2 + float(rng.uniform(-4, 4)), size * 0.52
    body_ax, body_ay = size * float(rng.uniform(0.4, 0.45)), size * float(rng.uniform(0.28, 0.32))
    fat = float(rng.uniform(5.0, 10.0))
    spheres: list[_Sphere] = []
    for _ in range(nodules):
        spheres.append(_place_nodule(rng, spheres, n=n, slice_mm=slice_mm, spacing=spacing, cx=cx, cy=cy,
                                     size=size))
    textures = [smooth_noise(rng, (size, size), 6) for _ in range(n)]
    grains = [rng.standard_normal((size, size)).astype(np.float32) for _ in range(n)]
    vessels = [rng.uniform(0, 1, size=(30, 3)) for _ in range(n)]

    images: list[np.ndarray] = []
    seen: list[tuple[int, float, int, tuple[int, int, int, int]]] = []  # (nodule, radius, slice, box)
    for k in range(n):
        dx, dy, ax, ay, heart = _ct_lungs(k, n)
        image = np.full((size, size), -1000.0, dtype=np.float32)
        body = ellipse_value(y, x, cx, cy, ax=body_ax, ay=body_ay)
        image[body < 1.0] = -100.0
        image[ellipse_value(y, x, cx, cy, ax=body_ax - fat, ay=body_ay - fat) < 1.0] = 40.0
        for j in range(14):  # ribs around the chest wall
            angle = np.pi * (j / 13.0) * 1.6 - np.pi * 0.8 - np.pi / 2
            rx, ry = cx + (body_ax - fat - 6) * np.cos(angle), cy + (body_ay - fat - 6) * np.sin(angle)
            image[ellipse_value(y, x, rx, ry, ax=4.0, ay=2.5) < 1.0] = 700.0
        lung = np.zeros((size, size), dtype=bool)
        for sign in (-1.0, 1.0):
            lung |= ellipse_value(y, x, cx + sign * dx * size, cy + dy * size, ax=ax * size, ay=ay * size) < 1.0
        heart_axes = {"ax": 0.13 * size * heart + 1, "ay": 0.1 * size * heart + 1}
        heart_mask = (ellipse_value(y, x, cx + 0.05 * size, cy - 0.02 * size, **heart_axes) < 1.0 if heart > 0
                      else np.zeros_like(lung))
        lung &= ~heart_mask & (np.abs(x - cx) > size * 0.05)
        image[lung] = -850.0 + 25.0 * textures[k][lung]
        for vx, vy, vr in vessels[k]:
            px, py = cx + (vx - 0.5) * 2 * (dx + ax) * size, cy + (vy - 0.5) * 2 * ay * size
            if lung[int(np.clip(py, 0, size - 1)), int(np.clip(px, 0, size - 1))]:
                r = 0.8 + 1.7 * vr
                image[(ellipse_value(y, x, px, py, ax=r, ay=r) < 1.0) & lung] = 30.0
        image[heart_mask] = 45.0
        vessel = 0.04 * size
        image[ellipse_value(y, x, cx + 0.05 * size, cy - 0.12 * size, ax=vessel, ay=vessel) < 1.0] = 50.0  # aorta
        image[ellipse_value(y, x, cx - 0.01 * size, cy + 0.19 * size, ax=vessel, ay=vessel) < 1.0] = 50.0
        vertebra = ellipse_value(y, x, cx, cy + 0.2 * size, ax=0.07 * size, ay=0.06 * size)
        image[vertebra < 1.0] = 700.0
        image[vertebra < 0.7] = 300.0
        image[ellipse_value(y, x, cx, cy + 0.29 * size, ax=0.025 * size, ay=0.025 * size) < 1.0] = 10.0
        for index, sphere in enumerate(spheres):
            r = sphere.section_px(k * slice_mm, spacing)
            if r <= 0:
                continue
            alpha = np.clip(r + 0.5 - np.sqrt((x - sphere.cx) ** 2 + (y - sphere.cy) ** 2), 0.0, 1.0) * lung
            if paint_findings:
                np.copyto(image, image * (1 - alpha) + 35.0 * alpha, where=alpha > 0)
            box = bbox(alpha > 0)
            if box is not None:
                seen.append((index, r, k, box))
        images.append(image + 12.0 * grains[k])

    def drawn(i: int, k: int, box: tuple[int, int, int, int]) -> DrawnFinding:
        return DrawnFinding("nodule", box, spheres[i].side, _lobe(spheres[i].side, k, n), image_index=k,
                            size_mm=2 * spheres[i].radius_mm)

    largest = {i: max((s for s in seen if s[0] == i), key=lambda s: s[1]) for i in sorted({s[0] for s in seen})}
    findings = [drawn(i, k, box) for i, _, k, box in largest.values()]
    sections = [drawn(i, k, box) for i, r, k, box in seen if r >= SECTION_MIN_RADIUS_PX or k == largest[i][2]]
    return Rendering(images, findings, spacing, [k * slice_mm for k in range(n)], sections=sections)


def _place_nodule(rng: np.random.Generator, others: list[_Sphere], *, n: int, slice_mm: float, spacing: float,
                  cx: float, cy: float, size: int) -> _Sphere:
    """A nodule wholly inside a lung on its central slice, apart from the other nodules."""
    radius_mm = float(rng.uniform(3.0, 9.0))
    r = radius_mm / spacing
    for _ in range(200):
        k = int(rng.integers(0, n))
        dx, dy, ax, ay, heart = _ct_lungs(k, n)
        sign = float(rng.choice([-1.0, 1.0]))
        lx, ly = cx + sign * dx * size, cy + dy * size
        px = float(rng.uniform(lx - ax * size, lx + ax * size))
        py = float(rng.uniform(ly - ay * size, ly + ay * size))
        inside = ellipse_value(np.float32(py), np.float32(px), lx, ly, ax=ax * size - r - 2, ay=ay * size - r - 2) < 1
        clear_of_heart = heart == 0 or ellipse_value(np.float32(py), np.float32(px), cx + 0.05 * size,
                                                     cy - 0.02 * size, ax=0.13 * size * heart + r + 3,
                                                     ay=0.1 * size * heart + r + 3) >= 1.0
        medial_ok = abs(px - cx) > size * 0.05 + r + 2
        apart = all(np.hypot(px - o.cx, py - o.cy) > r + o.radius_mm / spacing + 4 or
                    abs(k * slice_mm - o.z) > radius_mm + o.radius_mm for o in others)
        if inside and clear_of_heart and medial_ok and apart:
            return _Sphere(_side_of(px, cx), px, py, k * slice_mm + float(rng.uniform(-1.5, 1.5)), radius_mm)
    raise RuntimeError(f"no room for nodule {len(others) + 1} in a {n}-slice CT phantom after 200 tries")


def _lobe(side: str, k: int, n: int) -> str:
    f = (k + 0.5) / n
    if f < 0.4:
        return "upper lobe"
    if f > 0.65:
        return "lower lobe"
    return "middle lobe" if side == "right" else "lingula"


# --- brain MR ------------------------------------------------------------------------------------------------


def render_brain_mr(rng: np.random.Generator, tumour: bool, *, paint_findings: bool = True) -> Rendering:
    """Axial FLAIR-like brain MR slices, with a tumour and its surrounding oedema when *tumour*."""
    size = MR_SIZE
    n = int(rng.integers(3, 6))
    spacing = float(rng.uniform(220.0, 240.0)) / size
    slice_mm = 6.0
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    cx, cy = size / 2 + float(rng.uniform(-3, 3)), size / 2 + float(rng.uniform(-3, 3))
    head_ax, head_ay = size * float(rng.uniform(0.34, 0.38)), size * float(rng.uniform(0.42, 0.45))
    gray, white = float(rng.uniform(480, 540)), float(rng.uniform(400, 440))
    sphere = None
    oedema_factor = float(rng.uniform(1.7, 2.5))
    if tumour:
        k0 = int(rng.integers(0, n))
        radius_mm = float(rng.uniform(7.0, 16.0))
        reach = radius_mm * oedema_factor / spacing
        angle = float(rng.uniform(0, 2 * np.pi))
        dist = float(rng.uniform(0.25, 0.55))
        px = cx + np.cos(angle) * dist * (head_ax * 0.8 - reach)
        py = cy + np.sin(angle) * dist * (head_ay * 0.8 - reach)
        if abs(px - cx) < reach * 0.6 + 4:  # keep it in one hemisphere
            px = cx + np.sign(px - cx or 1.0) * (reach * 0.6 + 4)
        sphere = _Sphere(_side_of(px, cx), float(px), float(py), k0 * slice_mm + float(rng.uniform(-2, 2)),
                         radius_mm)
    oedema_noise = smooth_noise(rng, (size, size), 10)
    textures = [smooth_noise(rng, (size, size), 8) for _ in range(n)]
    grains = [rng.standard_normal((size, size)).astype(np.float32) for _ in range(n)]

    images: list[np.ndarray] = []
    seen: list[tuple[float, int, tuple[int, int, int, int], tuple[int, int, int, int]]] = []
    for k in range(n):
        f = (k + 0.5) / n
        s = 0.92 + 0.08 * np.sin(np.pi * (0.25 + 0.5 * f))
        ax, ay = head_ax * s, head_ay * s
        image = np.zeros((size, size), dtype=np.float32)
        head = ellipse_value(y, x, cx, cy, ax=ax, ay=ay)
        image[head < 1.0] = 380.0
        image[head < 0.86] = 40.0  # skull
        image[head < 0.74] = 90.0  # CSF rim
        brain = head < 0.7
        image[brain] = gray + 20.0 * textures[k][brain]
        image[head < 0.5] = white + 15.0 * textures[k][head < 0.5]
        for sign in (-1.0, 1.0):
            ventricle = ellipse_value(y, x, cx + sign * 0.05 * size, cy - 0.02 * size, ax=0.028 * size,
                                      ay=0.11 * size * (0.6 + 0.5 * np.sin(np.pi * f)))
            image[ventricle < 1.0] = 70.0
        image[(np.abs(x - cx) < 1.0) & brain & (np.abs(y - cy) > 0.15 * size)] = 150.0  # falx
        if sphere is not None:
            r = sphere.section_px(k * slice_mm, spacing)
            rho = np.sqrt((x - sphere.cx) ** 2 + (y - sphere.cy) ** 2)
            tumour_mask = (rho < r) & brain
            reach = oedema_factor * r * (1.0 + 0.2 * oedema_noise)
            hemisphere = (x - cx) * (sphere.cx - cx) > 1.0  # the falx stops oedema at the midline
            oedema_mask = (rho < reach) & brain & hemisphere & ~tumour_mask if r > 0 else np.zeros_like(brain)
            if paint_findings:
                image[oedema_mask] = 700.0 + 25.0 * textures[k][oedema_mask]
                image[tumour_mask] = 620.0
                image[tumour_mask & (rho < 0.55 * r)] = 260.0  # necrotic core
            tumour_box, oedema_box = bbox(tumour_mask), bbox(oedema_mask)
            if tumour_box and oedema_box:
                seen.append((r, k, tumour_box, oedema_box))
        images.append(np.clip(image + 8.0 * grains[k], 0.0, None))
    findings: list[DrawnFinding] = []
    sections: list[DrawnFinding] = []
    if sphere is not None and seen:
        largest = max(seen, key=lambda s: s[0])[1]  # the slice of the largest section
        lobe = _brain_lobe(sphere, cx, cy, head_ax, head_ay)
        for r, k, tumour_box, oedema_box in seen:
            pair = [DrawnFinding("tumor", tumour_box, sphere.side, lobe, image_index=k, size_mm=2 * sphere.radius_mm),
                    DrawnFinding("edema", oedema_box, sphere.side, lobe, image_index=k)]
            if k == largest:
                findings = pair
            if r >= SECTION_MIN_RADIUS_PX or k == largest:
                sections.extend(pair)
    return Rendering(images, findings, spacing, [k * slice_mm for k in range(n)], sections=sections)


def _brain_lobe(sphere: _Sphere, cx: float, cy: float, ax: float, ay: float) -> str:
    forward = (sphere.cy - cy) / ay  # rows run to the posterior
    if forward < -0.2:
        return "frontal lobe"
    if forward > 0.3:
        return "occipital lobe"
    return "temporal lobe" if abs(sphere.cx - cx) / ax > 0.45 else "parietal lobe"
