"""Decode every image once into a uint8 array of the configured input size.

The decoded split is cached as a .npy file keyed by the image list, its file
sizes/mtimes and the size, so a second run (or a resumed one) starts at once.
Corrupt or unreadable images are skipped with a printed count; more than
`max_bad_fraction` of them fails the run. Grayscale, palette and RGBA images
are converted to RGB (counted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxreid.data.datasets import DataError, Record


@dataclasses.dataclass
class DecodedSplit:
    """uint8 images (N, H, W, 3) and the records they belong to (re-indexed
    0..N-1 when bad images were skipped)."""

    images: np.ndarray
    records: list[Record]
    num_bad: int = 0
    num_converted: int = 0

    @property
    def cameras(self) -> np.ndarray:
        return np.asarray([r.camera for r in self.records], dtype=np.int32)

    @property
    def pids(self) -> np.ndarray:
        return np.asarray([r.pid for r in self.records], dtype=np.int32)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]


# 16-bit integer modes: full scale 65535 -> 255.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(image, path: str):
    """Any PIL mode as an RGB image. 16-bit and 32-bit integer images are scaled
    to 8 bits (convert("RGB") would clip them to white); float images have no
    agreed range and are refused by name."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode != "I" or values.max(initial=0) > 255 else 255.0
        if image.mode == "I" and (values.min(initial=0) < 0 or values.max(initial=0) > 65535):
            raise DataError(
                f"image {path!r} is 32-bit integer with values outside 0-65535; "
                "save it as 8-bit RGB"
            )
        gray = np.round(values * (255.0 / full_scale)).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    if image.mode == "F":
        raise DataError(f"image {path!r} is floating point (mode F); save it as 8-bit RGB")
    return image.convert("RGB")


def decode_image(path: str, height: int, width: int) -> tuple[np.ndarray, bool]:
    """Reads one image as RGB uint8 (height, width, 3), bilinear resize.

    Returns (pixels, converted) where converted tells that the file was not
    RGB. Raises DataError naming the file when it cannot be decoded (an image
    above PIL's decompression-bomb limit included).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        source = path
        if path.startswith("lmdb:"):  # a crop inside LUPerson's database
            from jaxreid.data.luperson import image_bytes

            source = io.BytesIO(image_bytes(path))
        with Image.open(source) as image:
            image.load()
            converted = image.mode != "RGB"
            if converted:
                image = _to_rgb(image, path)
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8), converted
    except FileNotFoundError as e:
        raise DataError(f"image {path!r} does not exist; restore it or remove it") from e
    except Image.DecompressionBombError as e:
        raise DataError(
            f"image {path!r} is larger than PIL's decompression-bomb limit ({e}); "
            "downscale or delete it"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"cannot decode image {path!r} ({type(e).__name__}: {e}); replace or delete the file"
        ) from e


def _cache_key(records: Sequence[Record], height: int, width: int) -> str:
    digest = hashlib.sha256(f"v2:{height}x{width}".encode())  # v2: 16-bit scaling
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{r.path}|{stamp}|{r.pid}|{r.camera}\n".encode())
    return digest.hexdigest()[:24]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=total < 2000 or None, file=sys.stderr)


def decode_split(
    records: Sequence[Record],
    height: int,
    width: int,
    *,
    cache_dir: str | None = None,
    max_bad_fraction: float = 0.01,
    num_threads: int | None = None,
    desc: str = "decode",
) -> DecodedSplit:
    """Decodes `records` once (threads; PIL releases the GIL while decoding).

    Bad images are skipped and counted; if more than `max_bad_fraction` of the
    split is bad the run stops with DataError naming the first bad file.
    """
    if not records:
        raise DataError(f"nothing to decode for {desc}: the split is empty")
    cache_path = None
    if cache_dir:
        cache_path = os.path.join(cache_dir, f"{desc}-{_cache_key(records, height, width)}")
        if os.path.exists(cache_path + ".npy") and os.path.exists(cache_path + ".json"):
            with open(cache_path + ".json") as f:
                meta = json.load(f)
            images = np.load(cache_path + ".npy", mmap_mode=None)
            kept = [records[i] for i in meta["kept"]]
            return DecodedSplit(
                images=images,
                records=[dataclasses.replace(r, index=i) for i, r in enumerate(kept)],
                num_bad=meta["num_bad"],
                num_converted=meta["num_converted"],
            )

    images = np.zeros((len(records), height, width, 3), dtype=np.uint8)
    ok = np.zeros(len(records), dtype=bool)
    converted = np.zeros(len(records), dtype=bool)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            images[i], converted[i] = decode_image(records[i].path, height, width)
            ok[i] = True
        except DataError as e:
            errors.append(str(e))

    threads = num_threads or min(16, (os.cpu_count() or 1) * 2)
    with _progress(len(records), desc) as bar, ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(work, range(len(records))):
            bar.update(1)

    num_bad = int((~ok).sum())
    if num_bad:
        fraction = num_bad / len(records)
        first = sorted(errors)[0]
        if fraction > max_bad_fraction:
            raise DataError(
                f"{num_bad} of {len(records)} images of {desc} could not be decoded "
                f"({fraction:.1%} > max_bad_fraction {max_bad_fraction:.1%}); first: {first}"
            )
        print(
            f"warning: skipped {num_bad} unreadable image(s) of {desc}; first: {first}",
            file=sys.stderr,
        )
    num_converted = int(converted.sum())
    if num_converted:
        first = records[int(np.flatnonzero(converted)[0])].path
        logging.warning(
            "%s: converted %d non-RGB image(s) to RGB (first: %s)", desc, num_converted, first
        )
    kept_ids = np.flatnonzero(ok)
    images = images[kept_ids] if num_bad else images
    kept = [dataclasses.replace(records[i], index=j) for j, i in enumerate(kept_ids)]
    if cache_path:
        _write_cache(cache_path, images, kept_ids, num_bad, num_converted)
    return DecodedSplit(images, kept, num_bad, num_converted)


def _write_cache(path: str, images: np.ndarray, kept, num_bad: int, num_converted: int) -> None:
    """Atomic: a run killed while writing never leaves a truncated cache."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as f:
        np.save(f, images)
    os.replace(f.name, path + ".npy")
    meta = {"kept": [int(i) for i in kept], "num_bad": num_bad, "num_converted": num_converted}
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as f:
        json.dump(meta, f)
    os.replace(f.name, path + ".json")
