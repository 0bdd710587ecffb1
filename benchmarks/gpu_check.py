"""One-shot accelerator check: training speed, an epoch of each recipe,
selection and clustering at scale. Run through benchmarks/gpu_check.sh.

    bash benchmarks/gpu_check.sh                  # full sizes (one H200: 8 min 25 s)
    bash benchmarks/gpu_check.sh --small          # CI-sized, on the CPU
    bash benchmarks/gpu_check.sh --skip cluster   # leave parts out

Parts (each result is written to the JSON as soon as it is measured, so a
run cut short keeps what it measured):
  train      ResNet-50 256x128 cluster-recipe step (batch 256, BN groups of
             64), float32 and bfloat16: img/s, and for bfloat16 the fraction
             of the chip's dense bf16 peak that ~25 GFLOP per trained image
             implies (H100 / H200: 989 TFLOP/s).
  epoch      one epoch of the SCL paper config (batch 8, 1,617 steps) and of
             the cluster recipe (extraction + clustering + 200 steps of 256)
             on a Market-sized set of 12,936 random images.
  selection  SCL candidate selection against 1,000,000 bank rows (D 2,048).
  cluster    kNN + k-reciprocal Jaccard + DBSCAN of 32,621 and 1,000,000
             features (the on-device kNN), in a second process started
             beside the epoch part (--sequential: after it). Its kNN shares
             the accelerator with the epoch's steps for a while; the epoch
             figures alone: --skip cluster.
--small shrinks every size (ResNet-18 at 64x32, 64 images, 4,000 rows, 2,000
features) so that a test runs the whole script in about a minute.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax_step import CONFIGS, JaxStep, load_config  # noqa: E402

sys.path.insert(0, CONFIGS)
from recipes import cluster_config  # noqa: E402  configs/recipes.py

from jaxreid import command_line  # noqa: E402
from jaxreid.host import configure_host  # noqa: E402
from jaxreid.utils import machine_description  # noqa: E402

GFLOP_PER_TRAINED_IMAGE = 25.0  # ResNet-50 256x128, last stride 1, forward + backward
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM

FULL = dict(
    backbone="resnet50",
    height=256,
    width=128,
    batch=256,
    group=64,
    steps=10,
    images=12936,
    scl_batch=8,
    cluster_steps=200,
    rows=1_000_000,
    dim=2048,
    cluster_sizes=(32621, 1_000_000),
)
SMALL = dict(
    backbone="resnet18",
    height=64,
    width=32,
    batch=16,
    group=8,
    steps=2,
    images=64,
    scl_batch=8,
    cluster_steps=2,
    rows=4000,
    dim=256,
    cluster_sizes=(2000,),
)


def shrink(config: ml_collections.ConfigDict, s: dict) -> ml_collections.ConfigDict:
    config.model.backbone = s["backbone"]
    # GPUs ignore it; on the CPU its longer compilation would dominate the small form.
    config.model.winograd = False
    config.data.height, config.data.width = s["height"], s["width"]
    if s is SMALL:
        config.model.num_stripes = min(config.model.num_stripes, 2)
    if "cluster" in config:
        # The on-device kNN: GPU hosts need no faiss-gpu build for this check.
        config.cluster.knn_backend = "jax"
    return config


# The cluster-recipe step in float32, kept from the train part for the epoch
# part (same config and image count): one ResNet-50 compilation less.
_STEPS: dict[str, JaxStep] = {}


def cluster_recipe_step(s: dict, dtype: str) -> JaxStep:
    if dtype not in _STEPS:
        config = shrink(cluster_config("market1501", ""), s)
        config.model.dtype = dtype
        config.train.batch_size, config.model.bn_group_size = s["batch"], s["group"]
        _STEPS[dtype] = JaxStep(config, s["images"])
    return _STEPS[dtype]


def train_throughput(s: dict, dtype: str) -> dict:
    step = cluster_recipe_step(s, dtype)
    times = step.time_steps(warmup=2, repeats=s["steps"])
    if dtype != "float32":
        del _STEPS[dtype]  # free its device memory
    rate = s["batch"] / float(np.median(times))
    out = {"img_per_s": rate, "step_ms": 1e3 * float(np.median(times))}
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in kind), None)
    if dtype == "bfloat16" and peak and s is FULL:
        out["fraction_of_bf16_peak"] = rate * GFLOP_PER_TRAINED_IMAGE / (peak * 1e3)
    return out


def timed_epoch(step: JaxStep, num_steps: int) -> float:
    step.run(0)  # compile
    start = time.perf_counter()
    for i in range(num_steps):
        step.run(i)
    return time.perf_counter() - start


def scl_epoch(s: dict) -> dict:
    config = shrink(load_config("market.py"), s)
    step = JaxStep(config, s["images"])
    steps = s["images"] // s["scl_batch"]
    train_s = timed_epoch(step, steps)
    extract_s = extract_all(step, config.eval.batch_size)
    return {
        "steps": steps,
        "train_s": train_s,
        "extract_s": extract_s,
        "total_s": train_s + extract_s,
    }


def cluster_epoch(s: dict) -> dict:
    from clustering import measure

    step = cluster_recipe_step(s, "float32")
    train_s = timed_epoch(step, s["cluster_steps"])
    extract_s = extract_all(step, step.config.eval.batch_size)
    # Clustering of the epoch's features: N points of the backbone's width.
    clustered = measure("sparse-jax", s["images"], 2048 if s is FULL else s["dim"], None)
    total = train_s + extract_s + clustered["total_s"]
    return {
        "steps": s["cluster_steps"],
        "train_s": train_s,
        "extract_s": extract_s,
        "cluster_s": clustered["total_s"],
        "total_s": total,
    }


def extract_all(step: JaxStep, batch: int) -> float:
    from jaxreid.evaluate.protocol import extract

    params, stats = step.state.params, step.state.batch_stats
    extract(step.graphdef, params, stats, step.images[:batch], batch)  # compile
    start = time.perf_counter()
    extract(step.graphdef, params, stats, step.images, batch)
    return time.perf_counter() - start


def selection(s: dict) -> dict:
    from scl_step import bench_scaling

    args = SimpleNamespace(
        stripes=8, bank_dtype="float32", k=7, n=500, block_size=None, approx=False, repeats=3
    )
    times = bench_scaling(args, s["rows"], s["dim"], 8)
    return {"rows": s["rows"], "dim": s["dim"], "batch": 8, "ms": 1e3 * float(np.median(times))}


def clustering_of(s: dict, n: int) -> dict:
    from clustering import measure

    m = measure("sparse-jax", n, s["dim"] if s is SMALL else 2048, None, log=_progress)
    return {k: m[k] for k in ("knn_s", "jaccard_s", "dbscan_s", "total_s", "clusters")}


def _progress(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", flush=True)


def _each(s: dict, save, items: dict) -> dict:
    """Runs the measurements of one part in order, saving after each."""
    out = {}
    for key, measure_one in items.items():
        out[key] = measure_one(s)
        save(out)
    return out


# In this order: the cheap, sure figures first (a run cut short keeps them).
PARTS = {
    "train": lambda s, save: _each(
        s, save, {d: functools.partial(train_throughput, dtype=d) for d in ("float32", "bfloat16")}
    ),
    "selection": lambda s, save: selection(s),
    "epoch": lambda s, save: _each(
        s, save, {"scl_paper": scl_epoch, "cluster_recipe": cluster_epoch}
    ),
    "cluster": lambda s, save: _each(
        s, save, {str(n): functools.partial(clustering_of, n=n) for n in s["cluster_sizes"]}
    ),
}


def table(results: dict) -> str:
    lines = [f"# {results['machine']}", "| part | figure |", "|---|---|"]
    for part, value in results["parts"].items():
        for key, figure in _flatten(value):
            lines.append(
                f"| {part} {key} | {figure:.4g} |"
                if isinstance(figure, float)
                else f"| {part} {key} | {figure} |"
            )
    return "\n".join(lines)


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k} ")
    else:
        yield prefix.strip(), value


def _part_of(path: str, name: str, s: dict, save) -> dict:
    """A part measured by the second process, read from its JSON."""
    with open(path) as f:
        value = json.load(f)["parts"][name]
    os.remove(path)
    return value


PROG = "benchmarks/gpu_check.py"


def define_flags(fv: flags.FlagValues) -> None:
    """One-shot accelerator check (see the module docstring)."""
    flags.DEFINE_bool("small", False, "CI sizes (CPU, about a minute)", flag_values=fv)
    flags.DEFINE_string("skip", "", f"comma-separated parts of {', '.join(PARTS)}", flag_values=fv)
    flags.DEFINE_string("out", "gpu_check.json", "the JSON written", flag_values=fv)
    flags.DEFINE_bool(
        "sequential",
        False,
        "run the cluster part after the others instead of in a second process beside "
        "the epoch part",
        flag_values=fv,
    )


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = command_line.parse(define_flags, argv, PROG)
    sizes = SMALL if args.small else FULL
    skip = {p for p in args.skip.split(",") if p}
    if skip - set(PARTS):
        unknown = sorted(skip - set(PARTS))
        command_line.fail(PROG, f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    results = {
        "machine": machine_description(),
        "sizes": "small" if args.small else "full",
        "parts": {},
    }
    print(results["machine"], flush=True)

    def save(name: str, value: dict) -> None:
        results["parts"][name] = value
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    # The cluster part (host Jaccard and DBSCAN, minutes at 1M) runs in a second
    # process beside the epoch part, after the train and selection figures.
    beside = None
    if not args.sequential and not {"epoch", "cluster"} & skip:
        beside = f"{args.out}.cluster.json"
        command = [sys.executable, os.path.abspath(__file__), "--out", beside]
        command += ["--skip", "train,selection,epoch"] + (["--small"] if args.small else [])
    cluster_process = None
    for name, run in PARTS.items():
        if name in skip:
            continue
        if name == "epoch" and beside:
            print("cluster: started in a second process, beside the epoch part", flush=True)
            cluster_process = subprocess.Popen(command)
        if name == "cluster" and cluster_process:
            cluster_process.wait()
            run = functools.partial(_part_of, beside, "cluster")
        start, started_at = time.perf_counter(), time.time()
        try:
            value = run(sizes, functools.partial(save, name))
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
            traceback.print_exc()
            value = dict(results["parts"].get(name, {}), error=f"{type(e).__name__}: {e}")
        # Wall-clock bounds, to tell which parts overlapped when parts run in parallel.
        value.update(
            wall_s=time.perf_counter() - start, started_at=started_at, ended_at=time.time()
        )
        save(name, value)
        print(f"{name}: {json.dumps(value)}", flush=True)
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    command_line.run(main)
