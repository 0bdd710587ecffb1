"""`import jaxreid`'s XLA:CPU defaults: the library choice per CPU vendor, and a
user's own YNNPACK setting left alone."""

import importlib.metadata

import pytest

import jaxreid


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
        ("GenuineIntel", jaxreid.EIGEN_CONV_FLAG),
        ("AuthenticAMD", jaxreid.EIGEN_FLAG),
        ("", jaxreid.EIGEN_FLAG),
    ],
)
def test_products_follow_the_cpu_vendor(monkeypatch, jaxlib_0_10, vendor, expected):
    monkeypatch.setattr(jaxreid, "_cpu_vendor", lambda: vendor)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    jaxreid._set_xla_cpu_defaults()
    assert jaxreid.os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {expected}"


def test_a_users_ynn_setting_is_kept(monkeypatch, jaxlib_0_10):
    monkeypatch.setattr(jaxreid, "_cpu_vendor", lambda: "GenuineIntel")
    mine = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    monkeypatch.setenv("XLA_FLAGS", mine)
    jaxreid._set_xla_cpu_defaults()
    assert jaxreid.os.environ["XLA_FLAGS"] == mine


def test_other_jaxlib_versions_get_no_flag(monkeypatch):
    pretend_jaxlib(monkeypatch, "0.13.0")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    jaxreid._set_xla_cpu_defaults()
    assert "XLA_FLAGS" not in jaxreid.os.environ
