"""Process-wide host settings, applied by the entry points (`configure_host`
at the top of their main), never by `import jaxreid`: a library import does
not change its host process."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from typing import NamedTuple

# XLA:CPU sends matrix products and convolutions to YNNPACK by default. Measured
# with benchmarks/train_step.py (jaxreid half, alternating runs): convolutions
# through Eigen are faster on both machines measured (2-core AMD EPYC: ResNet-50
# SCL b8 5.1 -> 5.6 img/s, OSNet-x0.25 b64 144 -> 176; 2-core Intel Xeon with
# AVX-512: ResNet-50 b8 4.0-4.1 -> 5.7-5.9 with YNNPACK's products). Products
# differ by CPU: on the AMD EPYC Eigen's were faster (EfficientNet-Lite0 b64
# 56.9 -> 63.0, mean of 3 runs), on the Intel Xeon YNNPACK's (ResNet-50 b8
# 4.7-5.2 -> 5.7-5.9; EfficientNet-Lite0 and OSNet the same within the noise).
# Set before jax starts its backend, only where the user chose no YNNPACK fusion
# types, and only for the jaxlib versions known to have the flag (XLA aborts on
# an unknown one).
EIGEN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution"
EIGEN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _set_xla_cpu_defaults() -> str:
    """Adds the library choice above to XLA_FLAGS; returns the flag added ("" if none)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return ""
    try:
        from importlib.metadata import version

        major_minor = tuple(int(p) for p in version("jaxlib").split(".")[:2])
    except Exception:  # no jaxlib metadata: leave XLA's defaults
        return ""
    if (0, 10) <= major_minor < (0, 12):
        default = EIGEN_CONV_FLAG if _cpu_vendor() == "GenuineIntel" else EIGEN_FLAG
        os.environ["XLA_FLAGS"] = f"{flags} {default}".strip()
        return default
    return ""


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def _keep_freed_host_memory() -> bool:
    """On a CPU-only Linux host: run CPU computations on the calling thread and
    let glibc keep freed memory for reuse (no mmap'd chunks, no trimming).
    Returns whether it was set.

    Why: XLA:CPU allocates each run's temporaries as one block (963 MB for the
    ResNet-50 SCL step). From jax's dispatch thread glibc serves it with mmap
    and unmaps it on free, so every step faulted in and zeroed fresh pages
    (250k page faults, a third of a core of system time). Run on the main
    thread, the block comes from the main heap and stays there (ResNet-50 SCL
    step 2.1 -> 1.7 s, OSNet-x0.25 b64 0.57 -> 0.42 s; benchmarks/train_step.py).
    A single malloc arena would do the same but made the threads contend
    (OSNet 0.42 -> 0.7 s). Takes effect if jax has not created its CPU client
    yet; JAXREID_KEEP_HOST_MEMORY=0 opts out.
    """
    if os.environ.get("JAXREID_KEEP_HOST_MEMORY", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    if os.environ.get("JAX_PLATFORMS", "") != "cpu" and any(
        importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS
    ):
        return False  # temporaries live in device memory: leave the host alone
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only
        return False
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        return False  # -1 as size_t: never trim
    import jax  # after XLA_FLAGS are set: importing jax starts no backend

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


class HostSettings(NamedTuple):
    """What configure_host set: the flag added to XLA_FLAGS ("" if none) and
    whether freed host memory is kept for reuse (glibc, calling-thread CPU
    computations)."""

    xla_flag: str
    keeps_host_memory: bool


_applied: HostSettings | None = None


def configure_host() -> HostSettings:
    """Applies the process-wide settings above: XLA:CPU's library choice
    (XLA_FLAGS) and glibc's handling of freed memory. For entry points, at the
    top of their main, before jax starts a backend; `import jaxreid` changes
    nothing in the process. Applied once: later calls return the first result."""
    global _applied
    if _applied is None:
        _applied = HostSettings(_set_xla_cpu_defaults(), _keep_freed_host_memory())
    return _applied
