"""What computing the depthwise convolutions' tap sums once is worth in a
train step: two compiled steps of one config, one with
`cpu_kernels._shifted_sum_once` (as trained: the sum behind a fusion boundary) and
one with the plain k*k-tap sum that XLA fused into, and recomputed in, each
consumer; run alternately in one process so that a noisy machine slows both
alike.

    python benchmarks/depthwise_once.py                    # the README's main command
    python benchmarks/depthwise_once.py --config cuhk03_supervised.py --steps 8
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags
from jax_step import JaxStep, load_config

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.models import cpu_kernels
from jaxreid.utils import machine_description


def build(config: str, images: int, tap_sum) -> JaxStep:
    """A step traced with `tap_sum` as the training-time depthwise sum, run twice
    (compile, warm up)."""
    cpu_kernels._shifted_sum_once = tap_sum
    step = JaxStep(load_config(config), images)
    step.run(0)
    step.run(1)
    return step


PROG = "benchmarks/depthwise_once.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Depthwise taps computed once vs per use (see the module docstring)."""
    flags.DEFINE_string("config", "synthetic.py", "a file of configs/", flag_values=fv)
    flags.DEFINE_integer("images", 512, "random training images", flag_values=fv)
    flags.DEFINE_integer("steps", 15, "timed steps of each, alternating", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    once = cpu_kernels._shifted_sum_once
    plain = build(args.config, args.images, cpu_kernels._shifted_sum)
    computed_once = build(args.config, args.images, once)
    times = {"plain sum": [], "once": []}
    for i in range(args.steps):
        for name, step in (("plain sum", plain), ("once", computed_once)):
            start = time.perf_counter()
            step.run(2 + i)
            times[name].append(time.perf_counter() - start)
    print(machine_description())
    batch = plain.batch_size
    for name, ts in times.items():
        ms = 1e3 * np.array(ts)
        print(
            f"{args.config} {name:9s}: {np.median(ms):.0f} ms [{ms.min():.0f}-{ms.max():.0f}] "
            f"per step = {batch / np.median(ts):.1f} img/s"
        )
    ratio = np.median(times["plain sum"]) / np.median(times["once"])
    print(f"once / plain sum speed: {ratio:.2f}x")


if __name__ == "__main__":
    run(main)
