"""A trained model as a function from images to features.

    from jaxreid.inference import Embedder
    embedder = Embedder.from_workdir("/tmp/run")          # its config and latest checkpoint
    features = embedder.embed(["a.jpg", "b.jpg"])         # {"global": (2, D) unit rows}
    features = embedder.embed("a.jpg")                    # one path: (1, D), a batch of one
    features = embedder.embed(uint8_images)               # (N, H, W, 3), RGB
    embedder.record                                       # which model: config, step, weights

Inputs are resized to the model's input size (bilinear, as training); the
outputs are the evaluation features: "global" L2-normalised, and for SCL
models "stripes" (N, P, D/P), each stripe unit-norm. One compilation per
batch shape; the training-only classifier is never needed, so a model trained
on one dataset embeds any other.

Feature files record which model made them (`record_array` under the key
"model", written by `python -m jaxreid.extract`): the digest of its config,
its checkpoint step and the digest of its weights. `python -m jaxreid.search`
and `python -m jaxreid.evaluate` refuse to rank features of two models
against each other (`check_same_model`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


RECORD_KEY = "model"  # the key of the model record in a feature file


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def record_array(record: dict) -> np.ndarray:
    """A model record as a 0-d string array, to store in an .npz."""
    return np.asarray(json.dumps(record, sort_keys=True))


def read_record(arrays, key: str = RECORD_KEY) -> dict | None:
    """The model record stored under `key` of an .npz (or a dict of its
    arrays); None when the file has none (written before jaxreid recorded it)."""
    if key not in arrays:
        return None
    try:
        record = json.loads(str(np.asarray(arrays[key])[()]))
    except (ValueError, TypeError):
        record = None
    if not isinstance(record, dict):
        raise UserError(f"the {key!r} array is not a jaxreid model record; re-extract the features")
    return record


def describe_record(record: dict) -> str:
    """One model record in words: config digest, checkpoint step, weights digest."""
    return (
        f"config {record.get('config')}, step {record.get('step')}, weights {record.get('weights')}"
    )


def check_same_model(first: tuple[str, dict | None], second: tuple[str, dict | None]) -> str:
    """Refuses (UserError) two model records that differ, naming both; each
    argument is (where the features come from, its record or None). Returns ""
    or, when a record is missing, a one-line note that the check was skipped."""
    (where_a, a), (where_b, b) = first, second
    if a is not None and b is not None and a != b:
        raise UserError(
            f"{where_a} and {where_b} come from two models ({describe_record(a)} vs "
            f"{describe_record(b)}): distances between them are meaningless; extract both "
            "with the same run and checkpoint"
        )
    missing = [where for where, record in (first, second) if record is None]
    if not missing:
        return ""
    return (
        f"note: {' and '.join(missing)} record(s) no model (written before jaxreid recorded "
        "it, or by another tool): cannot check that the features come from one model"
    )


def check_output(path: str | None, flag: str, suffix: str = "") -> str:
    """The file an entry point will write, checked before any work: `suffix`
    appended where missing (as numpy.savez appends .npz), its folder created,
    the file writable. UserError naming `flag` and the fix otherwise."""
    if not path:
        raise UserError(f"{flag} is missing: give the file to write, e.g. {flag}=out{suffix}")
    if os.path.isdir(path) or os.path.isdir(path + suffix):
        raise UserError(
            f"{flag} {path!r} is a folder: give a file inside it, e.g. "
            f"{os.path.join(path, 'out' + suffix)}"
        )
    if suffix and not path.endswith(suffix):
        path += suffix
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        existed = os.path.exists(path)
        with open(path, "ab"):  # appends nothing: an existing file is kept as it is
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        raise UserError(
            f"{flag} {path!r} cannot be written ({e.strerror or e}); pick a writable folder"
        ) from None
    return path


class Embedder:
    """Eval-mode features of a trained model (see the module docstring);
    `step` is the checkpoint step its weights come from (None: not from a
    checkpoint)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        graphdef,
        params,
        batch_stats,
        step: int | None = None,
    ):
        self.config = config
        self.graphdef, self.params, self.batch_stats = graphdef, params, batch_stats
        self.height, self.width = int(config.data.height), int(config.data.width)
        self.step = step
        self._record: dict | None = None

    @property
    def record(self) -> dict:
        """Which model makes these features: {"config": digest of its config,
        "step": its checkpoint step, "weights": digest of its parameters and
        batch-norm statistics}; store it with `record_array`."""
        if self._record is None:
            import jax

            config = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
            weights = hashlib.sha256()
            leaves = jax.tree_util.tree_flatten_with_path((self.params, self.batch_stats))[0]
            for path, leaf in leaves:
                array = np.asarray(leaf)
                weights.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
                weights.update(np.ascontiguousarray(array).tobytes())
            self._record = {
                "config": _digest(config.encode()),
                "step": self.step,
                "weights": weights.hexdigest()[:16],
            }
        return self._record

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
        step = re.search(r" step (\d+)$", source)
        return cls(config, graphdef, params, batch_stats, int(step.group(1)) if step else None)

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
        self, images: np.ndarray | Sequence[str] | str, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Features of uint8 RGB images (N, H, W, 3) of any size, of a list of
        image files or of uint8 (H, W, 3) arrays (any sizes), or of one image
        file (a batch of one: rows of shape (1, ...)). UserError for no
        images, an empty image, a list mixing paths and arrays, or another
        dtype / shape."""
        from jaxreid.evaluate.protocol import extract

        images = self._as_batch(images)
        return extract(
            self.graphdef,
            self.params,
            self.batch_stats,
            images,
            batch_size or int(self.config.eval.batch_size),
            bool(self.config.eval.flip),
        )

    def _as_batch(self, images) -> np.ndarray:
        """uint8 (N, H, W, 3), N >= 1, of what `embed` accepts."""
        if isinstance(images, (str, os.PathLike)):
            images = [images]  # one file, not its characters
        if not isinstance(images, np.ndarray):
            items = list(images)
            is_path = [isinstance(item, (str, os.PathLike)) for item in items]
            if any(is_path) and not all(is_path):
                first = is_path.index(not is_path[0])
                raise UserError(
                    f"images mix file paths and arrays (item 0 is a "
                    f"{type(items[0]).__name__}, item {first} a {type(items[first]).__name__}): "
                    "pass a list of paths or a list / array of images"
                )
            if not items:
                raise UserError("no images to embed: pass at least one path or image")
            if all(is_path):
                images = self.load_images(items)
            elif all(isinstance(item, np.ndarray) and item.ndim == 3 for item in items):
                return np.concatenate([self._checked(item[None]) for item in items])
            else:
                try:
                    images = np.asarray(items)
                except ValueError as e:
                    raise UserError(f"images are not one array ({e}); pass uint8 arrays") from None
        return self._checked(np.asarray(images))

    def _checked(self, images: np.ndarray) -> np.ndarray:
        """`images` checked and resized to the model's input size."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserError(
                f"images must be uint8 (N, H, W, 3) RGB or file paths, got {images.dtype} "
                f"{images.shape}"
            )
        if 0 in images.shape:
            raise UserError(
                f"images of shape {images.shape}: "
                + ("no images to embed" if not len(images) else "an image of height or width 0")
                + "; pass at least one non-empty image"
            )
        if images.shape[1:3] != (self.height, self.width):
            images = self._resize(images)
        return images

    def _resize(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        return np.stack(
            [
                np.asarray(Image.fromarray(image).resize((self.width, self.height), Image.BILINEAR))
                for image in images
            ]
        )
