"""A trained model as a function from images to features.

    from jaxreid.inference import Embedder
    embedder = Embedder.from_workdir("/tmp/run")          # its config and latest checkpoint
    features = embedder.embed(["a.jpg", "b.jpg"])         # {"global": (2, D) unit rows}
    features = embedder.embed(uint8_images)               # (N, H, W, 3), RGB

Inputs are resized to the model's input size (bilinear, as training); the
outputs are the evaluation features: "global" L2-normalised, and for SCL
models "stripes" (N, P, D/P), each stripe unit-norm. One compilation per
batch shape; the training-only classifier is never needed, so a model trained
on one dataset embeds any other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from jaxreid.utils import UserError


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (WORKDIR/config.json, written by main)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(
            f"{path!r} does not exist: --workdir must be the folder of a "
            "`python -m jaxreid.main` run"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class Embedder:
    """Eval-mode features of a trained model (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, graphdef, params, batch_stats):
        self.config = config
        self.graphdef, self.params, self.batch_stats = graphdef, params, batch_stats
        self.height, self.width = int(config.data.height), int(config.data.width)

    @classmethod
    def from_checkpoint(cls, path: str, config: ml_collections.ConfigDict) -> Embedder:
        """The model of `config` with the latest checkpoint under `path` (an
        orbax manager folder: WORKDIR/checkpoints/latest or best)."""
        from jaxreid.checkpoints import load_model_for_eval

        if not os.path.isdir(path):
            raise UserError(f"checkpoint folder {path!r} does not exist")
        graphdef, params, batch_stats, source = load_model_for_eval(config, path)
        if source == "initial model":
            raise UserError(f"{path!r} holds no checkpoint; train first or pick another run")
        return cls(config, graphdef, params, batch_stats)

    @classmethod
    def from_workdir(cls, workdir: str, which: str = "latest") -> Embedder:
        """A run's model: its config.json and its `which` checkpoint (latest | best)."""
        if which not in ("latest", "best"):
            raise UserError(f"checkpoint {which!r}: choose latest or best")
        config = read_run_config(workdir)
        return cls.from_checkpoint(os.path.join(workdir, "checkpoints", which), config)

    def load_images(self, paths: Sequence[str]) -> np.ndarray:
        """uint8 (N, H, W, 3) at the model's input size; DataError names a bad file."""
        from jaxreid.data.images import decode_image

        return np.stack([decode_image(p, self.height, self.width)[0] for p in paths])

    def embed(
        self, images: np.ndarray | Sequence[str], batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Features of uint8 RGB images (N, H, W, 3) of any size, or of image files."""
        from jaxreid.evaluate.protocol import extract

        if len(images) and isinstance(images[0], (str, os.PathLike)):
            images = self.load_images(images)
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserError(
                f"images must be uint8 (N, H, W, 3) RGB or file paths, got {images.dtype} "
                f"{images.shape}"
            )
        if images.shape[1:3] != (self.height, self.width):
            images = self._resize(images)
        return extract(
            self.graphdef,
            self.params,
            self.batch_stats,
            images,
            batch_size or int(self.config.eval.batch_size),
            bool(self.config.eval.flip),
        )

    def _resize(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        return np.stack(
            [
                np.asarray(Image.fromarray(image).resize((self.width, self.height), Image.BILINEAR))
                for image in images
            ]
        )
