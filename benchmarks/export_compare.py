"""ONNX exporters side by side: jax2onnx vs jax2tf + tf2onnx (issue #15).

    python benchmarks/export_compare.py               # all backbones, both exporters
    python benchmarks/export_compare.py --backbones efficientnet_lite0 --exporters jax2onnx
    python benchmarks/export_compare.py --pooling gem --batch 4

jax2tf + tf2onnx needs tensorflow and tf2onnx; keep them out of jaxreid's
environment, in a venv that sees it:

    python3 -m venv --system-site-packages /tmp/venv_tf
    /tmp/venv_tf/bin/pip install tensorflow-cpu tf2onnx
    /tmp/venv_tf/bin/python benchmarks/export_compare.py

Each backbone is built with random weights (its usual head: efficientnet_lite0
and resnet50 BN neck with their configs' GeM pooling, osnet_x0_25 the 512-d `fc`
embedding with average pooling; --pooling avg / gem for all; each has the
"global" output only), in eval mode: by `jaxreid.export.export_onnx` itself,
and the same traced function (`jaxreid.export.exported_function`) through
jax2tf + tf2onnx; input "images" float32 (batch, H, W, 3) in pixel scale
[0, 255] with a dynamic batch. Per exporter: export seconds (one export, after
imports and model building), file size, ONNX node count (graph plus local
functions), max |onnxruntime - jaxreid| over --batch random uint8 images
(jaxreid = its own eval forward, `Embedder.embed`), whether batch 1 and --batch
both run, and onnxruntime CPU images/s at --batch (median of 5 timed runs after
one warm-up, intra_op_num_threads=2). A failure is shown as its one-line error
in the row instead of stopping the run.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from jaxreid.command_line import parse, run  # noqa: E402

BACKBONES = {  # name: (height, width, head, embed_dim, pooling)
    "efficientnet_lite0": (128, 64, "bnneck", 0, "gem"),
    "osnet_x0_25": (256, 128, "fc", 512, "avg"),
    "resnet50": (256, 128, "bnneck", 0, "gem"),
}
EXPORTERS = ("jax2onnx", "jax2tf+tf2onnx")
TF2ONNX_OPSET = 17  # the newest opset tf2onnx 1.17 maps to an IR version is 18
REPEATS = 5


PROG = "benchmarks/export_compare.py"


def define_flags(fv: flags.FlagValues) -> None:
    """ONNX export paths compared (see the module docstring)."""
    flags.DEFINE_string(
        "backbones", ",".join(BACKBONES), "comma-separated backbone names", flag_values=fv
    )
    flags.DEFINE_string(
        "exporters", ",".join(EXPORTERS), f"comma-separated, of {EXPORTERS}", flag_values=fv
    )
    flags.DEFINE_integer("batch", 16, "images per accuracy/speed batch", flag_values=fv)
    flags.DEFINE_enum(
        "pooling",
        "usual",
        ["avg", "gem", "usual"],
        "global pooling: each backbone's usual one (default), avg or gem",
        flag_values=fv,
    )
    flags.DEFINE_string("out_dir", "", "keep the .onnx files here (default: temp)", flag_values=fv)


def build_embedder(backbone: str, pooling: str = "avg"):
    """A random-initialised eval-mode Embedder of `backbone` at its benchmark size
    (`pooling` "usual" = the one in BACKBONES)."""
    from flax import nnx

    from jaxreid import models
    from jaxreid.config_base import base_config
    from jaxreid.inference import Embedder

    height, width, head, embed_dim, usual = BACKBONES[backbone]
    pooling = usual if pooling == "usual" else pooling
    config = base_config()
    config.data.height, config.data.width = height, width
    config.model.backbone, config.model.pretrained = backbone, ""
    config.model.head, config.model.embed_dim, config.model.pooling = head, embed_dim, pooling
    model = models.build_model(config.model, rngs=nnx.Rngs(0))
    return Embedder(config, *models.split_model(model))


def export_jax2onnx(embedder, path: str) -> None:
    """jaxreid's own export (`jaxreid.export.export_onnx`; opset: jax2onnx's default)."""
    from jaxreid.export import export_onnx

    export_onnx(embedder, path)


def export_jax2tf_tf2onnx(embedder, path: str) -> None:
    """jax2tf.convert with a polymorphic batch, then tf2onnx.convert.from_function."""
    import tensorflow as tf
    import tf2onnx
    from jax.experimental import jax2tf

    from jaxreid.export import exported_function
    from jaxreid.models.layers import export_mode

    height, width = embedder.height, embedder.width
    signature = [tf.TensorSpec((None, height, width, 3), tf.float32, name="images")]
    with export_mode():
        converted = jax2tf.convert(
            exported_function(embedder)[0],
            polymorphic_shapes=[f"(b, {height}, {width}, 3)"],
            with_gradient=False,
        )

        @tf.function(input_signature=signature, autograph=False)
        def features(images):
            return tf.identity(converted(images)[0], name="global")

        ops = {op.type for op in features.get_concrete_function().graph.get_operations()}
        logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # it dumps whole failed nodes
        try:
            tf2onnx.convert.from_function(
                features, input_signature=signature, opset=TF2ONNX_OPSET, output_path=path
            )
        except Exception as e:
            if "XlaCallModule" not in ops:
                raise
            raise RuntimeError(
                "tf2onnx cannot convert op XlaCallModule (jax2tf emits the whole model as "
                "one native-serialized StableHLO op)"
            ) from e


EXPORT_FNS = {"jax2onnx": export_jax2onnx, "jax2tf+tf2onnx": export_jax2tf_tf2onnx}


def _one_line(error: BaseException, limit: int = 140) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_nodes(path: str) -> int:
    """Nodes of the ONNX graph plus those of its local functions."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return len(model.graph.node) + sum(len(f.node) for f in model.functions)


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run(session, images: np.ndarray) -> np.ndarray:
    output = session.get_outputs()[0].name
    return session.run([output], {session.get_inputs()[0].name: images})[0]


