"""jaxreid: fully unsupervised person re-identification in JAX/Flax."""

import os

__version__ = "0.1.0"

# XLA:CPU sends matrix products to YNNPACK by default; Eigen's are faster on the
# train step (EfficientNet-Lite0 b64 on 2 cores: 56.9 -> 63.0 img/s, mean of 3
# alternating runs; benchmarks/train_step.py). Set before jax starts its
# backend, only where the user chose no YNNPACK fusion types, and only for the
# jaxlib versions known to have the flag (XLA aborts on an unknown one).
YNN_DOT_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"


def _set_xla_cpu_defaults() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return
    try:
        from importlib.metadata import version

        major_minor = tuple(int(p) for p in version("jaxlib").split(".")[:2])
    except Exception:  # no jaxlib metadata: leave XLA's defaults
        return
    if (0, 10) <= major_minor < (0, 12):
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_DOT_FLAG}".strip()


_set_xla_cpu_defaults()
