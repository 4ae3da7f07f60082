"""EVA ViT image encoder in plain torch, with parameter names laid out like the public ``eva_vit_g.pth``.

State-dict layout (so the BLIP-2/MiniGPT-4 file loads with strict checking):

    patch_embed.proj.{weight,bias}      Conv2d(3, C, kernel=patch, stride=patch)
    cls_token                           (1, 1, C)
    pos_embed                           (1, 1 + grid², C)
    blocks.N.norm1.{weight,bias}        LayerNorm(C, eps=1e-6)
    blocks.N.attn.qkv.weight            (3C, C), no bias tensor: the bias is [q_bias, 0, v_bias]
    blocks.N.attn.q_bias / v_bias       (C,)
    blocks.N.attn.proj.{weight,bias}
    blocks.N.norm2.{weight,bias}
    blocks.N.mlp.fc1 / fc2.{weight,bias} hidden = int(C * mlp_ratio)

There is no final norm and no head: MiniGPT puts its own ``ln_vision`` LayerNorm after the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size}×{self.image_size} pixels, got {tuple(images.shape[-2:])}"
            )
        x = self.proj(images)  # (B, C, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, g*g, C), row-major patch order


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape  # (B, N, C)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # (3C,): keys have no bias
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, C/H)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C/H), as EVA
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """``forward(images (B, 3, S, S)) -> (B, 1 + grid², C)``: CLS token first, then patches row by row."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """EVA's initialisation: truncated normal (std 0.02), zero biases, output projections scaled by depth."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_((2.0 * layer_id) ** 0.5)
            block.mlp.fc2.weight.div_((2.0 * layer_id) ** 0.5)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images.to(self.pos_embed.dtype))  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat((cls, x), dim=1) + self.pos_embed  # (B, 1+N, C)
        for block in self.blocks:
            x = block(x)
        return x  # (B, 1+N, C)


def interpolate_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """Resize ``(1, 1 + g0², C)`` position embeddings to ``(1, 1 + grid², C)`` (bicubic; CLS kept as is).

    This is how MiniGPT uses the 224-pixel EVA weights (16×16 grid) at 448 pixels (32×32 grid).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + g*g, C), got {tuple(pos_embed.shape)}")
    patches = pos_embed.shape[1] - 1
    old = round(patches**0.5)
    if old * old != patches:
        raise ValueError(f"pos_embed has {patches} patch positions, which is not a square grid")
    if old == grid:
        return pos_embed
    cls, tokens = pos_embed[:, :1], pos_embed[:, 1:].float()  # (1, 1, C), (1, g0², C)
    channels = tokens.shape[-1]
    tokens = tokens.reshape(1, old, old, channels).permute(0, 3, 1, 2)  # (1, C, g0, g0)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)  # (1, C, g, g)
    tokens = tokens.permute(0, 2, 3, 1).reshape(1, grid * grid, channels)  # (1, g², C)
    return torch.cat((cls, tokens.to(pos_embed.dtype)), dim=1)
