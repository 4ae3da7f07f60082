"""Training-only patch supervision of the vision encoder: which finding covers each ViT patch.

No pretrained EVA exists here, so the embedded model's vision encoder learns from scratch, and through the
language loss alone it learns slowly where a finding is (the answer's box tokens are a thin signal). During
training a linear head reads every patch token after ``ln_vision`` and predicts, per label, whether a truth box
covers that patch (binary cross-entropy). The head is not part of the model: it is never saved in the model
folder, inference never runs it, and the architecture stays MiniGPT-Med's.

A patch is positive for a label when a box of that label covers at least :data:`MIN_COVER` of the patch, or
when the box's centre lies in the patch (so a box smaller than a patch still marks one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.phantom_anatomy import CT_LABELS, MR_LABELS, RADIOGRAPH_LABELS
from model.prompts import BOX_GRID, GridBox

PROBE_LABELS: tuple[str, ...] = tuple(dict.fromkeys((*RADIOGRAPH_LABELS, *CT_LABELS, *MR_LABELS)))
MIN_COVER = 0.25  # fraction of a patch a box must cover to mark it
POS_WEIGHT = 4.0  # positives are rare (a nodule marks one patch of 256)

Regions = Sequence[tuple[str, GridBox]]


def patch_targets(regions: Regions, grid: int) -> Tensor:
    """(grid * grid, len(PROBE_LABELS)) 0/1 targets of one image, patches row-major as the ViT orders them."""
    targets = torch.zeros(grid, grid, len(PROBE_LABELS))
    step = BOX_GRID / grid
    edges = torch.arange(grid + 1, dtype=torch.float32) * step  # (grid + 1,) patch edges on the 0–100 grid
    for label, box in regions:
        if label not in PROBE_LABELS:
            raise ValueError(f"region label {label!r} must be one of {', '.join(PROBE_LABELS)}")
        k = PROBE_LABELS.index(label)
        cover_x = (torch.minimum(edges[1:], torch.tensor(float(box.x2)))
                   - torch.maximum(edges[:-1], torch.tensor(float(box.x1)))).clamp(min=0) / step  # (grid,)
        cover_y = (torch.minimum(edges[1:], torch.tensor(float(box.y2)))
                   - torch.maximum(edges[:-1], torch.tensor(float(box.y1)))).clamp(min=0) / step  # (grid,)
        covered = cover_y[:, None] * cover_x[None, :] >= MIN_COVER  # (grid, grid)
        row = min(grid - 1, int((box.y1 + box.y2) / 2 / step))
        col = min(grid - 1, int((box.x1 + box.x2) / 2 / step))
        covered[row, col] = True
        targets[..., k] = torch.maximum(targets[..., k], covered.float())
    return targets.reshape(grid * grid, len(PROBE_LABELS))


class PatchProbe(nn.Module):
    """Linear(width → labels) over patch tokens; :meth:`loss` is the masked BCE of the module docstring."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, len(PROBE_LABELS))

    def forward(self, patches: Tensor) -> Tensor:
        return self.head(patches)  # (B, N, C) → (B, N, L)

    def loss(self, patches: Tensor, regions: Sequence[Regions | None], grid: int) -> Tensor:
        """Mean BCE over the images whose *regions* are known (None: a montage, no per-patch truth)."""
        if patches.shape[0] != len(regions):
            raise ValueError(f"got {patches.shape[0]} images of patch tokens but {len(regions)} region lists")
        if patches.shape[1] != grid * grid:
            raise ValueError(f"got {patches.shape[1]} patch tokens, expected {grid * grid} (grid {grid})")
        rows = [i for i, r in enumerate(regions) if r is not None]
        if not rows:
            return patches.new_zeros(())
        targets = torch.stack([patch_targets(regions[i], grid) for i in rows]).to(patches.device)  # (b, N, L)
        logits = self(patches[rows].float())  # (b, N, L)
        weight = torch.tensor(POS_WEIGHT, device=patches.device)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
