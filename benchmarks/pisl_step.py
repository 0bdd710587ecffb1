"""PISL's cost beside plain cluster contrast, in one run on the same machine:
the training step (the patch branch's proposal, one denoiser pass, the patch
sampling and PSC / SCD) and the extraction (the diffusion's DDIM chain over
the thetas: the full chain beside a cheap one).

    python benchmarks/pisl_step.py                                  # the CUHK03 recipe
    python benchmarks/pisl_step.py --config=synthetic_pisl.py --repeats 20

Rows: the base config with method cluster_contrast (no patch branch), then
PISL at each `--sampling_steps` (0 = the proposal's thetas, no diffusion).
The training step does not depend on the sampling steps (it denoises one
random t), so it is timed once; extraction is timed at every count.
Medians and [min-max] of `--repeats` steps after the compiling one; the load
average before and after, since the machine may be shared.
"""

from __future__ import annotations

import os
import statistics

import ml_collections
from absl import flags
from jax_step import JaxStep, load_config

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.methods import set_method
from jaxreid.utils import machine_description

PROG = "benchmarks/pisl_step.py"


def define_flags(fv: flags.FlagValues) -> None:
    """PISL's step and extraction cost (see the module docstring)."""
    flags.DEFINE_string("config", "cuhk03_pisl.py", "a PISL config in configs/", flag_values=fv)
    flags.DEFINE_string("sampling_steps", "5,1000", "DDIM counts to extract with", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed steps", flag_values=fv)
    flags.DEFINE_integer("images", 512, "random training images", flag_values=fv)
    flags.DEFINE_integer("extract_batch", 64, "images per extraction batch", flag_values=fv)


def summary(batch: int, times: list[float]) -> str:
    rates = sorted(batch / t for t in times)
    seconds = statistics.median(times)
    return (
        f"{seconds:7.3f} s  {statistics.median(rates):6.1f} img/s [{rates[0]:.1f}-{rates[-1]:.1f}]"
    )


def plain(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same config as cluster contrast without the patch branch."""
    c = ml_collections.ConfigDict(config.to_dict())
    camera_negatives = bool(c.method.get("camera_negatives", False))
    set_method(c, "cluster_contrast", camera_negatives=camera_negatives)
    c.model.patches.num = 0
    return c


def main(argv: list[str] | None = None) -> None:
    configure_host()
    args, _ = parse(define_flags, argv, PROG)
    print(machine_description())
    print(f"# load average before: {os.getloadavg()}")
    base = load_config(args.config)
    counts = [int(s) for s in args.sampling_steps.split(",")]
    rows = [("cluster_contrast", plain(base), None)]
    for count in counts:
        c = ml_collections.ConfigDict(base.to_dict())
        c.model.patches.sampling_steps = count
        rows.append((f"pisl, {count} DDIM steps at extraction", c, count))
    print(f"{'row':40s} {'train step':>36s} {'extraction':>36s}")
    trained = None
    for label, config, count in rows:
        step = JaxStep(config, args.images)
        if count is None or trained is None:
            train = summary(step.batch_size, step.time_steps(2, args.repeats))
            first = step.first_step_seconds
            if count is not None:
                trained = train
        else:
            train, first = f"(as above) {trained}", None
        extract = summary(
            args.extract_batch, step.time_extraction(args.extract_batch, args.repeats)
        )
        print(f"{label:40s} {train:>36s} {extract:>36s}", flush=True)
        if first is not None:
            print(f"#   first step (compilation) {first:.0f} s", flush=True)
        del step
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    run(main)
