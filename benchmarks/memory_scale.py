"""The clustering family's memory at 10^4-10^6 training images (issue #49).

    python benchmarks/memory_scale.py                                   # 10^4, 10^5, 10^6 x 2048
    python benchmarks/memory_scale.py --sizes 1000000 --kinds hhcl --dim 512
    python benchmarks/memory_scale.py --sizes 1000000 --tables buckets --dtypes float32,bfloat16
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory_scale.py \
        --kinds hhcl --tables buckets --instance_shards 0,8 --devices 1,8

Every method of jaxreid.methods.cluster carries a `ClusterMemory` with a
prototype table (`method.prototype_table`, laid out by
`cluster.table_rows`), and hhcl / joint an instance bank of one row per
training image. For each kind and N this times, on the default device, one
compiled function doing what the train step does with the memory: the
method's loss on a batch of features (forward + gradient with respect to
the features) and its memory update, with the memory donated and the
writes ordered after the gradient (`jaxreid.step.computed_after`), as the
train step does. Rows, one per layout of the prototype table for the
N / --images_per_cluster clusters present and memory dtype (--dtypes:
float32, bfloat16; `method.memory_dtype`):

- `images`: N rows (one compile per run);
- `buckets`: the power of two at or above the clusters (the default).

With --instance_shards K > 0 (hhcl / joint; `method.instance_shards`) the
instance bank is stored in K row chunks spread over --devices devices (each
count a divisor of K; on a CPU, simulated with XLA's
--xla_force_host_platform_device_count, all sharing its cores): the loss runs
inside a shard_map over them, each device on B / devices of the batch, as the
train step runs its groups.

Columns: the memory's size (all its arrays) and the part of it on one
device, median and [min-max] ms of
--repeats calls after two warm-up calls, and the floating-point work of the
(B, rows) similarity products per step (forward and gradient). The memory is
random unit rows made on the device (no host copy); the cluster of every
image is drawn uniformly, 18% outliers.
"""

from __future__ import annotations

import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid import parallel
from jaxreid.command_line import parse, run
from jaxreid.config_base import base_config
from jaxreid.host import configure_host
from jaxreid.methods import Batch, cluster, get_method, set_method
from jaxreid.step import computed_after, memory_partition, place_memory, spec_shardings
from jaxreid.utils import machine_description

PROG = "benchmarks/memory_scale.py"
OUTLIER_SHARE = 0.18


def define_flags(fv: flags.FlagValues) -> None:
    """The clustering family's memory at scale (see the module docstring)."""
    flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "training images N", flag_values=fv)
    flags.DEFINE_list("kinds", ["cluster_contrast", "hhcl"], "cluster methods", flag_values=fv)
    flags.DEFINE_integer("dim", 2048, "feature dimension D", flag_values=fv)
    flags.DEFINE_integer("batch", 64, "batch size B", flag_values=fv)
    flags.DEFINE_integer("images_per_cluster", 17, "N / clusters", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed calls", flag_values=fv)
    flags.DEFINE_list(
        "tables", list(cluster.TABLE_LAYOUTS), "prototype table layouts", flag_values=fv
    )
    flags.DEFINE_list("dtypes", ["float32"], "memory dtypes (method.memory_dtype)", flag_values=fv)
    flags.DEFINE_list(
        "instance_shards", ["0"], "method.instance_shards (hhcl / joint)", flag_values=fv
    )
    flags.DEFINE_list("devices", ["1"], "devices the loss runs on", flag_values=fv)


def random_memory(
    kind: str,
    n: int,
    rows: int,
    dim: int,
    clusters: int,
    seed: int,
    dtype: str = "float32",
    shards: int = 0,
    mesh: Mesh | None = None,
):
    """A ClusterMemory of `kind` for n images whose prototype table has `rows`
    rows, its tables stored in `dtype`; with `shards`, its instance bank padded
    to `shards` chunks and its rows spread over `mesh` (each device makes its
    own rows: no device ever holds the whole bank)."""
    keys = jax.random.split(jax.random.key(seed), 3)

    def unit_rows(key, count):
        # Made chunk by chunk inside one program: the (count, D) result is the
        # only table-sized buffer (10^6 x 2048 float32 is 8 GiB).
        chunk = next(c for c in range(min(count, 8192), 0, -1) if count % c == 0)
        num_chunks = count // chunk

        @jax.jit
        def make(key):
            def one(k):
                x = jax.random.normal(k, (chunk, dim), jnp.float32)
                return (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)

            rows = jax.lax.map(one, jax.random.split(key, num_chunks))
            return rows.reshape(count, dim)

        return make(key)

    labels = jax.random.randint(keys[2], (n,), 0, clusters, jnp.int32)
    outlier = jax.random.uniform(jax.random.fold_in(keys[2], 1), (n,)) < OUTLIER_SHARE
    labels = jnp.where(outlier, -1, labels)
    instance_bank = cluster.KIND_RECORDS[kind].instance_bank
    if instance_bank and shards:
        devices = list(mesh.devices.flat)
        per_device = parallel.padded_rows(n, shards) // len(devices)
        parts = [
            unit_rows(jax.device_put(jax.random.fold_in(keys[1], i), d), per_device)
            for i, d in enumerate(devices)
        ]
        instances = jax.make_array_from_single_device_arrays(
            (per_device * len(devices), dim), NamedSharding(mesh, P(parallel.AXIS)), parts
        )
    else:
        instances = unit_rows(keys[1], n if instance_bank else 1)
    return cluster.ClusterMemory(
        prototypes=unit_rows(keys[0], rows),
        valid=jnp.arange(rows) < clusters,
        row_cluster=jnp.where(jnp.arange(rows) < clusters, jnp.arange(rows), -1).astype(jnp.int32),
        row_camera=jnp.full((rows,), -1, jnp.int32),
        rows=labels,
        pseudo_labels=jnp.copy(labels),  # its own buffer: the memory is donated
        cameras=jnp.zeros((n,), jnp.int32),
        instances=instances,
    )


def kind_method(kind: str, dtype: str = "float32", shards: int = 0):
    """The method `kind` at its default settings, its memory in `dtype`, its
    instance bank (hhcl / joint) in `shards` chunks."""
    config = set_method(base_config(), kind)
    config.method.memory_dtype = dtype
    if shards:
        config.method.instance_shards = shards
    return get_method(config)


def memory_step(method, memory, mesh: Mesh):
    """memory, features, indices, cameras -> (memory, loss, gradient) through
    the method's own hooks: its loss and gradient (inside a shard_map over
    `mesh`, each device on its slice of the batch and its rows of the
    memory), then its update."""
    phase = method.phases[0]
    key = jax.random.key(0)
    specs = memory_partition(method, memory)

    def local(memory, features, indices, cams):
        batch = Batch(indices=indices, cameras=cams)

        def loss(f):
            return method.loss({"global": f}, memory, batch, key, phase)[0]

        value, grad = jax.value_and_grad(loss)(features)
        return value[None], grad

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(specs, P(parallel.AXIS), P(parallel.AXIS), P(parallel.AXIS)),
        out_specs=(P(parallel.AXIS), P(parallel.AXIS)),
        check_vma=False,
    )

    def step(memory, features, indices, cams):
        values, grad = sharded(memory, features, indices, cams)
        # As the train step: the writes wait for the gradient, so XLA updates
        # the donated memory in place instead of copying it first.
        outputs = {"global": computed_after(features, grad)}
        batch = Batch(indices=indices, cameras=cams)
        return method.update(memory, outputs, batch, None, phase), jnp.mean(values), grad

    replicated = NamedSharding(mesh, P())
    shardings = (spec_shardings(specs, mesh), replicated, replicated)
    return jax.jit(step, donate_argnums=0, out_shardings=shardings)