def measure(embedder, exporter: str, path: str, images: np.ndarray, want: np.ndarray) -> dict:
    """One row's cells: export time, size, nodes, diff, dynamic batch, speed."""
    start = time.perf_counter()
    EXPORT_FNS[exporter](embedder, path)
    row = {"export_s": f"{time.perf_counter() - start:.1f}"}
    row["mb"] = f"{os.path.getsize(path) / 2**20:.1f}"
    row["nodes"] = str(count_nodes(path))
    session = _session(path)
    floats = images.astype(np.float32)
    got = _run(session, floats)
    row["diff"] = f"{np.abs(got - want).max():.1e}" if got.shape == want.shape else f"{got.shape}"
    try:
        one = _run(session, floats[:1])
        ok = one.shape == want[:1].shape and got.shape == want.shape
        row["dynamic"] = "yes" if ok else f"no: {one.shape}, {got.shape}"
    except Exception as e:  # noqa: BLE001 - a cell, not a crash
        row["dynamic"] = f"no: {_one_line(e, 80)}"
    times = []
    _run(session, floats)  # warm-up
    for _ in range(REPEATS):
        start = time.perf_counter()
        _run(session, floats)
        times.append(time.perf_counter() - start)
    row["ips"] = f"{len(floats) / statistics.median(times):.0f}"
    return row


def _versions() -> str:
    from importlib import metadata

    names = ("jax", "jax2onnx", "onnxruntime", "onnx", "tensorflow-cpu", "tensorflow", "tf2onnx")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def main(argv=None) -> None:
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    from jaxreid.utils import machine_description

    backbones = [b for b in args.backbones.split(",") if b]
    exporters = [e for e in args.exporters.split(",") if e]
    for names, known in ((backbones, tuple(BACKBONES)), (exporters, EXPORTERS)):
        if unknown := [name for name in names if name not in known]:
            sys.exit(f"unknown {unknown}: choose from {known}")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="export_compare_")
    os.makedirs(out_dir, exist_ok=True)
    header = "| backbone | input | exporter | export s | MB | nodes | max abs diff |"
    header += f" batch 1 & {args.batch} | ORT img/s @{args.batch} |"
    rows = [header, "|" + "---|" * 9]
    for backbone in backbones:
        embedder = build_embedder(backbone, args.pooling)
        images = np.random.default_rng(0).integers(
            0, 256, (args.batch, embedder.height, embedder.width, 3), dtype=np.uint8
        )
        want = embedder.embed(images, batch_size=args.batch)["global"]
        size = f"{embedder.height}x{embedder.width}"
        for exporter in exporters:
            path = os.path.join(out_dir, f"{backbone}-{exporter.replace('+', '-')}.onnx")
            try:
                row = measure(embedder, exporter, path, images, want)
                cells = [row[k] for k in ("export_s", "mb", "nodes", "diff", "dynamic", "ips")]
            except Exception as e:  # noqa: BLE001 - report it in the table
                cells = [f"failed: {_one_line(e)}"] + [""] * 5
            rows.append(f"| {backbone} | {size} | {exporter} | " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    print(f"\npooling {args.pooling}; {machine_description()}")
    print(f"{_versions()}\nONNX files in {out_dir}")


if __name__ == "__main__":
    run(main)
