"""Loss trajectories and metrics of short runs through the entry point, to
show that a change preserves behaviour bit for bit (or what it changes).

    python benchmarks/trajectories.py --repo=. --out=/tmp/after.json
    python benchmarks/trajectories.py --repo=/tmp/before --out=/tmp/before.json
    python benchmarks/trajectories.py --compare /tmp/before.json /tmp/after.json

Every run is `python -m jaxreid.main` from --repo (a checkout; run it at two
commits with `git worktree add`), on a tiny generated set (24 identities, 3
cameras) or the synthetic default, logging every step. The JSON holds each
run's metrics.jsonl rows without timings; --compare prints, per run, whether
the losses, the evaluations and every logged row are identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

TINY = [
    "--config.data.dataset=market_layout",
    "--config.data.cache_dir=",
    "--config.model.backbone=resnet18",
    "--config.model.pretrained=",
    "--config.model.embed_dim=32",
    "--config.model.num_stripes=2",
    "--config.model.bn_group_size=8",
    "--config.train.batch_size=8",
    "--config.optimizer.name=adam",
    "--config.train.epochs=2",
    "--config.train.steps_per_epoch=3",
    "--config.train.eval_every=1",
    "--config.train.log_every=1",
    "--config.eval.batch_size=32",
]
SCL_TINY = ["--config.method.k=2", "--config.method.n=8", "--config.method.selection_block=16"]
# The clustering family: EfficientNet-Lite0 from ImageNet so that the tiny set
# clusters into enough pseudo-identities.
CLUSTER = [
    "--config.model.backbone=efficientnet_lite0",
    "--config.model.pretrained=imagenet",
    "--config.model.embed_dim=0",
    "--config.train.batch_size=16",
    "--config.optimizer.lr=1e-3",
    "--config.model.head=bnneck",
    "--config.train.num_instances=2",
    "--config.cluster.k1=10",
    "--config.cluster.k2=4",
    "--config.cluster.min_samples=2",
    "--config.cluster.eps=0.5",
]
RELEASE = [
    "--config.method.mixture_update=release",
    "--config.method.gradient=release",
    "--config.method.warmup_sampling=release",
]
# Each method's settings written out (the values these runs have always had),
# so that a change of a method's declared defaults does not change the runs.
METHOD_FLAGS = {
    name: [f"--config.method.name={name}"]
    + [f"--config.method.{key}={value}" for key, value in settings.items()]
    for name, settings in {
        "cluster_contrast": dict(temperature=0.05),
        "cap": dict(temperature=0.05, momentum=0.1),
        "hhcl": dict(temperature=0.05, instance_momentum=0.2),
        "joint": dict(temperature=0.05, instance_weight=1.0),
        "self_paced": dict(temperature=0.05, momentum=0.1),
        "supervised": dict(),
    }.items()
}
RUNS = {
    "scl": TINY + SCL_TINY,
    "scl_release": TINY + SCL_TINY + RELEASE,
    # One release switch at a time.
    **{
        f"scl_release_{flag.split('.')[2].split('=')[0]}": TINY + SCL_TINY + [flag]
        for flag in RELEASE
    },
    **{name: TINY + CLUSTER + flags for name, flags in METHOD_FLAGS.items()},
    "cc_hard": TINY
    + CLUSTER
    + METHOD_FLAGS["cluster_contrast"]
    + ["--config.method.memory_update=hard"],
    "cap_camneg": TINY
    + CLUSTER
    + METHOD_FLAGS["cap"]
    + [
        "--config.method.camera_negatives=True",
        "--config.cluster.camera_centering=True",
    ],
    "synthetic_default": [
        "--config.train.epochs=2",
        "--config.train.steps_per_epoch=8",
        "--config.train.eval_every=1",
        "--config.train.log_every=1",
    ],
}


def run_all(repo: str, out: str, names: list[str], root: str) -> None:
    if not os.path.isdir(root):
        sys.path.insert(0, repo)
        from jaxreid.data import synthetic

        synthetic.generate(
            root,
            num_ids=24,
            num_cameras=3,
            images_per_id_per_camera=2,
            seed=3,
            num_distractors=4,
            num_junk=2,
        )
    results = json.load(open(out)) if os.path.exists(out) else {}
    for name in names or list(RUNS):
        flags = (
            RUNS[name]
            if name == "synthetic_default"
            else [*RUNS[name], f"--config.data.root={root}"]
        )
        workdir = tempfile.mkdtemp(prefix=f"traj_{name}_")
        command = [
            sys.executable,
            "-m",
            "jaxreid.main",
            "--config=configs/synthetic.py",
            f"--workdir={workdir}",
            *flags,
        ]
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
        if done.returncode:
            print(name, "FAILED", done.stdout[-1500:], done.stderr[-1500:], flush=True)
            results[name] = {"error": done.returncode}
            continue
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        for row in rows:  # timings differ between any two runs
            for key in [k for k in row if k.endswith("_s")]:
                del row[key]
        results[name] = rows
        losses = [round(r["loss"], 6) for r in rows if "loss" in r]
        print(f"{name}: {len(losses)} steps, losses {losses}", flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


def compare(before_path: str, after_path: str) -> None:
    before, after = json.load(open(before_path)), json.load(open(after_path))
    print(
        "| run | steps | losses identical | evaluations identical | "
        "every logged row identical | final mAP |"
    )
    print("|---|---:|---|---|---|---:|")
    for name in before:
        if name not in after:
            continue
        a, b = before[name], after[name]
        if isinstance(a, dict) or isinstance(b, dict):
            print(f"| {name} | failed | | | | |")
            continue
        la = [r["loss"] for r in a if "loss" in r]
        lb = [r["loss"] for r in b if "loss" in r]
        ea = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in a]
        eb = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in b]
        final = [r["eval/plain/mAP"] for r in b if "eval/plain/mAP" in r]
        print(
            f"| {name} | {len(lb)} | {la == lb} | {ea == eb} | {a == b} | {100 * final[-1]:.2f} |"
        )


# absl's global flags: this tool imports jaxreid only from --repo (another
# checkout), so it does not use jaxreid.command_line.
_REPO = flags.DEFINE_string("repo", ".", "the checkout whose python -m jaxreid.main runs")
_OUT = flags.DEFINE_string("out", None, "JSON file written")
_ROOT = flags.DEFINE_string(
    "root", os.path.join(tempfile.gettempdir(), "traj_tiny_set"), "tiny set (made if absent)"
)
_RUNS = flags.DEFINE_string("runs", "", f"comma-separated subset of {', '.join(RUNS)}")
_COMPARE = flags.DEFINE_multi_string(
    "compare", None, "BEFORE AFTER: the two JSON files to compare (--compare BEFORE AFTER)"
)


def main(argv: list[str]) -> None:
    if _COMPARE.value:
        files = [*_COMPARE.value, *argv[1:]]  # --compare BEFORE AFTER leaves AFTER positional
        if len(files) != 2:
            raise app.UsageError(f"--compare takes two files, BEFORE and AFTER, not {files}")
        compare(*files)
        return
    if len(argv) > 1:
        raise app.UsageError(f"unrecognized arguments: {' '.join(argv[1:])}")
    run_all(
        os.path.abspath(_REPO.value),
        _OUT.value,
        [n for n in _RUNS.value.split(",") if n],
        _ROOT.value,
    )


if __name__ == "__main__":
    app.run(main)