def time_memory(
    kind: str, n: int, rows: int, clusters: int, dtype: str, args, shards=0, devices=1
) -> dict:
    mesh = parallel.make_mesh(devices)
    method = kind_method(kind, dtype, shards)
    memory = random_memory(kind, n, rows, args.dim, clusters, n, dtype, shards, mesh)
    specs = memory_partition(method, memory)
    # The shards already sit where they belong; the rest is replicated.
    memory = place_memory(memory, specs, mesh)
    size_gib = sum(x.nbytes for x in jax.tree.leaves(memory)) / 2**30
    first = mesh.devices.flat[0]
    on_device = sum(
        s.data.nbytes
        for x in jax.tree.leaves(memory)
        for s in x.addressable_shards
        if s.device == first
    )
    rng = np.random.default_rng(0)
    replicated = NamedSharding(mesh, P())
    features = jax.device_put(rng.standard_normal((args.batch, args.dim), np.float32), replicated)
    indices = jax.device_put(rng.choice(n, args.batch, replace=False).astype(np.int32), replicated)
    cams = jax.device_put(np.zeros((args.batch,), np.int32), replicated)
    step = memory_step(method, memory, mesh)
    times = []
    for call in range(2 + args.repeats):
        start = time.perf_counter()
        memory, value, grad = step(memory, features, indices, cams)
        jax.block_until_ready((memory, value, grad))
        if call >= 2:
            times.append(time.perf_counter() - start)
    similarity_rows = rows + (n if cluster.KIND_RECORDS[kind].instance_bank else 0)
    return {
        "gib": size_gib,
        "device_gib": on_device / 2**30,
        "ms": 1000 * statistics.median(times),
        "range": (1000 * min(times), 1000 * max(times)),
        "gflop": 2 * 2 * args.batch * similarity_rows * args.dim / 1e9,
        "finite": bool(jnp.isfinite(value)),
    }


def main(argv: list[str] | None = None) -> None:
    args, _ = parse(define_flags, argv, PROG)
    configure_host()
    print(f"{machine_description()}; B = {args.batch}, D = {args.dim}")
    print(
        "| kind | N | table | dtype | instance shards | devices | memory GiB | on one device "
        "GiB | step ms (loss fwd + grad + update) | similarity GFLOP / step |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    settings = list(itertools.product(args.tables, args.dtypes, args.instance_shards, args.devices))
    for n in (int(s) for s in args.sizes):
        for kind in args.kinds:
            clusters = max(1, n // args.images_per_cluster)
            bank = cluster.KIND_RECORDS[kind].instance_bank
            for name, dtype, shards, devices in settings:
                shards, devices = int(shards), int(devices)
                if (shards and not bank) or (not shards and devices > 1) or shards % devices:
                    continue  # no bank to shard; a replicated bank is timed on one device
                rows = cluster.table_rows(clusters, n, name)
                r = time_memory(kind, n, rows, clusters, dtype, args, shards, devices)
                low, high = r["range"]
                print(
                    f"| {kind} | {n:,} | {name} ({rows:,} rows) | {dtype} | {shards} | "
                    f"{devices} | {r['gib']:.2f} | {r['device_gib']:.2f} | "
                    f"{r['ms']:.1f} [{low:.1f}-{high:.1f}] | {r['gflop']:.1f} |"
                    + ("" if r["finite"] else " (loss not finite)"),
                    flush=True,
                )


if __name__ == "__main__":
    run(main)
