"""PyTorch transcriptions for the speed benchmark (benchmarks/train_step.py):
the same networks, heads, losses, augmentations and optimizer as jaxreid's
configs, as a PyTorch user would write the loop on a CPU: channels-last
layout, the augmentation vectorised over the batch tensor (no per-image
Python), as many threads as cores; `compiled=True` adds torch.compile. Speed only: the weights
are random and EfficientNet pads symmetrically (torch's own padding) where
the TF weights need "SAME"; the FLOPs are the same.

torch is an optional benchmark dependency; nothing in jaxreid imports this.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from jax_step import time_runs  # noqa: E402
from torch_osnet import TorchOSNet  # noqa: E402  (the test suite's torchreid transcription)
from torch_vit import TorchViT  # noqa: E402  (the test suite's ViT transcription)

# --- backbones -------------------------------------------------------------

LITE0_STAGES = (  # (repeats, kernel, stride, expand, in, out), as jaxreid
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, eps=1e-5):
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps),
    ]


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers = [*conv_bn(cin, mid, eps=1e-3), nn.ReLU6()] if expand != 1 else []
        layers += [*conv_bn(mid, mid, k, stride, groups=mid, eps=1e-3), nn.ReLU6()]
        layers += conv_bn(mid, cout, eps=1e-3)
        self.body = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    num_features = 1280

    def __init__(self, last_stride: int = 2):
        super().__init__()
        layers = [*conv_bn(3, 32, 3, 2, eps=1e-3), nn.ReLU6()]
        for index, (repeats, k, stride, expand, cin, cout) in enumerate(LITE0_STAGES):
            stride = last_stride if index == 5 else stride
            for r in range(repeats):
                layers.append(
                    MBConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand)
                )
        layers += [*conv_bn(320, 1280, eps=1e-3), nn.ReLU6()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            *conv_bn(cin, width),
            nn.ReLU(),
            *conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *conv_bn(width, cout),
        )
        self.down = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    num_features = 2048

    def __init__(self, last_stride: int = 1):
        super().__init__()
        layers = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, last_stride)):
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = 4 * width
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class OSNetFeatures(nn.Module):
    """torchreid OSNet up to conv5 (the `fc` embedding is the head here)."""

    num_features = None

    def __init__(self, width: float = 0.25):
        super().__init__()
        channels = tuple(int(c * width) for c in (64, 256, 384, 512))
        self.net = TorchOSNet(channels)
        self.num_features = channels[-1]

    def forward(self, x):
        return self.net.featuremaps(x)


class ViTFeatures(nn.Module):
    """The test suite's ViT transcription (fused attention) returning
    ([CLS] (B, C), patch grid (B, C, gh, gw)), as jaxreid's TokenMap."""

    def __init__(self, model, height: int, width: int):
        super().__init__()
        stride, stem = model.patch_stride, model.conv_stem
        if stem:  # 7x7/2 stem, then 8x8 patches every stride / 2 pixels
            height, width, kernel, stride = (height + 1) // 2, (width + 1) // 2, 8, stride // 2
        else:
            kernel = 16
        self.grid = ((height - kernel) // stride + 1, (width - kernel) // stride + 1)
        self.net = TorchViT(
            model.backbone,
            depth=model.vit_depth or 12,
            grid=self.grid,
            stride=model.patch_stride,
            conv_stem=stem,
            fused_attention=True,
        )
        self.num_features = self.net.norm.normalized_shape[0]

    def forward(self, x):
        tokens = self.net(x)
        b, _, c = tokens.shape
        return tokens[:, 0], tokens[:, 1:].transpose(1, 2).reshape(b, c, *self.grid)


def build_backbone(name: str, last_stride: int, model=None, size=(256, 128)) -> nn.Module:
    """`model` (config.model) and `size` (height, width) serve the ViTs."""
    if name.startswith("vit_"):
        return ViTFeatures(model, *size)
    if name == "efficientnet_lite0":
        return EfficientNetLite0(last_stride)
    if name == "resnet50":
        return ResNet50(last_stride)
    if name.startswith("osnet_x"):
        return OSNetFeatures(float(name[len("osnet_x") :].replace("_", ".")))
    raise ValueError(f"no PyTorch transcription of {name!r}")


# --- heads -----------------------------------------------------------------


def gem(x, p: float = 3.0, eps: float = 1e-6):
    return x.clamp(min=eps).pow(p).mean((2, 3)).pow(1.0 / p)


class Head(nn.Module):
    """bnneck: pool -> (feature for the triplet, BN neck -> classifier / memory);
    fc: pool -> Linear + BN1d + ReLU (torchreid's embedding);
    scl: avg-pooled global + P stripes, each projected (SCL's head)."""

    def __init__(self, kind: str, dim: int, embed: int, pooling: str, classes: int, stripes: int):
        super().__init__()
        self.kind, self.pooling, self.stripes = kind, pooling, stripes
        if kind == "fc":
            self.fc = nn.Sequential(nn.Linear(dim, embed), nn.BatchNorm1d(embed), nn.ReLU())
            dim = embed
        elif kind == "scl":
            self.global_proj = nn.Sequential(nn.Linear(dim, embed), nn.BatchNorm1d(embed))
            self.stripe_proj = nn.Linear(dim, embed // stripes)
            dim = embed
        elif embed:
            self.embed = nn.Linear(dim, embed)
            dim = embed
        self.neck = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, classes, bias=False) if classes else None

    def forward(self, fmap):
        cls = None
        if isinstance(fmap, tuple):  # a ViT: ([CLS], patch grid)
            cls, fmap = fmap
        if self.pooling == "cls":
            pooled = cls
        else:
            pooled = gem(fmap) if self.pooling == "gem" else fmap.mean((2, 3))
        if self.kind == "fc":
            return {"feature": self.fc(pooled)}
        if self.kind == "scl":
            stripes = F.adaptive_avg_pool2d(fmap, (self.stripes, 1))[..., 0].transpose(1, 2)
            return {
                "global": F.normalize(self.global_proj(pooled), dim=1),
                "stripes": F.normalize(self.stripe_proj(stripes), dim=2),
            }
        feature = self.embed(pooled) if hasattr(self, "embed") else pooled
        out = {"feature": feature, "neck": self.neck(feature)}
        if self.classifier is not None:
            out["logits"] = self.classifier(out["neck"])
        return out


# --- losses ----------------------------------------------------------------


def batch_hard_triplet(x, labels, margin: float = 0.3):
    d = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    hardest_pos = (d * same).max(1).values
    hardest_neg = d.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def supervised_loss(out, labels, memory):
    ce = F.cross_entropy(out["logits"], labels, label_smoothing=0.1)
    return ce + batch_hard_triplet(out["feature"], labels), lambda: None


def cluster_nce_loss(out, labels, memory, temperature: float = 0.05):
    """ClusterNCE against the centroid memory; returns (loss, the memory's
    momentum update, to run after the backward pass)."""
    x = F.normalize(out.get("neck", out.get("feature")), dim=1)
    loss = F.cross_entropy(x @ memory["centroids"].t() / temperature, labels)

    @torch.no_grad()
    def update():
        c = memory["centroids"]
        for i, y in zip(x.detach(), labels.tolist(), strict=True):
            c[y] = F.normalize(0.1 * c[y] + 0.9 * i, dim=0)

    return loss, update


def scl_loss(out, indices, memory, k: int = 7, n: int = 500, temperature: float = 0.1):
    """SCL's core, global and stripes alike: k nearest bank rows as positives,
    the n hardest of the rest as negatives, multi-positive contrast; then the
    banks' momentum update. (The cross-camera term and the mixture bank are
    left out: small next to the network and the selection.) Returns (loss,
    the banks' update, to run after the backward pass)."""
    loss = 0.0
    for key in ("global", "stripes"):
        q = out[key]
        bank = memory[key]
        if q.dim() == 3:  # stripes: (B, P, d) -> per stripe
            q, bank = q.transpose(0, 1), bank.transpose(0, 1)
        else:
            q, bank = q[None], bank[None]
        sims = torch.einsum("pbd,pnd->pbn", q, bank)
        with torch.no_grad():
            order = sims.detach().argsort(dim=-1, descending=True)
            pos, neg = order[..., :k], order[..., k : k + n]
        pos_s = torch.gather(sims, 2, pos) / temperature
        neg_s = torch.gather(sims, 2, neg) / temperature
        all_s = torch.cat([pos_s, neg_s], dim=2)
        loss = loss - (pos_s - torch.logsumexp(all_s, dim=2, keepdim=True)).mean()

    @torch.no_grad()
    def update():
        for key in ("global", "stripes"):
            rows = memory[key]
            rows[indices] = F.normalize(0.5 * rows[indices] + 0.5 * out[key].detach(), dim=-1)

    return loss, update


# --- augmentation and the loop ---------------------------------------------


def augment(images_uint8: torch.Tensor, pad: int, erasing: float, gen: torch.Generator):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W): flip, pad + crop,
    random erasing, as jaxreid's augment (ImageNet mean / std). Written as a
    PyTorch user would for the batch tensor: every random choice drawn for the
    whole batch at once, the flip one `torch.where`, the crops one gather from
    the padded batch, the erasing one broadcast mask (no per-image Python)."""
    x = images_uint8.permute(0, 3, 1, 2).float()
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=gen)
        rows = (top + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
        cols = (left + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        x = padded[batch, torch.arange(3)[None, :, None, None], rows, cols]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    x = (x - mean) / std
    if erasing:
        eh, ew = h // 3, w // 3
        erase = torch.rand(b, generator=gen) < erasing
        top = torch.randint(0, h - eh, (b,), generator=gen)[:, None, None]
        left = torch.randint(0, w - ew, (b,), generator=gen)[:, None, None]
        ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
        inside = (ys >= top) & (ys < top + eh) & (xs >= left) & (xs < left + ew)
        x = x.masked_fill((erase[:, None, None] & inside)[:, None], 0.0)
    return x


class TorchStep:
    """A PyTorch train step (augment, forward, loss, backward, Adam, memory
    update) of the same shape as jaxreid's `config`."""

    def __init__(
        self,
        config,
        images: np.ndarray,
        identities: np.ndarray,
        memory_rows: int,
        compiled: bool = False,
    ):
        torch.manual_seed(0)
        m, t = config.model, config.train
        self.method = config.method.name
        self.backbone = build_backbone(
            m.backbone, m.last_stride, m, (config.data.height, config.data.width)
        )
        # Frozen stages (jaxreid's model.freeze_stages: stem, then conv2, ...).
        stages = ("conv1", "conv2", "conv3", "conv4")[: m.get("freeze_stages", 0)]
        for name, p in self.backbone.named_parameters():
            if any(name.startswith(f"net.{s}.") for s in stages):
                p.requires_grad_(False)
        classes = int(identities.max()) + 1 if self.method == "supervised" else 0
        head_kind = {"scl": "scl", "fc": "fc"}.get(m.head, "bnneck")
        self.head = Head(
            head_kind, self.backbone.num_features, m.embed_dim, m.pooling, classes, m.num_stripes
        )
        params = [
            p for p in [*self.backbone.parameters(), *self.head.parameters()] if p.requires_grad
        ]
        o = config.optimizer
        if o.name == "adam":
            self.opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            self.opt = torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov,
                weight_decay=o.weight_decay,
            )
        # Channels-last activations and weights: what a PyTorch user on a CPU
        # writes for a convnet (oneDNN's fast layout; Lite0 supervised b64 on a
        # 2-core Xeon 66 -> 103 img/s).
        self.backbone = self.backbone.to(memory_format=torch.channels_last)
        # torch.compile (inductor) of the network: what a user on PyTorch 2
        # writes; the first steps compile.
        self.network = (lambda x: self.head(self.backbone(x))) if not compiled else None
        if compiled:
            self.network = torch.compile(lambda x: self.head(self.backbone(x)))
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(identities)
        self.batch = t.batch_size
        self.aug = config.augment
        self.gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            shapes = {k: v.shape[1:] for k, v in self.forward(self.images[:2], train=False).items()}
        dim = shapes.get("neck", shapes.get("feature"))
        self.memory = {}
        if self.method == "scl":
            self.memory = {
                "global": F.normalize(torch.randn(memory_rows, *shapes["global"]), dim=-1),
                "stripes": F.normalize(torch.randn(memory_rows, *shapes["stripes"]), dim=-1),
            }
        elif self.method != "supervised":
            self.memory = {"centroids": F.normalize(torch.randn(memory_rows, *dim), dim=1)}

    def forward(self, x_uint8, train: bool):
        self.backbone.train(train)
        self.head.train(train)
        if train:
            x = augment(x_uint8, self.aug.pad, self.aug.erasing_prob, self.gen)
        else:
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
            x = (x_uint8.permute(0, 3, 1, 2).float() - mean) / 58.0
        return self.network(x.contiguous(memory_format=torch.channels_last))

    def run(self, i: int) -> None:
        start = (i * self.batch) % (len(self.images) - self.batch + 1)
        idx = torch.arange(start, start + self.batch)
        out = self.forward(self.images[idx], train=True)
        labels = self.labels[idx]
        if self.method == "supervised":
            loss, update = supervised_loss(out, labels, self.memory)
        elif self.method == "scl":
            loss, update = scl_loss(out, idx, self.memory)
        else:
            centroids = len(self.memory["centroids"])
            loss, update = cluster_nce_loss(out, labels % centroids, self.memory)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        update()

    def time_steps(self, warmup: int, repeats: int) -> list[float]:
        return time_runs(self.run, warmup, repeats)

    def time_extraction(self, batch: int, repeats: int) -> list[float]:
        images = self.images[:batch]
        with torch.inference_mode():
            self.forward(images, train=False)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.forward(images, train=False)
                times.append(time.perf_counter() - start)
        return times
