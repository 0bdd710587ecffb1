"""Device-count invariance: the same config on 1, 2, 4 and 8 simulated CPU
devices, for SCL and for cluster contrast. Prints, per method and device
count, the largest relative difference of the per-step loss from the
1-device run (first epoch and whole run), whether the whole loss trajectory
and the final metrics are the same bits, and the final mAP / rank-1.

    python benchmarks/device_invariance.py                     # ~20 min on 2 cores
    python benchmarks/device_invariance.py --devices 1 8 --methods cluster_contrast
    python benchmarks/device_invariance.py --host-devices 0    # XLA_FLAGS=N per run
    python benchmarks/device_invariance.py --devices 1 --seeds 0 1 2   # seed-to-seed spread

Every process simulates `--host-devices` CPU devices (default 8,
XLA_FLAGS=--xla_force_host_platform_device_count=8) and trains on the first
N (`train.num_devices`). Why not XLA_FLAGS=N alone: XLA:CPU sizes its thread
pool by max(cores, device count) and splits convolutions and reductions into
that many parts at compile time, so on a 2-core machine 4 simulated devices
compile different kernels from 1 or 2; `--host-devices 0` runs that way.

Every run: EfficientNet-Lite0 from ImageNet at 128x64, a generated synthetic
set (24 ids x 3 cameras), batch 16 in batch-norm groups of 2 (8 groups to
share out), SGD lr 0.001, 3 epochs of at most 4 steps (SCL: one pass over
the 62 training images = 3 steps, 1 warm-up epoch; cluster contrast: 4 P x K
steps, re-clustering every epoch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import flags

from jaxreid.command_line import parse, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(
    root: str, workdir: str, method: str, epochs: int, steps: int, devices: int, seed: int = 0
) -> list[str]:
    args = [
        sys.executable, "-m", "jaxreid.main",
        "--config", os.path.join(REPO, "configs", "synthetic.py"),
        f"--workdir={workdir}",
        "--config.data.dataset=market_layout", f"--config.data.root={root}",
        "--config.data.cache_dir=",
        "--config.model.backbone=efficientnet_lite0", "--config.model.pretrained=imagenet",
        "--config.model.embed_dim=64", "--config.model.num_stripes=2",
        "--config.model.bn_group_size=2",
        "--config.optimizer.name=sgd", "--config.optimizer.lr=0.001",
        "--config.train.batch_size=16", f"--config.train.epochs={epochs}",
        f"--config.train.steps_per_epoch={steps}", f"--config.train.eval_every={epochs}",
        "--config.train.log_every=1", f"--config.seed={seed}",
        f"--config.train.num_devices={devices}",
    ]  # fmt: skip
    if method == "scl":
        args += ["--config.method.k=2", "--config.method.n=8"]
    else:
        args += [
            f"--config.method.name={method}", "--config.model.head=bnneck",
            "--config.method.temperature=0.05", "--config.train.num_instances=2",
            "--config.cluster.k1=10", "--config.cluster.k2=4",
            "--config.cluster.min_samples=2", "--config.cluster.eps=0.5",
            "--config.model.embed_dim=0",
        ]  # fmt: skip
    return args


def losses(workdir: str) -> np.ndarray:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return np.array([by_step[s] for s in sorted(by_step)])


PROG = "benchmarks/device_invariance.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Device-count invariance of training (see the module docstring)."""
    flags.DEFINE_multi_integer("devices", [1, 2, 4, 8], "device counts trained on", flag_values=fv)
    flags.DEFINE_multi_string("methods", ["scl", "cluster_contrast"], "methods", flag_values=fv)
    flags.DEFINE_integer("epochs", 3, "epochs per run", flag_values=fv)
    flags.DEFINE_integer("steps", 4, "steps per epoch", flag_values=fv)
    flags.DEFINE_integer(
        "host_devices",
        8,
        "CPU devices every process simulates (0: as many as it trains on)",
        flag_values=fv,
    )
    flags.DEFINE_multi_integer(
        "seeds",
        [0],
        "runs with other seeds give the seed-to-seed spread to compare with",
        flag_values=fv,
    )


def main(argv: list[str] | None = None) -> None:
    args, _ = parse(define_flags, argv, PROG, multi=("devices", "methods", "seeds"))

    from jaxreid.data import synthetic
    from jaxreid.utils import machine_description

    print(machine_description(), flush=True)
    host = args.host_devices
    print(f"simulated CPU devices per process: {host or 'the device count'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "synthetic")
        synthetic.generate(
            root, num_ids=24, num_cameras=3, images_per_id_per_camera=2, seed=3,
            num_distractors=4, num_junk=2,
        )  # fmt: skip
        for method in args.methods:
            reference = None
            for seed, n in [(seed, n) for seed in args.seeds for n in args.devices]:
                workdir = os.path.join(tmp, f"{method}-{n}-seed{seed}")
                flags = f"--xla_force_host_platform_device_count={host or n}"
                out = subprocess.run(
                    command(root, workdir, method, args.epochs, args.steps, n, seed),
                    env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode:
                    sys.exit(f"{method} on {n} devices failed:\n{out.stdout[-3000:]}")
                with open(os.path.join(workdir, "results.json")) as f:
                    final = json.load(f)["final"]["plain"]
                trajectory = losses(workdir)
                if reference is None:
                    reference = (trajectory, final)
                rel = np.abs(trajectory - reference[0]) / np.abs(reference[0])
                same = bool(np.array_equal(trajectory, reference[0])) and final == reference[1]
                row = dict(
                    method=method, devices=n, seed=seed, steps=len(trajectory),
                    first_step=float(rel[0]), first_epoch=float(rel[: args.steps].max()),
                    whole_run=float(rel.max()), same_bits=same,
                    mAP=final["mAP"], rank1=final["rank1"],
                )  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(
        "| method | devices | seed | loss rel. diff step 1 | max, epoch 1 | max, whole run "
        "| same bits | final mAP % | rank-1 % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['devices']} | {r['seed']} | {r['first_step']:.1e} | "
            f"{r['first_epoch']:.1e} | {r['whole_run']:.1e} | "
            f"{'yes' if r['same_bits'] else 'no'} | {100 * r['mAP']:.2f} | "
            f"{100 * r['rank1']:.2f} |"
        )


if __name__ == "__main__":
    run(main)
