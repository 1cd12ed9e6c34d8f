"""Optional native CPU kernels, compiled on first use with the system C++ compiler.

One kernel today: ``int4_cpu.cc``, the int4 one-row product (decoding) for
x86-64 CPUs with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake and
Sapphire Rapids and later). :func:`int4_row_product` builds it on first use
(``c++`` / ``g++`` on ``PATH``, or ``$CXX``, against ``jax.ffi.include_dir()``,
about 3 s) into ``$XDG_CACHE_HOME/pali_kit/native/`` (default ``~/.cache``),
under a name keyed by the source, the jaxlib version, the compiler and the
flags, written atomically, registers it with XLA (``jax.ffi``) and returns
the product as a JAX function; later processes load the cached library.

It returns None, and ``pali_kit.quant`` keeps XLA's own loop, when the CPU
lacks the instructions (``avx512f``, ``avx512bw``, ``avx512_bf16``), when
``PALI_KIT_NATIVE=0`` is set (the opt-out), when ``XLA_FLAGS`` caps
XLA:CPU below AVX-512 (``--xla_cpu_max_isa=AVX2``), or when no compiler is found or
the build fails (then with one warning per process naming the reason).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = "PALI_KIT_NATIVE"  # "0": never use the native kernels
INT4_SOURCE = HERE / "int4_cpu.cc"
INT4_TARGET = "pk_int4_row_product"
INT4_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")  # /proc/cpuinfo names the kernel needs
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w",
             "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")  # fmt: skip


def enabled() -> bool:
    """False when the environment variable ``PALI_KIT_NATIVE`` is ``0`` / ``false`` / ``no``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (Linux ``/proc/cpuinfo``; else empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/pali_kit/native`` (``~/.cache`` default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pali_kit" / "native"


def compiler() -> str | None:
    """The C++ compiler: ``$CXX`` if set, else ``c++`` or ``g++`` on ``PATH`` (None: none)."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and (found := shutil.which(name)):
            return found
    return None


def build(source: Path, cxx: str) -> Path:
    """Compile ``source`` into the cache (once per source, jaxlib, compiler and flags) -> the .so.

    Raises RuntimeError with the compiler's message when the build fails.
    """
    import jax
    import jaxlib

    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (source.read_bytes(), jaxlib.__version__, cxx, " ".join(CXX_FLAGS),
                 platform.machine()):  # fmt: skip
        key.update(part if isinstance(part, bytes) else part.encode())
    folder = cache_dir()
    lib = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{lib.name}.", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *CXX_FLAGS, f"-I{include}", str(source), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)  # atomic: another process may have built the same file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


_registered: set[str] = set()  # FFI targets registered in this process (XLA keeps them)


@functools.cache
def _int4_registered() -> bool:
    """Build, load and register the int4 kernel once per process; False (warned) on failure."""
    import jax

    if INT4_TARGET in _registered:
        return True
    cxx = compiler()
    if cxx is None:
        _warn_once(
            "pali_kit: no C++ compiler (c++ / g++ on PATH, or $CXX) for the native int4 CPU "
            "kernel; int4 decoding uses XLA's loop (slower). Install g++ to enable it, or set "
            f"{ENV}=0 to silence this."
        )
        return False
    try:
        lib = build(INT4_SOURCE, cxx)
        handle = ctypes.cdll.LoadLibrary(str(lib))
        capsule = jax.ffi.pycapsule(handle.PkInt4RowProduct)
        jax.ffi.register_ffi_target(INT4_TARGET, capsule, platform="cpu")
        _registered.add(INT4_TARGET)
    except Exception as e:  # noqa: BLE001  (any failure: the XLA loop still works)
        _warn_once(
            f"pali_kit: the native int4 CPU kernel could not be built or loaded ({e}); int4 "
            f"decoding uses XLA's loop (slower). Set {ENV}=0 to silence this."
        )
        return False
    return True


def xla_isa_capped() -> bool:
    """True when ``XLA_FLAGS`` holds XLA:CPU below AVX-512 (``--xla_cpu_max_isa=AVX2`` etc.).

    Whoever caps XLA's instruction set (to match another CPU, or to avoid
    AVX-512) gets the same from the native kernels: they then step aside.
    """
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.partition("=")
        if name.lstrip("-") == "xla_cpu_max_isa":
            return not value.strip().upper().startswith("AVX512")
    return False


def int4_available() -> bool:
    """Whether :func:`int4_row_product` can run here (builds the kernel on the first call)."""
    return (
        enabled() and set(INT4_FLAGS) <= cpu_flags() and not xla_isa_capped() and _int4_registered()
    )


def int4_row_product(x, blocks, scales):
    """The int4 product of one row with a matrix stored in column blocks: -> float32[O].

    x: bfloat16[2 R] the input row (R = packed bytes per row over all blocks; padded
    with zeros past the matrix's inputs); blocks: a sequence of int8[O, B_b], the row's
    column blocks in order (low nibble: even input), each B_b a multiple of 32 and
    sum B_b = R; scales: float32[O, R / 32] the group scales of all blocks.
    ``y[o] = sum_g s[o, g] sum_j (x[64 g + 2 j] lo(v[o, 32 g + j]) + x[64 g + 2 j + 1]
    hi(v[o, 32 g + j]))``, products exact, sums float32, the blocks' sums added in
    order. One call for all blocks. Call only where :func:`int4_available` is True, on CPU.
    """
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((scales.shape[0],), jnp.float32)
    return jax.ffi.ffi_call(INT4_TARGET, out)(x, scales, *blocks)
