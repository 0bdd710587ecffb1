"""What computing the depthwise convolutions' tap sums once is worth in a
train step: two compiled steps of one config, one with
`layers._shifted_sum_once` (as trained: the sum behind a fusion boundary) and
one with the plain k*k-tap sum that XLA fused into, and recomputed in, each
consumer; run alternately in one process so that a noisy machine slows both
alike.

    python benchmarks/depthwise_once.py                    # the README's main command
    python benchmarks/depthwise_once.py --config cuhk03_supervised.py --steps 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from jax_step import JaxStep, load_config

from jaxreid.models import layers
from jaxreid.utils import machine_description


def build(config: str, images: int, tap_sum) -> JaxStep:
    """A step traced with `tap_sum` as the training-time depthwise sum, run twice
    (compile, warm up)."""
    layers._shifted_sum_once = tap_sum
    step = JaxStep(load_config(config), images)
    step.run(0)
    step.run(1)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic.py", help="a file of configs/")
    parser.add_argument("--images", type=int, default=512, help="random training images")
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each, alternating")
    args = parser.parse_args()
    once = layers._shifted_sum_once
    plain = build(args.config, args.images, layers._shifted_sum)
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
    main()
