"""Model throughput: forward and forward+backward images/s for each backbone.

    python benchmarks/models.py                       # everything (slow on CPU)
    python benchmarks/models.py --backbones resnet18 --sizes 128x64 --batches 8 --repeats 3

Forward = apply_model(train=False) (inference); forward+backward =
value_and_grad of sum(outputs) with apply_model(train=True) (ghost-BN statistics,
running-stat update), both under plain jax.jit with the SCL head of the default
config on top. Compilation and one warm-up call are excluded; each figure is the
median over --repeats timed calls (block_until_ready). bfloat16 runs by default
only when a GPU/TPU backend is present.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from jaxreid import models
from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.utils import machine_description

PROG = "benchmarks/models.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Backbone forward / backward speed (see the module docstring)."""
    flags.DEFINE_string(
        "backbones",
        "resnet18,efficientnet_lite0,resnet50,resnet34",
        "comma-separated backbone names",
        flag_values=fv,
    )
    flags.DEFINE_string("sizes", "256x128,128x64", "comma-separated HxW", flag_values=fv)
    flags.DEFINE_string("batches", "8,32", "comma-separated batch sizes", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed calls per figure", flag_values=fv)
    flags.DEFINE_string(
        "dtypes",
        "",
        "comma-separated compute dtypes (default: float32, plus bfloat16 on GPU/TPU)",
        flag_values=fv,
    )
    flags.DEFINE_bool("no_backward", False, "time the forward only", flag_values=fv)


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per call after a warm-up)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    jax.block_until_ready(fn(*args))  # warm-up, excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def benchmark(backbone: str, dtype: str, size: tuple[int, int], batches, repeats, backward):
    config = models.default_model_config()
    config.backbone = backbone
    config.dtype = dtype
    model = models.build_model(config, nnx.Rngs(0))
    graphdef, params, batch_stats = models.split_model(model)

    @jax.jit
    def forward(params, batch_stats, images):
        return models.apply_model(graphdef, params, batch_stats, images, train=False)[0]

    def loss(params, batch_stats, images):
        outputs, new_stats = models.apply_model(graphdef, params, batch_stats, images, train=True)
        return sum(jnp.sum(v) for v in outputs.values()), new_stats

    train_step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    rows = []
    for batch in batches:
        images = jax.random.uniform(jax.random.key(0), (batch, *size, 3), jnp.float32, 0, 255)
        fwd_compile, fwd = _time(forward, params, batch_stats, images, repeats=repeats)
        row = {
            "backbone": backbone,
            "input": f"{size[0]}x{size[1]}",
            "batch": batch,
            "dtype": dtype,
            "fwd": batch / fwd,
            "fwd_first": fwd_compile,
            "train": float("nan"),
            "train_first": float("nan"),
        }
        if backward:
            train_compile, train = _time(train_step, params, batch_stats, images, repeats=repeats)
            row.update(train=batch / train, train_first=train_compile)
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


_HEADER = (
    "| backbone | input | batch | dtype | fwd img/s | fwd+bwd img/s | fwd first call s "
    "| fwd+bwd first call s |\n|---|---|---|---|---|---|---|---|"
)


def _format_row(row) -> str:
    return (
        f"| {row['backbone']} | {row['input']} | {row['batch']} | {row['dtype']} "
        f"| {row['fwd']:.1f} | {row['train']:.1f} | {row['fwd_first']:.1f} "
        f"| {row['train_first']:.1f} |"
    )


def main(argv=None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    dtypes = [d for d in args.dtypes.split(",") if d] or (
        ["float32"] if jax.default_backend() == "cpu" else ["float32", "bfloat16"]
    )
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(machine_description(), flush=True)
    print(f"repeats={args.repeats} (median), warm-up and compilation excluded", flush=True)
    print(_HEADER, flush=True)
    rows = []
    for backbone in args.backbones.split(","):
        for dtype in dtypes:
            for size in sizes:
                rows += benchmark(
                    backbone, dtype, size, batches, args.repeats, not args.no_backward
                )
    print("\n## Summary\n")
    print(machine_description())
    print(_HEADER)
    for row in rows:
        print(_format_row(row))


if __name__ == "__main__":
    run(main)
