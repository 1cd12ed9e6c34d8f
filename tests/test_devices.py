"""pk.device_dtype: one rule for the weights' dtype on every accelerator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import pali_kit as pk


def device(platform: str, kind: str) -> SimpleNamespace:
    return SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize(
    ("platform", "kind", "expected"),
    [
        ("gpu", "Tesla T4", "float16"),  # no bfloat16 units
        ("gpu", "Tesla V100-SXM2-16GB", "float16"),
        ("gpu", "Tesla P100-PCIE-16GB", "float16"),
        ("gpu", "NVIDIA A100-SXM4-40GB", "bfloat16"),
        ("gpu", "NVIDIA L4", "bfloat16"),
        ("gpu", "NVIDIA H100 80GB HBM3", "bfloat16"),
        ("tpu", "TPU v2", "bfloat16"),
        ("tpu", "TPU v5 lite", "bfloat16"),
        ("cpu", "cpu", "float32"),
    ],
)
def test_device_dtype_follows_the_hardware(platform, kind, expected):
    assert pk.device_dtype(device(platform, kind)) == expected


def test_device_dtype_on_cpu_can_be_bfloat16_and_checks_the_choice():
    assert pk.device_dtype(device("cpu", "cpu"), cpu="bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="cpu='float16'"):
        pk.device_dtype(device("cpu", "cpu"), cpu="float16")


def test_device_dtype_defaults_to_the_first_jax_device_and_loads():
    import jax

    assert pk.device_dtype() == pk.device_dtype(jax.devices()[0])
    assert pk.machine().startswith(jax.devices()[0].platform)
