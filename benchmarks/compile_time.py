"""What a run pays before its first step: tracing, lowering and XLA
compilation of a config's train step (one program for every phase of its
method), then the step time, on random images. Extra XLA flags are
appended to those `import jaxreid` sets, for comparing compiler settings.

    python benchmarks/compile_time.py                       # configs/synthetic.py
    python benchmarks/compile_time.py --config cuhk03_cc.py --images 512
    python benchmarks/compile_time.py --xla-flags=--xla_backend_optimization_level=1
"""

from __future__ import annotations

import argparse
import os
import time

import jaxreid  # noqa: F401  (sets the XLA:CPU defaults before the flags below)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic.py", help="a file of configs/ (name[:arg])")
    parser.add_argument("--images", type=int, default=512, help="random training images")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after 2 warm-up steps")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

    import numpy as np
    from jax_step import JaxStep, load_config

    from jaxreid.utils import machine_description

    print(machine_description())
    print(f"XLA_FLAGS: {os.environ['XLA_FLAGS']!r}")
    start = time.perf_counter()
    step = JaxStep(load_config(args.config), args.images)
    built = time.perf_counter()
    traced = step.step.trace(step.state, step.arrays, step.batches, np.int32(0), step.phase)
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    cpu = time.process_time()
    step.step = lowered.compile()
    compiled_at = time.perf_counter()
    cpu = time.process_time() - cpu
    times = step.time_steps(2, args.steps)
    median = float(np.median(times))
    print(
        f"{args.config}: build {built - start:.1f} s, trace + lower {lowered_at - built:.1f} s, "
        f"XLA compile {compiled_at - lowered_at:.1f} s ({cpu:.0f} s of CPU), "
        f"step {median * 1e3:.0f} ms [{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}] = "
        f"{step.batch_size / median:.1f} img/s"
    )


if __name__ == "__main__":
    main()
