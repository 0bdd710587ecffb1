"""Cross-device reductions whose bits do not depend on the number of devices.

An all-reduce (`psum`) adds per-device partial sums in an order set by the
device count, so the same batch trained on 1 or 8 devices differs in the last
bits, and training amplifies that (top-k selection, DBSCAN). Here the batch is
cut into G fixed groups (the batch-norm groups); every device computes whole
groups with the same shapes whatever the device count, and every reduction
over groups is exact data movement (`all_gather`, `all_to_all`) followed by a
sum in a pairwise order fixed by G alone. Meant to run inside `jax.shard_map`
over the mesh axis `AXIS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from jaxreid.utils import UserError

AXIS = "data"


def make_mesh(num_devices: int = 0, devices: list | None = None) -> Mesh:
    """The data-parallel mesh over `devices` (default: every device), or the
    first `num_devices` of a single-process run (for scaling studies)."""
    devices = jax.devices() if devices is None else devices
    if num_devices:
        if jax.process_count() > 1:
            raise UserError(
                "train.num_devices works in a single process; a multi-process run uses every device"
            )
        if num_devices > len(devices):
            raise UserError(
                f"train.num_devices = {num_devices} but only {len(devices)} devices exist"
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,))


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over axis 0 as a balanced tree of elementwise adds: (((x0 + x1) +
    (x2 + x3)) + ...). The order depends only on x.shape[0], and elementwise
    adds give the same bits whatever the trailing shape."""
    terms = [x[i] for i in range(x.shape[0])]
    while len(terms) > 1:
        paired = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        if len(terms) % 2:
            paired.append(terms[-1])
        terms = paired
    return terms[0]


def gather_groups(tree: Any) -> Any:
    """Per-device stacks (k, ...) of consecutive groups -> (G, ...) with every
    group in order, on every device (device d holds groups d*k ... d*k+k-1)."""
    return jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS, tiled=True), tree)


def mean_over_groups(tree: Any) -> Any:
    """Per-device stacks (k, ...) -> the mean over all G groups, replicated.
    For small leaves (losses, batch-norm statistics): everything is gathered."""
    return jax.tree.map(lambda x: pairwise_sum(x) / x.shape[0], gather_groups(tree))


def mean_gradients(stacked: Any, num_devices: int) -> Any:
    """Per-device stacks (k, ...) of per-group gradients -> their mean over all
    G = k * num_devices groups, replicated.

    A reduce-scatter then all-gather, as an all-reduce does, but with exact
    moves: `all_to_all` gives device j the j-th slice of every group's
    flattened gradient, device j sums its slice over the G groups in the fixed
    pairwise order, and `all_gather` reassembles the slices. The traffic is that
    of a ring all-reduce (2 (n-1)/n of the gradient) when each device holds one
    group.
    """
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(stacked)  # (k, P)
    _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], stacked))
    k, size = flat.shape
    chunk = -(-size // num_devices)
    flat = jnp.pad(flat, ((0, 0), (0, chunk * num_devices - size)))
    # (k, n, chunk): slice j goes to device j; rows arrive in device order, so
    # row d * k + i is group d * k + i.
    parts = jax.lax.all_to_all(
        flat.reshape(k, num_devices, chunk), AXIS, split_axis=1, concat_axis=0, tiled=True
    ).reshape(k * num_devices, chunk)
    mean = pairwise_sum(parts) / (k * num_devices)
    return unravel(jax.lax.all_gather(mean, AXIS, tiled=True)[:size])


# What torchrun (and torch.distributed's other launchers) set for each process.
TORCHRUN_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def torchrun_settings(env: Mapping[str, str]) -> dict | None:
    """jax.distributed.initialize's arguments from torchrun-style variables
    (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK; with LOCAL_RANK and
    LOCAL_WORLD_SIZE > 1, several processes share a host and each takes the
    device of its local rank), or None where they are not all set."""
    if not all(env.get(name) for name in TORCHRUN_VARIABLES):
        return None
    settings = dict(
        coordinator_address=f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
        num_processes=int(env["WORLD_SIZE"]),
        process_id=int(env["RANK"]),
    )
    if int(env.get("LOCAL_WORLD_SIZE", "1")) > 1:
        settings["local_device_ids"] = [int(env["LOCAL_RANK"])]
    return settings


def start_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """jax.distributed.initialize with explicit settings, else torchrun-style
    variables (torchrun_settings), else jax's auto-detection (SLURM, Open MPI,
    ...). CPU processes exchange collectives through gloo."""
    import importlib.util
    import os

    # Must not initialise a backend before jax.distributed.initialize.
    accelerator = any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
    )
    if jax.config.jax_platforms in (None, "", "cpu") and not accelerator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    settings = dict(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    if all(value is None for value in settings.values()):
        settings = torchrun_settings(os.environ) or settings
    jax.distributed.initialize(**settings)
