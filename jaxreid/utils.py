"""Small shared helpers: the user-error type, L2 normalisation, the machine
description of benchmarks and logs."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

NORM_EPS = 1e-12  # zero vectors stay zero


class UserError(Exception):
    """A problem the user can fix (bad input, wrong checkpoint): entry points
    print its one-line message and exit with status 2, without a traceback."""


def machine_description() -> str:
    """One line naming the CPU, cores, memory, accelerators and jax version."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"{cpu}, {os.cpu_count()} cores{mem_gib}; jax {jax.__version__} on "
        f"{len(devices)} x {'/'.join(kinds)} ({jax.default_backend()}); "
        f"Python {platform.python_version()}"
    )


def l2_normalize(x, axis: int = -1, eps: float = NORM_EPS):
    """x / max(||x||, eps) along `axis` (torch.nn.functional.normalize).

    A jax array (or tracer) gives a jax array, computed as a multiply by rsqrt:
    XLA rewrites a division by a broadcast into a multiply by its reciprocal
    in some programs and not in others, which made the same step differ in
    the last bit between 1 and 2 devices. Anything else gives a numpy array
    of at least float32 (no jax import: the evaluation CLI runs without it).
    """
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        squared = jax.numpy.sum(jax.numpy.square(x), axis=axis, keepdims=True)
        return x * jax.lax.rsqrt(jax.numpy.maximum(squared, eps * eps))
    x = np.asarray(x)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)
