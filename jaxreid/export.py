"""A trained run's model as an ONNX file, for runtimes that are not JAX.

    python -m jaxreid.export --workdir=/tmp/run --out=/tmp/model.onnx

Input "images": float32 (batch, H, W, 3), RGB in pixel scale [0, 255] (uint8
values cast to float; the ImageNet normalisation is inside the model), any
batch size. Outputs: "global" (batch, D), L2-normalised, and for SCL models
"stripes" (batch, P, D/P). Through jax2onnx (pip install jax2onnx onnxruntime;
jax2onnx 0.17 pins an older orbax-checkpoint that export does not use:
reinstall jaxreid's afterwards, `pip install "orbax-checkpoint>=0.12.8"`).

In onnxruntime:

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("/tmp/model.onnx")
    features = session.run(["global"], {"images": images.astype(np.float32)})[0]
"""

from __future__ import annotations

import logging
import os
import sys
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
        raise UserError(
            f"ONNX export needs jax2onnx ({e}): pip install jax2onnx onnxruntime"
        ) from e
    features, names = exported_function(embedder)
    with export_mode():
        model = to_onnx(
            features,
            [("batch", embedder.height, embedder.width, 3)],
            model_name="jaxreid",
            input_names=["images"],
            output_names=names,
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return names


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
        names = export_onnx(embedder, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: input images (batch, {embedder.height}, {embedder.width}, 3) "
        f"float32 RGB 0-255; outputs {', '.join(names)}"
    )
    return 0


if __name__ == "__main__":
    run(main)
