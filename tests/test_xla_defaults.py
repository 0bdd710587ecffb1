"""The entry points' host settings (jaxreid.host.configure_host): XLA:CPU's
library choice per CPU vendor, a user's own YNNPACK setting left alone; and
`import jaxreid` changing nothing in the process."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from jaxreid import host


def pretend_jaxlib(monkeypatch, jaxlib_version: str) -> None:
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: jaxlib_version if name == "jaxlib" else real_version(name),
    )


@pytest.fixture
def jaxlib_0_10(monkeypatch):
    pretend_jaxlib(monkeypatch, "0.10.2")


@pytest.mark.parametrize(
    "vendor, expected",
    [
        ("GenuineIntel", host.EIGEN_CONV_FLAG),
        ("AuthenticAMD", host.EIGEN_FLAG),
        ("", host.EIGEN_FLAG),
    ],
)
def test_products_follow_the_cpu_vendor(monkeypatch, jaxlib_0_10, vendor, expected):
    monkeypatch.setattr(host, "_cpu_vendor", lambda: vendor)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    host._set_xla_cpu_defaults()
    assert host.os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {expected}"


def test_a_users_ynn_setting_is_kept(monkeypatch, jaxlib_0_10):
    monkeypatch.setattr(host, "_cpu_vendor", lambda: "GenuineIntel")
    mine = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    monkeypatch.setenv("XLA_FLAGS", mine)
    host._set_xla_cpu_defaults()
    assert host.os.environ["XLA_FLAGS"] == mine


def test_other_jaxlib_versions_get_no_flag(monkeypatch):
    pretend_jaxlib(monkeypatch, "0.13.0")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    host._set_xla_cpu_defaults()
    assert "XLA_FLAGS" not in host.os.environ


_IMPORT_SCRIPT = """
import ctypes, importlib, json, os, pkgutil, sys
import jax  # jax's own import sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def host_state():
    before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)  # above glibc's largest mmap threshold: mmap'd by default
    mmapped = libc.mallinfo2().hblks > before
    libc.free(block)
    return {{"environ": dict(os.environ), "mmapped": mmapped,
            "async_dispatch": jax.config.values["jax_cpu_enable_async_dispatch"]}}

before = host_state()
import jaxreid
names = {names!r}
if names is None:
    names = [m.name for m in pkgutil.walk_packages(jaxreid.__path__, "jaxreid.")
             if not m.name.endswith("__main__") and m.name not in {clis!r}]
for name in names:
    importlib.import_module(name)
host = sys.modules.get("jaxreid.host")
result = {{"before": before, "after_import": host_state(), "imported": names,
          "applied": None if host is None else host._applied}}
from jaxreid.host import configure_host
result["settings"] = configure_host()._asdict()
result["after_configure"] = host_state()
print(json.dumps(result))
"""

# Their absl flags clash with jaxreid.main's (--workdir): one process each.
_CLIS = ("jaxreid.extract", "jaxreid.export", "jaxreid.search")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
@pytest.mark.parametrize("names", [None, *([cli] for cli in _CLIS)])
def test_import_jaxreid_leaves_the_host_process_alone(names):
    """`import jaxreid` and its modules (jaxreid.main, train, data, evaluate, the
    CLIs, ...) set no environment variable (XLA_FLAGS included), no glibc malloc
    option and no jax option; configure_host, called afterwards, does."""
    drop = ("XLA_FLAGS", "JAXREID_KEEP_HOST_MEMORY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["JAX_PLATFORMS"] = "cpu"  # so that configure_host keeps host memory on any machine
    script = _IMPORT_SCRIPT.format(names=names, clis=_CLIS)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after_import"]
    if names is None:
        assert {"jaxreid.main", "jaxreid.train", "jaxreid.evaluate.cli"} <= set(result["imported"])
    assert after["environ"] == before["environ"]
    assert before["mmapped"] and after["mmapped"]
    assert before["async_dispatch"] and after["async_dispatch"]
    assert result["applied"] is None
    # The probes see the settings once an entry point applies them.
    settings, configured = result["settings"], result["after_configure"]
    if settings["xla_flag"]:
        assert configured["environ"]["XLA_FLAGS"] == settings["xla_flag"]
    assert settings["keeps_host_memory"]
    assert not configured["mmapped"] and not configured["async_dispatch"]
