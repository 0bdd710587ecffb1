"""A trained run's model as an ONNX file, for runtimes that are not JAX.

    pip install "jaxreid[export]"   # jax2onnx, onnxruntime
    python -m jaxreid.export --workdir=/tmp/run --out=/tmp/model.onnx
    python -m jaxreid.export --workdir=/tmp/run --out=/tmp/model.int8.onnx --int8

Input "images": float32 (batch, H, W, 3), RGB in pixel scale [0, 255] (uint8
values cast to float; the ImageNet normalisation is inside the model), any
batch size. Outputs: "global" (batch, D), L2-normalised, and for SCL models
"stripes" (batch, P, D/P).

Through jax2onnx, with the models traced under `layers.export_mode()`: every
convolution is one ONNX Conv (depthwise ones grouped), with the batch norm
after it folded into its kernel and bias; pooling is MaxPool (its padding
folded in afterwards), AveragePool, GlobalAveragePool or ReduceSum; ReLU6 is
Clip; subnormal weights are set to zero. The graph is about the size of a
PyTorch export of the same network, and onnxruntime runs it as fast
(docs/results/export.md). `--int8` applies onnxruntime's dynamic int8
quantisation: a 2-4x smaller file, but onnxruntime's CPU provider runs it
several times slower than float32 (same page).

In onnxruntime:

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("/tmp/model.onnx")
    features = session.run(["global"], {"images": images.astype(np.float32)})[0]
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import tempfile
from collections.abc import Callable

from absl import flags
from absl import logging as absl_logging

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host

PROG = "python -m jaxreid.export"
OUTPUTS = ("global", "stripes")


def define_flags(fv: flags.FlagValues) -> None:
    """A trained run's model as an ONNX file."""
    flags.DEFINE_string(
        "workdir", None, "Folder of a `python -m jaxreid.main` run.", flag_values=fv, required=True
    )
    flags.DEFINE_string("out", None, "Output .onnx file.", flag_values=fv, required=True)
    flags.DEFINE_enum(
        "checkpoint", "latest", ["latest", "best"], "Which checkpoint.", flag_values=fv
    )
    flags.DEFINE_bool(
        "int8",
        False,
        "Write the weights as int8 (onnxruntime's dynamic quantisation).",
        flag_values=fv,
    )


def exported_function(embedder) -> tuple[Callable, list[str]]:
    """The function an export traces, images -> the outputs named in the list
    (eval mode, the embedder's weights closed over)."""
    from jaxreid.evaluate.protocol import eval_apply_fn, output_shapes

    variables = {"params": embedder.params, "batch_stats": embedder.batch_stats}
    apply = eval_apply_fn(embedder.graphdef)
    shapes = output_shapes(
        embedder.graphdef, embedder.params, embedder.batch_stats, embedder.height, embedder.width
    )
    names = [name for name in OUTPUTS if name in shapes]

    def features(images):
        outputs = apply(variables, images)
        return tuple(outputs[name] for name in names)

    return features, names


