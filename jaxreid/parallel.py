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

import functools
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


# ------------------------------------------------ a table sharded by rows


def _stacked_pairs(count: int, pair, shape: tuple[int, ...], dtype) -> jax.Array:
    """(count, *shape): pair(p) for p = 0 .. count-1, one after the other.
    Every product is computed alone with the same shapes whatever the device
    count; the trip count is hidden from XLA, which otherwise inlines a loop
    of one trip and fuses it differently (group_step's loop does the same)."""
    trips = jax.lax.optimization_barrier(jnp.int32(count))

    def body(p, out):
        return out.at[p].set(pair(p))

    return jax.lax.fori_loop(0, trips, body, jnp.zeros((count, *shape), dtype))


def _sharded_layout(shard: jax.Array, chunks: int) -> tuple[int, int, int]:
    """(devices n, chunks per device, rows per chunk) of a row-sharded table."""
    n = jax.lax.axis_size(AXIS)
    if chunks % n:
        raise UserError(
            f"a memory table in {chunks} row chunks cannot be shared by {n} devices: set the "
            f"method's instance_shards to a multiple of {n}, or run on a number of devices "
            f"that divides {chunks}"
        )
    local = chunks // n
    if shard.shape[0] % local:
        raise ValueError(f"{shard.shape[0]} rows on this device are not {local} equal chunks")
    return n, local, shard.shape[0] // local


def row_sharded_similarities(
    features: jax.Array, shard: jax.Array, chunks: int, rows: int
) -> jax.Array:
    """(b, rows) float32 similarities of this device's (b, D) features to every
    row of a (chunks * c, D) table whose rows are sharded over AXIS: `shard`
    is this device's slice, chunks / n consecutive chunks of c rows (rows past
    `rows` are padding). Inside shard_map; the table is a constant (no
    gradient reaches it).

    The table never leaves its device: the features are gathered, each device
    computes its chunks' products for every device's features, and an
    all_to_all returns each device its rows of the result. The gradient with
    respect to the features is one partial product per chunk, moved back by
    an all_to_all and summed in a pairwise order fixed by `chunks` alone, so
    any device count that divides `chunks` gives the same bits. (It differs
    in the last bits from a single product over the whole table.)"""
    table = jax.lax.stop_gradient(shard)
    return _row_sharded_similarities(features, table, chunks, rows)


def _similarities_forward(features, table, chunks, rows):
    n, local, c = _sharded_layout(table, chunks)
    b, d = features.shape
    blocks = table.reshape(local, c, d)
    everyone = jax.lax.all_gather(features.astype(table.dtype), AXIS)  # (n, b, D)

    def pair(p):
        return jnp.dot(
            everyone[p // local], blocks[p % local].T, preferred_element_type=jnp.float32
        )

    products = _stacked_pairs(n * local, pair, (b, c), jnp.float32).reshape(n, local, b, c)
    # Device j receives every device's chunks of its own features, in chunk order.
    mine = jax.lax.all_to_all(products, AXIS, split_axis=0, concat_axis=0, tiled=True)
    out = jnp.moveaxis(mine.reshape(chunks, b, c), 1, 0).reshape(b, chunks * c)
    return out[:, :rows], (features, table)


def _similarities_backward(chunks, rows, residuals, grad):
    features, table = residuals
    n, local, c = _sharded_layout(table, chunks)
    b, d = features.shape
    blocks = table.reshape(local, c, d)
    grad = jnp.pad(grad, ((0, 0), (0, chunks * c - rows)))
    grad = jnp.moveaxis(grad.reshape(b, n, local, c), 0, 2)  # (n, local, b, c)
    # Device d receives every device's gradient over its own chunks.
    theirs = jax.lax.all_to_all(grad, AXIS, split_axis=0, concat_axis=0, tiled=True)

    def pair(p):
        g = theirs[p // local, p % local].astype(table.dtype)
        return jnp.dot(g, blocks[p % local], preferred_element_type=jnp.float32)

    partials = _stacked_pairs(n * local, pair, (b, d), jnp.float32).reshape(n, local, b, d)
    # Back to the features' device: every chunk's partial, in chunk order.
    partials = jax.lax.all_to_all(partials, AXIS, split_axis=0, concat_axis=0, tiled=True)
    total = pairwise_sum(partials.reshape(chunks, b, d))
    # The table is a constant (stop_gradient): its zero cotangent is dropped.
    return total.astype(features.dtype), jnp.zeros_like(table)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _row_sharded_similarities(features, table, chunks, rows):
    return _similarities_forward(features, table, chunks, rows)[0]


_row_sharded_similarities.defvjp(_similarities_forward, _similarities_backward)


def padded_rows(rows: int, chunks: int) -> int:
    """Rows of a table of `rows` rows stored in `chunks` equal chunks."""
    return chunks * -(-rows // chunks)
