"""The deploy path side by side (issue #53): jaxreid's ONNX export against
jaxreid's own extraction and against a PyTorch export of the same network.

    python benchmarks/export_compare.py                     # the four backbones
    python benchmarks/export_compare.py --backbones osnet_x0_25 --repeats 20
    python benchmarks/export_compare.py --noint8 --notorch  # jaxreid only

Each backbone is built with its configs' head (its row of BACKBONES: Lite0
and ResNet-50 the BN neck with GeM pooling, OSNet-x0.25 torchreid's 512-d
`fc` embedding, ViT-Ti the BN neck on the [CLS] token), in eval mode,
"global" output only, with real weights where they are at hand (WEIGHTS: the
packaged ImageNet Lite0, the shared MSMT17 OSNet; ResNet-50 and ViT-Ti
random), on the first CUHK03 test crops when they are at
hand (random pixels otherwise). Rows:

- `jaxreid -> ONNX`: `jaxreid.export.export_onnx` (jax2onnx under
  `export_mode()`), input float32 (batch, H, W, 3) pixels [0, 255].
- `jaxreid -> ONNX int8`: that file through `jaxreid.export.quantize_int8`
  (onnxruntime's dynamic quantisation; --int8).
- `PyTorch -> ONNX`: `torch.onnx.export` (the TorchScript exporter, which
  folds batch norm into the convolutions) of the transcription in
  benchmarks/torch_reference.py (the train-step benchmark's; OSNet is the
  test suite's tests/torch_osnet.py) with the same head and last stride,
  the (x - mean) / std normalisation inside, input float32 NCHW pixels: the
  graph a PyTorch user deploys. OSNet takes the same torchreid checkpoint
  (its features compare); Lite0 (whose transcription pads symmetrically,
  not as TF's "SAME") and ResNet-50 random weights of their own.
- `PyTorch -> ONNX, subnormals flushed`: when that file holds subnormal
  weights, the same graph with them set to zero, as jaxreid's export
  writes its weights (`jaxreid.export.flush_subnormals`): the graphs compare.
- `jaxreid Embedder`: `Embedder.embed` on uint8 images (jit-compiled XLA).

Columns: export seconds (after jax2onnx's one-time start-up, printed below
the table: it loads its plugins at a process's first conversion), node count
(all nodes; `ops` without Constant / Identity, which only the TorchScript
exporter emits) and the most common operators, file size, max |features -
jaxreid's| over --images random uint8 images, and images/s at batch 1 and
--batch. Every engine runs with as many threads as cores (onnxruntime
intra_op_num_threads, XLA's default). The timings are interleaved: each of
--repeats rounds times every engine once at each batch size, and the table
shows the medians, so load from other processes hits all columns alike. A
timed sample covers --batch images: one call at --batch, --batch calls in a
row at batch 1 (a single call of a few ms measures thread wake-ups and the
timer more than the graph); each engine first runs 3 warm-up calls.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from absl import flags

from jaxreid.command_line import parse, run

BACKBONES = {  # name: (height, width, head, embed_dim, pooling)
    "efficientnet_lite0": (128, 64, "bnneck", 0, "gem"),
    "osnet_x0_25": (256, 128, "fc", 512, "avg"),
    "resnet50": (256, 128, "bnneck", 0, "gem"),
    # configs/cuhk03_vit.py's size; random weights, as ResNet-50.
    "vit_tiny": (128, 64, "bnneck", 0, "cls"),
}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# Real weights where they are at hand (the packaged ImageNet Lite0, the shared
# torchreid MSMT17 OSNet), so that the features and their differences are a
# real model's: random Lite0 weights saturate every ReLU6 and give the same
# feature for every image. ResNet-50 keeps random weights.
WEIGHTS = {
    "efficientnet_lite0": "imagenet",
    "osnet_x0_25": os.path.join(ROOT, "..", "shared", "data", "weights", "osnet_x0_25_msmt17.pth"),
}
CROPS = os.path.join(ROOT, "..", "shared", "data", "cuhk03", "bounding_box_test")
# Nodes that carry no computation: the TorchScript exporter's scalar constants
# and the Identity nodes it puts on shared initialisers.
NON_OPERATORS = ("Constant", "Identity")
TORCH_OPSET = 17

PROG = "benchmarks/export_compare.py"


def define_flags(fv: flags.FlagValues) -> None:
    """The deploy path side by side (see the module docstring)."""
    flags.DEFINE_string(
        "backbones", ",".join(BACKBONES), "comma-separated backbone names", flag_values=fv
    )
    flags.DEFINE_integer("batch", 32, "the larger timed batch (the other is 1)", flag_values=fv)
    flags.DEFINE_integer("images", 32, "random images for the max abs diff", flag_values=fv)
    flags.DEFINE_integer("repeats", 9, "timed rounds (medians shown)", flag_values=fv)
    flags.DEFINE_bool("torch", True, "the PyTorch export row", flag_values=fv)
    flags.DEFINE_bool("int8", True, "the dynamic int8 row", flag_values=fv)
    flags.DEFINE_string("out_dir", "", "keep the .onnx files here (default: temp)", flag_values=fv)
    flags.DEFINE_string(
        "map_backbone",
        "",
        "also CUHK03 mAP / rank-1 of this backbone's jaxreid extraction, float32 and "
        "int8 graphs (the shared crops; minutes)",
        flag_values=fv,
    )


def usual_weights(backbone: str) -> str:
    """`pretrained` for `backbone`: its WEIGHTS entry when available, else ""."""
    weights = WEIGHTS.get(backbone, "")
    if weights == "imagenet":
        from jaxreid.models.pretrained import EFFICIENTNET_LITE0_PACKAGE

        found = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE) is not None
        return weights if found else ""
    return weights if weights and os.path.exists(weights) else ""


def build_embedder(backbone: str, pretrained: str = ""):
    """An eval-mode Embedder of `backbone` at its benchmark size with its
    BACKBONES head, weights from `pretrained` ("" = random)."""
    from flax import nnx

    from jaxreid import models
    from jaxreid.config_base import base_config
    from jaxreid.inference import Embedder

    height, width, head, embed_dim, pooling = BACKBONES[backbone]
    config = base_config()
    config.data.height, config.data.width = height, width
    config.model.backbone, config.model.pretrained = backbone, pretrained
    config.model.head, config.model.embed_dim, config.model.pooling = head, embed_dim, pooling
    if backbone.startswith("vit_"):
        config.model.image_size = (height, width)
    model = models.build_model(config.model, rngs=nnx.Rngs(0))
    return Embedder(config, *models.split_model(model))


def benchmark_images(embedder, count: int) -> tuple[np.ndarray, str]:
    """`count` uint8 images at the model's size: the first CUHK03 test crops
    when they are at hand, else uniform noise; and which."""
    if os.path.isdir(CROPS):
        names = sorted(n for n in os.listdir(CROPS) if n.endswith(".jpg"))[:count]
        if len(names) == count:
            return embedder.load_images([os.path.join(CROPS, n) for n in names]), "CUHK03 crops"
    shape = (count, embedder.height, embedder.width, 3)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), "random pixels"


def torch_deploy_model(embedder):
    """The PyTorch transcription of `embedder`'s network (eval mode): float32
    NCHW pixels [0, 255] -> the L2-normalised global feature."""
    import torch
    from torch.nn import functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_reference

    from jaxreid.augment import IMAGENET_MEAN, IMAGENET_STD
    from jaxreid.models.efficientnet import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD
    from jaxreid.models.vit import PIXEL_MEAN, PIXEL_STD

    model_config = embedder.config.model
    name = model_config.backbone
    mean, std = (
        (EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)
        if name.startswith("efficientnet")
        else (PIXEL_MEAN, PIXEL_STD)
        if name.startswith("vit_")
        else (IMAGENET_MEAN, IMAGENET_STD)
    )

    class Deployed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch_reference.build_backbone(
                name,
                int(model_config.last_stride),
                model_config,
                (embedder.height, embedder.width),
            )
            self.head = torch_reference.Head(
                model_config.head,
                self.backbone.num_features,
                int(model_config.embed_dim),
                model_config.pooling,
                0,
                int(model_config.num_stripes),
            )
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

        def forward(self, images):
            out = self.head(self.backbone((images - self.mean) / self.std))
            return F.normalize(out["neck"] if "neck" in out else out["feature"], dim=1)

    torch.manual_seed(0)
    return Deployed().eval()


def load_torchreid_weights(model, path: str) -> None:
    """A torchreid OSNet checkpoint into `torch_deploy_model`'s OSNet (its
    transcription keeps torchreid's keys; the `fc` embedding is the head's)."""
    import torch

    from jaxreid.models.pretrained import read_checkpoint

    state = {k: torch.from_numpy(np.array(v)) for k, v in read_checkpoint(path).items()}
    model.backbone.net.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}, strict=False
    )
    model.head.fc.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("fc.")})


def export_torch(model, path: str, height: int, width: int) -> None:
    """torch.onnx.export with a dynamic batch (the TorchScript exporter)."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # its deprecation notice
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, height, width),),
            path,
            dynamo=False,
            input_names=["images"],
            output_names=["global"],
            dynamic_axes={"images": {0: "batch"}, "global": {0: "batch"}},
            opset_version=TORCH_OPSET,
        )


