"""Training and extraction speed: jaxreid's compiled step beside a PyTorch
loop of the same network, loss and optimizer, on the same CPU, in one run.

    python benchmarks/train_step.py                       # every row
    python benchmarks/train_step.py --rows lite0_sup,lite0_cc --repeats 5
    python benchmarks/train_step.py --no-torch            # jaxreid only
    python benchmarks/train_step.py --rows r50_scl8,r50_scl8_direct --no-torch  # Winograd's gain

jaxreid: the full step of the config (augmentation, model, method loss,
gradients, optimizer, memory update), built with the functions training uses
(benchmarks/jax_step.py). PyTorch: benchmarks/torch_reference.py, the loop
as a PyTorch user writes it on a CPU (channels-last, the augmentation
vectorised over the batch, threads = cores), eager and torch.compile'd (torch
is an optional benchmark dependency; without it the torch columns are empty). Both on
random uint8 images, timed after warm-up; medians and [min-max] of
`--repeats` steps. Extraction: eval-mode forward of one batch of 256 images.
"""

from __future__ import annotations

import json
import os
import statistics

from absl import flags
from jax_step import JaxStep, load_config, random_training_set

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.utils import machine_description

# name -> (config, overrides, images in the training set, label)
ROWS = {
    "lite0_sup": ("cuhk03_supervised.py", {}, 512, "EfficientNet-Lite0 128x64 b64 supervised"),
    "lite0_cc": ("cuhk03_cc.py", {}, 512, "EfficientNet-Lite0 128x64 b64 cluster contrast"),
    "osnet_cc": ("cuhk03_uda.py", {}, 512, "OSNet-x0.25 256x128 b64 cluster contrast (uda)"),
    "r50_scl8": ("market.py", {}, 12936, "ResNet-50 256x128 b8 SCL (paper config)"),
    "r50_scl32": ("market.py", {"train.batch_size": 32}, 12936, "ResNet-50 256x128 b32 SCL"),
    "vitti_cc": ("cuhk03_vit.py", {}, 512, "ViT-Ti 128x64 b64 cluster contrast"),
    # TransReID-SSL's recipe at a CPU batch (its 256 = 32 x 8 on 4 GPUs).
    "vits_ics_cc": (
        "market_vit_cc.py",
        {"train.batch_size": 32, "model.bn_group_size": 32},
        12936,
        "ViT-S+ICS 256x128 b32 cluster contrast",
    ),
    # Not in the default run: the b8 row without Winograd, for the comparison.
    "r50_scl8_direct": (
        "market.py",
        {"model.winograd": False},
        12936,
        "ResNet-50 256x128 b8 SCL, direct 3x3",
    ),
}
DEFAULT_ROWS = [name for name in ROWS if not name.endswith("_direct")]
EXTRACT_BATCH = 256


def apply(config, overrides: dict):
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def summary(batch: int, times: list[float]) -> dict:
    rates = sorted(batch / t for t in times)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1]}


def fmt(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


PROG = "benchmarks/train_step.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Training speed, jaxreid beside PyTorch (see the module docstring)."""
    flags.DEFINE_string("rows", ",".join(DEFAULT_ROWS), f"of {', '.join(ROWS)}", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, ">= 1 (the first compiles)", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed steps", flag_values=fv)
    flags.DEFINE_bool("no_torch", False, "skip the PyTorch columns", flag_values=fv)
    flags.DEFINE_bool(
        "torch_compile",
        True,
        "also a torch.compile (inductor) column of the same loop (--notorch_compile: skip)",
        flag_values=fv,
    )
    flags.DEFINE_bool("no_extract", False, "skip the extraction figures", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the figures here", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    host = configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    torch_reference = None
    if not args.no_torch:
        try:
            import torch_reference
        except ImportError as e:
            print(f"# torch column skipped: {e}")
    print(machine_description())
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}")
    # Set by configure_host (jaxreid/host.py); the glibc settings hold for the
    # PyTorch column too, which runs in this process.
    print(f"# freed host memory kept for reuse (glibc, both columns): {host.keeps_host_memory}")
    if torch_reference is not None:
        import torch

        # As many threads as cores, as XLA:CPU uses.
        torch.set_num_threads(os.cpu_count() or 1)
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    compiled = torch_reference is not None and args.torch_compile
    results = {}
    header = f"{'row':48s} {'jaxreid img/s':>22s} {'PyTorch img/s':>22s} {'ratio':>6s}"
    if compiled:
        header += f" {'torch.compile img/s':>22s} {'ratio':>6s}"
    print(header)
    for name in args.rows.split(","):
        spec, overrides, num_images, label = ROWS[name]
        config = apply(load_config(spec), overrides)
        jax_step = JaxStep(config, num_images)
        batch = jax_step.batch_size
        entries = {"train": (summary(batch, jax_step.time_steps(args.warmup, args.repeats)), None)}
        compile_s = jax_step.first_step_seconds
        if not args.no_extract:
            entries["extract"] = (
                summary(EXTRACT_BATCH, jax_step.time_extraction(EXTRACT_BATCH, args.repeats)),
                None,
            )
        del jax_step
        columns = {kind: [ours] for kind, (ours, _) in entries.items()}
        if torch_reference is not None:
            images, _, identities = random_training_set(config, num_images)
            for compile_it in (False, True)[: 1 + compiled]:
                step = torch_reference.TorchStep(
                    config, images, identities, memory_rows=num_images, compiled=compile_it
                )
                # The first steps of the compiled loop compile (forward and backward).
                warmup = args.warmup + 2 * compile_it
                columns["train"].append(summary(batch, step.time_steps(warmup, args.repeats)))
                if "extract" in columns:
                    step.time_extraction(EXTRACT_BATCH, 1 + compile_it)  # compiles eval mode
                    columns["extract"].append(
                        summary(EXTRACT_BATCH, step.time_extraction(EXTRACT_BATCH, args.repeats))
                    )
                del step
        for kind, (ours, *theirs) in columns.items():
            line = f"{label + ' ' + kind:48s} {fmt(ours):>22s}"
            for other in theirs or [None]:
                ratio = f"{ours['median'] / other['median']:.2f}x" if other else "-"
                line += f" {fmt(other):>22s} {ratio:>6s}"
            print(line, flush=True)
            results[f"{name}/{kind}"] = {
                "jaxreid": ours,
                "pytorch": theirs[0] if theirs else None,
                "torch_compile": theirs[1] if len(theirs) > 1 else None,
            }
        print(f"# {label}: jaxreid's first step (compilation) {compile_s:.0f} s", flush=True)
        results[f"{name}/first_step_seconds"] = compile_s
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    run(main)
