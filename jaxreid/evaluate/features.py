"""Batched, compiled, data-parallel feature extraction.

The forward pass is one `jax.jit` function with `apply_fn` and `flip` as static
arguments, so repeated calls with the same `apply_fn` (query set, then gallery
set; every evaluation of a training run when the weights are passed as
`params`) reuse one compilation. Batches of `batch_size` images per device
are sharded over every local device along a 1-d ("data",) mesh; the last
batch is zero-padded to the full batch so that only one shape is ever
compiled, and the padding is dropped on the host.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid.parallel import make_mesh
from jaxreid.utils import l2_normalize

ApplyFn = Callable[..., Mapping[str, jax.Array]]


def _call(apply_fn: ApplyFn, params: Any, images: jax.Array) -> dict[str, jax.Array]:
    outputs = apply_fn(images) if params is None else apply_fn(params, images)
    if not isinstance(outputs, Mapping):
        raise TypeError(f"apply_fn must return a dict of arrays, got {type(outputs).__name__}")
    return dict(outputs)


@functools.partial(jax.jit, static_argnames=("apply_fn", "flip"))
def _forward(
    params: Any, images: jax.Array, *, apply_fn: ApplyFn, flip: bool
) -> dict[str, jax.Array]:
    x = images.astype(jnp.float32)
    outputs = _call(apply_fn, params, x)
    if not flip:
        return outputs
    mirrored = _call(apply_fn, params, x[:, :, ::-1, :])
    averaged = {}
    for key, value in outputs.items():
        mean = (value + mirrored[key]) / 2
        # (B, D) and (B, P, D/P) alike: normalise along the feature axis, which
        # for stripes means every stripe on its own.
        averaged[key] = l2_normalize(mean) if mean.ndim >= 2 else mean
    return averaged


def _local_value(x: Any) -> Any:
    """A replicated array spanning several processes -> its local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError("parameters sharded across processes cannot be extracted locally")
        return x.addressable_data(0)
    return x


def extract_features(
    apply_fn: ApplyFn,
    images: np.ndarray,
    batch_size: int,
    flip: bool = False,
    *,
    params: Any = None,
    progress: bool | None = None,
    memmap_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Runs `apply_fn` over `images` in batches and returns host arrays.

    Args:
      apply_fn: maps float32 images (B, H, W, 3) in pixel scale [0, 255] to a
        dict of arrays with leading dimension B (e.g. "global", "stripes"). It
        must be hashable (any function is) and is traced once per image shape.
        With `params` given it is called as `apply_fn(params, images)`.
      images: uint8 array (N, H, W, 3), RGB; may be a memmap, or a jax.Array
        already on this process's devices.
      batch_size: images per device per step (each step takes batch_size x
        the local device count). Per device, so that every device sees the
        same shapes whatever the device count, and features are the same bits
        on 1 or 8 devices.
      flip: average the outputs of each image and its horizontal mirror, then
        L2-normalise every output with ndim >= 2 along its last axis (stripes
        of shape (B, P, D/P) are normalised stripe by stripe).
      params: optional pytree passed to `apply_fn` as a traced argument,
        replicated over the devices. Prefer this over closing over weights:
        closed-over arrays become compile-time constants, and a new closure
        per call means a new compilation.
      progress: show a tqdm bar; None shows it only when stderr is a terminal.
      memmap_dir: write each output into MEMMAP_DIR/<key>.npy (a memory map, e.g. for 10^6
        images) instead of memory.

    Returns:
      dict with the keys of `apply_fn`'s output, each a numpy array (N, ...) (a
      `np.memmap` with `memmap_dir`). Each batch is copied into the preallocated
      output as it arrives: no list of batches and no concatenated copy.
    """
    # memmaps are ndarrays and stay lazy; a jax.Array (the training images the
    # train step keeps on the devices) is sliced there, never re-uploaded.
    on_device = isinstance(images, jax.Array)
    if not on_device and not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # This process's devices only: in a multi-process run every process
    # extracts on its own (the training set is clustered on every host).
    devices = jax.local_devices()
    mesh = make_mesh(devices=devices)
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    batch = batch_size * len(devices)
    if params is not None:
        params = jax.device_put(jax.tree.map(_local_value, params), replicated)
    forward = functools.partial(_forward, apply_fn=apply_fn, flip=flip)

    num_images = images.shape[0]
    if num_images == 0:
        shapes = jax.eval_shape(
            forward, params, jax.ShapeDtypeStruct((batch, *images.shape[1:]), np.uint8)
        )
        return {k: np.zeros((0, *s.shape[1:]), s.dtype) for k, s in shapes.items()}

    from tqdm.auto import tqdm  # lazy: only needed when extracting

    # progress=None -> tqdm's own rule (disabled when not writing to a tty).
    bar = tqdm(
        total=num_images,
        unit="img",
        desc="features",
        disable=None if progress is None else not progress,
        leave=False,
    )
    collected: dict[str, np.ndarray] = {}
    filled = 0

    def collect(outputs: dict[str, jax.Array], num_valid: int) -> None:
        nonlocal filled
        for key, value in jax.device_get(outputs).items():
            value = np.asarray(value)
            if key not in collected:
                collected[key] = _output_array(
                    memmap_dir, key, (num_images, *value.shape[1:]), value.dtype
                )
            collected[key][filled : filled + num_valid] = value[:num_valid]
        filled += num_valid
        bar.update(num_valid)

    # One batch stays in flight: the next batch is dispatched (asynchronously)
    # before the previous one is copied back, overlapping host and device work.
    pending = None
    for start in range(0, num_images, batch):
        chunk = images[start : start + batch]
        num_valid = chunk.shape[0]
        if num_valid < batch:
            xp = jnp if on_device else np
            pad = xp.zeros((batch - num_valid, *chunk.shape[1:]), np.uint8)
            chunk = xp.concatenate([chunk, pad])
        outputs = forward(params, jax.device_put(chunk, data_sharding))
        if pending is not None:
            collect(*pending)
        pending = (outputs, num_valid)
    collect(*pending)
    bar.close()
    for value in collected.values():
        if isinstance(value, np.memmap):
            value.flush()
    return collected


def _output_array(memmap_dir: str | None, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    if memmap_dir is None:
        return np.empty(shape, dtype)
    os.makedirs(memmap_dir, exist_ok=True)
    return np.lib.format.open_memmap(os.path.join(memmap_dir, f"{key}.npy"), "w+", dtype, shape)