def export_onnx(embedder, path: str) -> list[str]:
    """Writes the embedder's eval-mode model to `path`; returns the output names."""
    from jaxreid.models.layers import export_mode
    from jaxreid.utils import UserError

    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise UserError(f'ONNX export needs jax2onnx ({e}): pip install "jaxreid[export]"') from e
    features, names = exported_function(embedder)
    with export_mode():
        model = to_onnx(
            features,
            [("batch", embedder.height, embedder.width, 3)],
            model_name="jaxreid",
            input_names=["images"],
            output_names=names,
            # LayerNormalization as one node (jax2onnx writes it out by default).
            normalization_mode="prefer_native",
        )
    fold_max_pool_padding(model)
    flush_subnormals(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return names


def _attribute(node, name: str, default=None):
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def _foldable_padding(pool, producers: dict, uses: collections.Counter, constants: dict):
    """(the Pad node, MaxPool pads) when `pool` is a MaxPool without pads fed,
    through a Transpose used by it alone, by a Pad used by that alone that
    pads the pooled axes with -inf; else None."""
    import numpy as np

    transpose = producers.get(pool.input[0]) if pool.op_type == "MaxPool" else None
    if transpose is None or transpose.op_type != "Transpose" or _attribute(pool, "pads"):
        return None
    pad = producers.get(transpose.input[0])
    if pad is None or pad.op_type != "Pad" or len(pad.input) != 3:
        return None
    pads, value = constants.get(pad.input[1]), constants.get(pad.input[2])
    if pads is None or value is None or value.size != 1 or value.item() != -np.inf:
        return None
    if uses[pad.output[0]] != 1 or uses[transpose.output[0]] != 1:
        return None
    perm = list(_attribute(transpose, "perm"))
    pooled = perm[2:]  # the pooled axes, in the Pad's layout
    begins, ends = pads[: len(perm)], pads[len(perm) :]
    unpooled = [a for a in range(len(perm)) if a not in pooled]
    if _attribute(pad, "mode", b"constant") != b"constant" or begins[unpooled].any():
        return None
    if ends[unpooled].any():
        return None
    return pad, [int(begins[a]) for a in pooled] + [int(ends[a]) for a in pooled]


def fold_max_pool_padding(model) -> int:
    """Folds each -inf Pad that feeds only a MaxPool (through the NHWC ->
    NCHW Transpose before it) into the MaxPool's `pads`; returns how many.

    Why: jax2onnx maps flax's max_pool with "VALID" or "SAME" padding only,
    so `layers.max_pool_3x3_s2` pads explicitly in export mode (torch's
    padding 1 is neither); as a node, that Pad cost onnxruntime a copy of
    the stem's map and two layout conversions (5-8% of OSNet-x0.25). ONNX's
    MaxPool never lets its padding win the max, as the -inf does.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    uses = collections.Counter(name for node in graph.node for name in node.input)
    folded = []
    for pool in list(graph.node):
        found = _foldable_padding(pool, producers, uses, constants)
        if found is None:
            continue
        pad, pads = found
        producers[pool.input[0]].input[0] = pad.input[0]  # the Transpose reads the unpadded map
        kept = [a for a in pool.attribute if a.name != "auto_pad"]
        del pool.attribute[:]
        pool.attribute.extend([*kept, helper.make_attribute("pads", pads)])
        graph.node.remove(pad)
        folded.append(pad)
    used = {name for node in graph.node for name in node.input}
    for name in {name for pad in folded for name in pad.input[1:]} - used:
        graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
    return len(folded)


def flush_subnormals(model) -> int:
    """Sets the subnormal values of the model's float32 initialisers to zero;
    returns how many there were.

    Why: trained checkpoints hold some (weight decay drives dead channels'
    weights towards zero; the MSMT17 OSNet-x0.25 has hundreds), and x86
    convolution kernels slow down on them: that OSNet ran at 0.4x the speed of
    the same graph without them in onnxruntime. XLA's CPU code flushes them
    to zero too, so jaxreid's own features do not change.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    tiny = np.finfo(np.float32).tiny
    flushed = 0
    for initializer in model.graph.initializer:
        if initializer.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(initializer)
        subnormal = (np.abs(values) < tiny) & (values != 0)
        if subnormal.any():
            flushed += int(subnormal.sum())
            zeroed = np.where(subnormal, np.float32(0), values)
            initializer.CopyFrom(numpy_helper.from_array(zeroed, initializer.name))
    return flushed


def quantize_int8(source: str, path: str) -> None:
    """Writes `source` (an ONNX file) to `path` with int8 weights and
    activations quantised at run time (onnxruntime's dynamic quantisation)."""
    from jaxreid.utils import UserError

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise UserError(f'--int8 needs onnxruntime ({e}): pip install "jaxreid[export]"') from e
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    quantize_dynamic(source, path, weight_type=QuantType.QInt8)


def main(argv: list[str] | None = None) -> int:
    args, _ = parse(define_flags, argv, PROG)
    configure_host()  # before jax starts a backend
    # orbax and jax log through absl at INFO; keep the console for results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # onnx_ir warns for every intermediate value whose shape has no element type
    # ("Skipping serialization"): type annotations only, the graph is complete.
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    from jaxreid.inference import Embedder, check_output
    from jaxreid.utils import UserError

    try:
        check_output(args.out, "--out")  # before the work
        embedder = Embedder.from_workdir(args.workdir, args.checkpoint)
        if args.int8:
            with tempfile.TemporaryDirectory() as folder:
                float32 = os.path.join(folder, "float32.onnx")
                names = export_onnx(embedder, float32)
                quantize_int8(float32, args.out)
        else:
            names = export_onnx(embedder, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: input images (batch, {embedder.height}, {embedder.width}, 3) "
        f"float32 RGB 0-255; outputs {', '.join(names)}{' (int8 weights)' if args.int8 else ''}"
    )
    return 0


if __name__ == "__main__":
    run(main)
