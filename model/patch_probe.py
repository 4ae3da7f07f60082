"""Training-only patch supervision of the vision encoder: which finding covers each ViT patch.

No pretrained EVA exists here, so the embedded model's vision encoder learns from scratch, and through the
language loss alone it learns slowly where a finding is (the answer's box tokens are a thin signal). During
training two linear heads read every patch token after ``ln_vision``:

* *labels* — per label, whether a truth box covers that patch: binary cross-entropy, the mean over positive
  patches and the mean over negative ones weighted equally (a nodule marks one patch of 256, so a plain mean
  would hardly feel it);
* *box* — on every patch a box covers, that box's corners on the 0–1 scale (L1): the patch token then carries
  the numbers the language model writes as ``{<x1><y1><x2><y2>}``, which it only has to copy.

The heads are not part of the model: they are never saved in the model folder, inference never runs them, and
the architecture stays MiniGPT-Med's.

A patch is positive for a label when a box of that label covers at least :data:`MIN_COVER` of the patch, or
when the box's centre lies in the patch (so a box smaller than a patch still marks one). Where boxes overlap, a
patch's box target is the smallest box covering it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.prompts import BOX_GRID, CT_LABELS, MR_LABELS, RADIOGRAPH_LABELS, GridBox

PROBE_LABELS: tuple[str, ...] = tuple(dict.fromkeys((*RADIOGRAPH_LABELS, *CT_LABELS, *MR_LABELS)))
MIN_COVER = 0.25  # fraction of a patch a box must cover to mark it

Regions = Sequence[tuple[str, GridBox]]


def _covered(box: GridBox, grid: int) -> Tensor:
    """(grid, grid) bool: the patches *box* marks (see the module docstring)."""
    step = BOX_GRID / grid
    edges = torch.arange(grid + 1, dtype=torch.float32) * step  # (grid + 1,) patch edges on the 0–100 grid
    cover_x = (edges[1:].clamp(max=box.x2) - edges[:-1].clamp(min=box.x1)).clamp(min=0) / step  # (grid,)
    cover_y = (edges[1:].clamp(max=box.y2) - edges[:-1].clamp(min=box.y1)).clamp(min=0) / step  # (grid,)
    covered = cover_y[:, None] * cover_x[None, :] >= MIN_COVER  # (grid, grid)
    covered[min(grid - 1, int((box.y1 + box.y2) / 2 / step)), min(grid - 1, int((box.x1 + box.x2) / 2 / step))] = True
    return covered


def patch_targets(regions: Regions, grid: int) -> Tensor:
    """(grid * grid, len(PROBE_LABELS)) 0/1 targets of one image, patches row-major as the ViT orders them."""
    targets = torch.zeros(grid, grid, len(PROBE_LABELS))
    for label, box in regions:
        if label not in PROBE_LABELS:
            raise ValueError(f"region label {label!r} must be one of {', '.join(PROBE_LABELS)}")
        k = PROBE_LABELS.index(label)
        targets[..., k] = torch.maximum(targets[..., k], _covered(box, grid).float())
    return targets.reshape(grid * grid, len(PROBE_LABELS))


def patch_boxes(regions: Regions, grid: int) -> tuple[Tensor, Tensor]:
    """``(boxes (grid * grid, 4), marked (grid * grid,))``: per patch the smallest box covering it, 0–1 scale."""
    boxes = torch.zeros(grid, grid, 4)
    area = torch.full((grid, grid), float("inf"))
    for _, box in regions:
        size = float((box.x2 - box.x1) * (box.y2 - box.y1))
        here = _covered(box, grid) & (area > size)
        boxes[here] = torch.tensor(box.as_tuple(), dtype=torch.float32) / BOX_GRID
        area[here] = size
    return boxes.reshape(grid * grid, 4), torch.isfinite(area).reshape(grid * grid)


class PatchProbe(nn.Module):
    """The two heads of the module docstring; :meth:`loss` is their summed loss."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, len(PROBE_LABELS))
        self.box = nn.Linear(width, 4)

    def forward(self, patches: Tensor) -> Tensor:
        return self.head(patches)  # (B, N, C) → (B, N, L)

    def loss(self, patches: Tensor, regions: Sequence[Regions | None], grid: int) -> Tensor:
        """Loss over the images whose *regions* are known (None: a montage, no per-patch truth)."""
        if patches.shape[0] != len(regions):
            raise ValueError(f"got {patches.shape[0]} images of patch tokens but {len(regions)} region lists")
        if patches.shape[1] != grid * grid:
            raise ValueError(f"got {patches.shape[1]} patch tokens, expected {grid * grid} (grid {grid})")
        rows = [i for i, r in enumerate(regions) if r is not None]
        if not rows:
            return patches.new_zeros(())
        known = patches[rows].float()  # (b, N, C)
        targets = torch.stack([patch_targets(regions[i], grid) for i in rows]).to(patches.device)  # (b, N, L)
        each = F.binary_cross_entropy_with_logits(self(known), targets, reduction="none")  # (b, N, L)
        positive = targets > 0
        loss = each[~positive].mean()
        if positive.any():
            loss = (loss + each[positive].mean()) / 2
        pairs = [patch_boxes(regions[i], grid) for i in rows]
        marked = torch.stack([m for _, m in pairs]).to(patches.device)  # (b, N)
        if marked.any():
            boxes = torch.stack([b for b, _ in pairs]).to(patches.device)  # (b, N, 4)
            predicted = torch.sigmoid(self.box(known))  # (b, N, 4)
            loss = loss + F.l1_loss(predicted[marked], boxes[marked])
        return loss