def flushed_subnormals(path: str, out: str) -> int:
    """Writes `path` with its subnormal weights set to zero to `out` (when it
    has any); returns how many it had."""
    import onnx

    from jaxreid.export import flush_subnormals

    model = onnx.load(path)
    flushed = flush_subnormals(model)
    if flushed:
        onnx.save(model, out)
    return flushed


def op_histogram(path: str) -> collections.Counter:
    """Operator -> node count, over the graph and its local functions."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return collections.Counter(node.op_type for node in nodes)


def graph_cells(path: str, top: int = 5) -> dict:
    ops = op_histogram(path)
    operators = sum(n for op, n in ops.items() if op not in NON_OPERATORS)
    common = ", ".join(f"{op} {n}" for op, n in ops.most_common(top))
    return {
        "nodes": f"{sum(ops.values())} ({operators} ops)",
        "top": common,
        "mb": f"{os.path.getsize(path) / 2**20:.1f}",
    }


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = os.cpu_count() or 1, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session_runner(path: str, nchw: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 NHWC images -> the graph's first output."""
    sess = session(path)
    name = sess.get_inputs()[0].name

    def features(images: np.ndarray) -> np.ndarray:
        floats = images.astype(np.float32)
        if nchw:
            floats = np.ascontiguousarray(floats.transpose(0, 3, 1, 2))
        return sess.run(None, {name: floats})[0]

    return features


