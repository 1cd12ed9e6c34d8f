"""Which dtype suits the accelerator, and a one-line description of the machine.

    import pali_kit as pk
    model = pk.load(MODEL, dtype=pk.device_dtype())   # float16 on a T4, bfloat16 on a TPU
    print(pk.machine())                               # "cpu: 2 cores" / "gpu: Tesla T4 x 1"

One rule for every notebook and script that picks a dtype by device:

* GPUs without bfloat16 units (T4, V100, P100, ... before Ampere): ``"float16"``
  storage (matrix products still accumulate in float32);
* TPUs and Ampere or newer GPUs (A100, L4, H100, ...): ``"bfloat16"``;
* CPU: ``cpu`` (``"float32"`` by default: exact and, for the small demo model,
  fast; ``"bfloat16"`` halves the memory of a large model).
"""

from __future__ import annotations

import os

__all__ = ["NO_BF16_GPUS", "device_dtype", "machine"]

# device_kind substrings of GPUs without bfloat16 arithmetic
NO_BF16_GPUS = ("T4", "V100", "P100", "P40", "P4", "K80", "M60", "GTX 10", "RTX 20")
CPU_DTYPES = ("float32", "bfloat16")


def device_dtype(device=None, *, cpu: str = "float32") -> str:
    """The weights' dtype name for ``device`` (default: JAX's first device).

    Returns ``"float16"``, ``"bfloat16"`` or, on a CPU, ``cpu``; pass it to
    ``pk.load(..., dtype=...)``.
    """
    if cpu not in CPU_DTYPES:
        raise ValueError(f"cpu={cpu!r}: use one of {CPU_DTYPES}")
    if device is None:
        import jax

        device = jax.devices()[0]
    if device.platform == "cpu":
        return cpu
    if device.platform == "gpu" and any(name in device.device_kind for name in NO_BF16_GPUS):
        return "float16"
    return "bfloat16"


def machine() -> str:
    """What runs the computations, for printing next to a timing: ``"cpu: 2 cores"``."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return f"cpu: {cores or os.cpu_count()} cores"
    return f"{device.platform}: {device.device_kind} x {jax.device_count()}"
