"""Small shared helpers: machine description for benchmarks, logging set-up."""

from __future__ import annotations

import os
import platform


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
