"""3x3 stride-1 convolutions on the CPU: the direct form (cpu_kernels.conv2d, with
its hand-written VJP) beside Winograd F(4x4, 3x3) (models/winograd.py), at
ResNet-50's 3x3 layer shapes for 256x128 inputs (last stride 1). Forward, and
forward + input and kernel gradients; best of `--repeats` after warm-up, the
two forms alternated twice.

    python benchmarks/conv3x3.py --batch 8
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax_step import time_runs

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.models import cpu_kernels, winograd
from jaxreid.utils import machine_description

# (height, width, channels) of ResNet-50's 3x3 stride-1 layers at 256x128.
SHAPES = ((64, 32, 64), (32, 16, 128), (16, 8, 256), (16, 8, 512))
PADDING = ((1, 1), (1, 1))


def best_ms(fn, args, repeats: int) -> float:
    return 1e3 * min(time_runs(lambda _: jax.block_until_ready(fn(*args)), 1, repeats))


PROG = "benchmarks/conv3x3.py"


def define_flags(fv: flags.FlagValues) -> None:
    """3x3 stride-1 convolutions on the CPU: direct form beside Winograd."""
    flags.DEFINE_integer("batch", 8, "images per batch", flag_values=fv)
    flags.DEFINE_integer("repeats", 7, "timed calls (best of)", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    print(machine_description())
    forms = {
        "direct": lambda x, w: cpu_kernels.conv2d(x, w, 1, PADDING),
        "winograd": lambda x, w: winograd.conv3x3(x, w, PADDING),
    }
    print(f"{'shape':>16s} {'form':>9s} {'forward ms':>11s} {'fwd+bwd ms':>11s}")
    rng = np.random.default_rng(0)
    for height, width, channels in SHAPES:
        x = jnp.asarray(rng.normal(size=(args.batch, height, width, channels)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.05, jnp.float32)
        cotangent = jnp.ones(x.shape[:-1] + (channels,), jnp.float32)
        compiled = {}
        for name, conv in forms.items():

            def both(x, w, conv=conv, cotangent=cotangent):
                y, vjp = jax.vjp(conv, x, w)
                return y, vjp(cotangent)

            compiled[name] = (jax.jit(conv), jax.jit(both))
        best = {name: [np.inf, np.inf] for name in forms}
        for _ in range(2):
            for name, fns in compiled.items():
                for part, fn in enumerate(fns):
                    best[name][part] = min(best[name][part], best_ms(fn, (x, w), args.repeats))
        shape = f"{args.batch}x{height}x{width}x{channels}"
        for name, (forward, total) in best.items():
            print(f"{shape:>16s} {name:>9s} {forward:11.1f} {total:11.1f}", flush=True)


if __name__ == "__main__":
    run(main)