def interleaved_rates(
    engines: dict[str, Callable[[np.ndarray], object]],
    images: np.ndarray,
    batches: tuple[int, ...],
    repeats: int,
    images_per_sample: int = 32,
    warmup_calls: int = 3,
) -> dict[tuple[str, int], float]:
    """Median images/s of each engine at each batch size; every round times
    each (engine, batch) once, after `warmup_calls` calls of each. A timed
    sample is ceil(images_per_sample / batch) calls in a row: one batch-1
    call (a few ms) is at the mercy of thread wake-ups and the timer, so
    batch 1 is timed over as many images as the large batch."""
    for engine in engines.values():
        for batch in batches:
            for _ in range(warmup_calls):
                engine(images[:batch])
    times = collections.defaultdict(list)
    for _ in range(repeats):
        for batch in batches:
            calls = -(-images_per_sample // batch)
            for name, engine in engines.items():
                start = time.perf_counter()
                for _ in range(calls):
                    engine(images[:batch])
                times[name, batch].append((time.perf_counter() - start) / calls)
    return {key: key[1] / statistics.median(t) for key, t in times.items()}


def jax2onnx_startup_s() -> float:
    """Seconds of a process's first jax2onnx conversion (it imports its
    plugins then), on a one-op function."""
    from jax2onnx import to_onnx

    start = time.perf_counter()
    to_onnx(lambda x: x + 1.0, [(2,)])
    return time.perf_counter() - start


def _one_line(error: BaseException, limit: int = 120) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _versions() -> str:
    from importlib import metadata

    names = ("jax", "flax", "jax2onnx", "onnx", "onnxruntime", "torch")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def measure_backbone(backbone: str, args, out_dir: str) -> tuple[list[dict], dict, dict]:
    """The rows of one backbone, its images/s per (engine, batch) and notes
    (its weights, its images)."""
    from jaxreid.export import export_onnx, quantize_int8

    weights = usual_weights(backbone)
    embedder = build_embedder(backbone, weights)
    height, width = embedder.height, embedder.width
    images, source = benchmark_images(embedder, max(args.images, args.batch))
    notes = {"weights": os.path.basename(weights) or "random", "images": source}
    want = embedder.embed(images[: args.images], batch_size=args.batch)["global"]
    rows, engines = [], {}

    def add_graph(
        name: str,
        path: str,
        build: Callable[[], None] | None,
        nchw: bool = False,
        compare: bool = True,
    ) -> bool:
        """A row for the graph at `path`, written by `build` (timed; None: it
        is there) and run from NCHW input with `nchw`; whether it runs."""
        row = {"graph": name}
        try:
            if build is not None:
                start = time.perf_counter()
                build()
                row["export_s"] = f"{time.perf_counter() - start:.1f}"
            row.update(graph_cells(path))
            engine = session_runner(path, nchw)
            if compare:
                got = engine(images[: args.images])
                row["diff"] = f"{np.abs(got - want).max():.1e}"
            engines[name] = engine
        except Exception as e:  # noqa: BLE001 - a cell, not a crash
            row["export_s"] = f"failed: {_one_line(e)}"
        rows.append(row)
        return name in engines

    path = os.path.join(out_dir, f"{backbone}.onnx")
    add_graph("jaxreid -> ONNX", path, lambda: export_onnx(embedder, path))
    if args.int8:
        int8_path = os.path.join(out_dir, f"{backbone}.int8.onnx")
        add_graph("jaxreid -> ONNX int8", int8_path, lambda: quantize_int8(path, int8_path))
    if args.torch:
        torch_path = os.path.join(out_dir, f"{backbone}.torch.onnx")
        # jaxreid's weights where the transcription takes them (OSNet), so
        # its features compare too; random ones otherwise.
        shared = weights.endswith(".pth") and backbone.startswith("osnet")

        def build_torch() -> None:
            model = torch_deploy_model(embedder)
            if shared:
                load_torchreid_weights(model, weights)
            export_torch(model, torch_path, height, width)

        exported = add_graph("PyTorch -> ONNX", torch_path, build_torch, True, shared)
        flushed_path = os.path.join(out_dir, f"{backbone}.torch.flushed.onnx")
        if exported and flushed_subnormals(torch_path, flushed_path):
            # The same graph without subnormal weights, as jaxreid's export
            # writes them: the graphs compare, not the weights' bits.
            name = "PyTorch -> ONNX, subnormals flushed"
            add_graph(name, flushed_path, None, True, shared)

    def extraction(batch_images: np.ndarray) -> None:
        embedder.embed(batch_images, batch_size=len(batch_images))

    engines["jaxreid Embedder"] = extraction
    rows.append({"graph": "jaxreid Embedder"})
    if backbone == args.map_backbone:
        accuracy = cuhk03_accuracy(
            embedder,
            {
                "jaxreid Embedder": lambda x: embedder.embed(x, batch_size=args.batch)["global"],
                **{name: engines[name] for name in engines if name.startswith("jaxreid ->")},
            },
            args.batch,
        )
        notes["cuhk03"] = "; ".join(
            f"{name} {100 * a['mAP']:.1f} mAP / {100 * a['rank1']:.1f} rank-1"
            for name, a in accuracy.items()
        )
    batches = (1, args.batch)
    rates = interleaved_rates(engines, images, batches, args.repeats, args.batch)
    for row in rows:
        for batch in batches:
            rate = rates.get((row["graph"], batch))
            row[f"ips{batch}"] = f"{rate:.0f}" if rate else ""
    return rows, rates, notes


def cuhk03_accuracy(embedder, engines: dict[str, Callable], batch: int) -> dict[str, dict]:
    """mAP and rank-1 (Market protocol, cosine distance) on the CUHK03 split
    at CROPS' parent, per engine (name -> uint8 images -> global features)."""
    from jaxreid.data.datasets import load_dataset
    from jaxreid.evaluate.distances import cosine_distance
    from jaxreid.evaluate.metrics import evaluate_ranking

    data = load_dataset("cuhk03", os.path.dirname(CROPS))
    splits = {name: getattr(data, name) for name in ("query", "gallery")}
    images = {
        name: embedder.load_images([r.path for r in records]) for name, records in splits.items()
    }
    results = {}
    for engine_name, engine in engines.items():
        features = {
            name: np.concatenate(
                [engine(split[i : i + batch]) for i in range(0, len(split), batch)]
            )
            for name, split in images.items()
        }
        result = evaluate_ranking(
            cosine_distance(features["query"], features["gallery"]),
            *(np.array([r.pid for r in splits[n]]) for n in ("query", "gallery")),
            *(np.array([r.camera for r in splits[n]]) for n in ("query", "gallery")),
        )
        results[engine_name] = {"mAP": result["mAP"], "rank1": result["rank1"]}
    return results


def ratio_line(backbone: str, rates: dict, batch: int) -> str:
    """onnxruntime on jaxreid's export over the PyTorch exports and over the Embedder."""
    ours = "jaxreid -> ONNX"
    parts = []
    others = ("PyTorch -> ONNX", "PyTorch -> ONNX, subnormals flushed", "jaxreid Embedder")
    for other in others:
        cells = [
            f"{rates[ours, b] / rates[other, b]:.2f}x @{b}"
            for b in (1, batch)
            if (ours, b) in rates and (other, b) in rates
        ]
        if cells:
            parts.append(f"over {other}: {', '.join(cells)}")
    return f"{backbone}: jaxreid -> ONNX " + "; ".join(parts)


def main(argv=None) -> None:
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)  # type-annotation notes
    from jaxreid.utils import machine_description

    backbones = [b for b in args.backbones.split(",") if b]
    if unknown := [name for name in backbones if name not in BACKBONES]:
        sys.exit(f"unknown {unknown}: choose from {tuple(BACKBONES)}")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="export_compare_")
    os.makedirs(out_dir, exist_ok=True)
    startup = jax2onnx_startup_s()
    keys = ("graph", "export_s", "nodes", "top", "mb", "diff", "ips1", f"ips{args.batch}")
    header = (
        "| backbone | graph | export s | nodes | most common operators | MB |"
        f" max abs diff | img/s @1 | img/s @{args.batch} |"
    )
    table, ratios = [header, "|" + "---|" * 9], []
    for backbone in backbones:
        height, width = BACKBONES[backbone][:2]
        rows, rates, notes = measure_backbone(backbone, args, out_dir)
        for row in rows:
            cells = [row.get(key, "") for key in keys]
            table.append(f"| {backbone} {height}x{width} | " + " | ".join(cells) + " |")
            print(table[-1], file=sys.stderr, flush=True)
        ratios.append(
            ratio_line(backbone, rates, args.batch)
            + f" (weights {notes['weights']}, {notes['images']})"
        )
        if "cuhk03" in notes:
            ratios.append(f"{backbone} on CUHK03 (query vs gallery): {notes['cuhk03']}")
    print("\n".join(table))
    print("\n" + "\n".join(ratios))
    print(f"\njax2onnx start-up (a process's first conversion, once): {startup:.1f} s")
    print(f"{machine_description()}; {os.cpu_count()} threads per engine")
    print(f"{_versions()}\nONNX files in {out_dir}")


if __name__ == "__main__":
    run(main)
