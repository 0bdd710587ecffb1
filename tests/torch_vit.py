"""An independent PyTorch transcription of a ViT with TransReID's options
(test reference only).

Written from the ViT paper and the published layouts: timm's state-dict keys
(patch_embed.proj, cls_token, pos_embed, blocks.N.norm1 / attn.qkv / attn.proj /
norm2 / mlp.fc1 / mlp.fc2, norm, head), TransReID's camera embedding
(sie_embed, (cameras, 1, C), added to every token times a factor) and
TransReID-SSL's IBN conv stem (patch_embed.conv.0..8). Plain torch.nn layers
and an explicit softmax attention, so the forward is torch's own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


class IBN(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.half = channels // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x):
        a, b = x[:, : self.half], x[:, self.half :]
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], 1)


class PatchEmbed(nn.Module):
    def __init__(self, width, stride, conv_stem):
        super().__init__()
        if conv_stem:
            self.conv = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                IBN(64),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, 1, 1, bias=False),
                IBN(64),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, 1, 1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
            )
            self.proj = nn.Conv2d(64, width, 8, stride // 2)
        else:
            self.conv = None
            self.proj = nn.Conv2d(3, width, 16, stride)

    def forward(self, x):
        if self.conv is not None:
            x = self.conv(x)
        return self.proj(x)  # (B, C, gh, gw)


class Attention(nn.Module):
    def __init__(self, width, heads, fused=False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:  # what a PyTorch user writes for speed (benchmarks/torch_reference.py)
            return self.proj(
                F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
            )
        weights = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, fused=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, fused)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width)

    def forward(self, x, scales=None):
        """`scales`: optional per-sample factors (B,) of the two residual
        branches (drop-path's 0 or 1 / keep-probability)."""
        a, m = (1.0, 1.0) if scales is None else (s[:, None, None] for s in scales)
        x = x + a * self.attn(self.norm1(x))
        return x + m * self.mlp(self.norm2(x))


class TorchViT(nn.Module):
    """forward(x normalised (B, 3, H, W), cameras=None) -> final-norm tokens
    (B, 1 + gh * gw, C), [CLS] first. `fused_attention`: torch's
    scaled_dot_product_attention instead of the explicit softmax (speed)."""

    def __init__(
        self,
        name="vit_tiny",
        depth=12,
        grid=(16, 8),
        stride=16,
        conv_stem=False,
        cameras=0,
        camera_weight=3.0,
        num_classes=0,
        fused_attention=False,
    ):
        super().__init__()
        width, heads = SIZES[name]
        self.patch_embed = PatchEmbed(width, stride, conv_stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], width))
        self.sie_embed = nn.Parameter(torch.zeros(cameras, 1, width)) if cameras else None
        self.camera_weight = camera_weight
        self.blocks = nn.ModuleList([Block(width, heads, fused_attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes) if num_classes else None

    def forward(self, x, cameras=None, scales=None):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        if self.sie_embed is not None:
            side = (
                self.sie_embed.mean(0, keepdim=True) if cameras is None else self.sie_embed[cameras]
            )
            x = x + self.camera_weight * side
        for index, block in enumerate(self.blocks):
            x = block(x, None if scales is None else scales[index])
        return self.norm(x)
