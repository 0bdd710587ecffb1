"""What a run pays before its first step: tracing, lowering and XLA
compilation of a config's train step (one program for every phase of its
method), then the step time, on random images. Extra XLA flags are
appended to those jaxreid.host.configure_host sets, for comparing compiler settings.

    python benchmarks/compile_time.py                       # configs/synthetic.py
    python benchmarks/compile_time.py --config cuhk03_cc.py --images 512
    python benchmarks/compile_time.py --xla-flags=--xla_backend_optimization_level=1
"""

from __future__ import annotations

import os
import time

from absl import flags

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host

PROG = "benchmarks/compile_time.py"


def define_flags(fv: flags.FlagValues) -> None:
    """A config's compilation cost before its first step (see the module docstring)."""
    flags.DEFINE_string("config", "synthetic.py", "a file of configs/ (name[:arg])", flag_values=fv)
    flags.DEFINE_integer("images", 512, "random training images", flag_values=fv)
    flags.DEFINE_integer("steps", 8, "timed steps after 2 warm-up steps", flag_values=fv)
    flags.DEFINE_string("xla_flags", "", "appended to XLA_FLAGS", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
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
    run(main)
