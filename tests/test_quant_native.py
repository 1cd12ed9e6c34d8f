"""The native int4 CPU kernel (pali_kit/native/int4_cpu.cc): values, dispatch, build and fallback.

Skipped where the CPU lacks AVX-512 BF16 or no C++ compiler is found; the fallback
tests simulate a missing or broken compiler and need the CPU flags only.
"""

import os
import stat

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pali_kit import native, quant

HAS_FLAGS = set(native.INT4_FLAGS) <= native.cpu_flags()
needs_flags = pytest.mark.skipif(not HAS_FLAGS, reason="CPU without avx512f/bw/avx512_bf16")
needs_kernel = pytest.mark.skipif(
    not (HAS_FLAGS and native.compiler() and native.enabled() and not native.xla_isa_capped()),
    reason="needs a CPU with avx512_bf16, a C++ compiler (c++ / g++ / $CXX) and XLA not capped "
    "below AVX-512",
)
EPS32 = 2.0**-24  # float32 unit roundoff
EPS_BF16 = 2.0**-8  # bfloat16 unit roundoff (8-bit significand)


def _int4(k: int, o: int, seed: int = 0, dtype=ml_dtypes.bfloat16):
    """A random (k, o) weight of ``dtype`` as an int4 CpuQArray, and one input row float32[1, k]."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, o), dtype=np.float32) * k**-0.5).astype(dtype)
    x = rng.standard_normal((1, k), dtype=np.float32)
    return quant.for_cpu(quant.quantize_leaf(w, "int4", (-2,))), x


def _product(x, q, native_on: bool, monkeypatch):
    monkeypatch.setattr(quant, "NATIVE_INT4", native_on)
    fn = jax.jit(lambda x, q: quant.matmul(x, q))
    return np.asarray(fn(x, q)), fn.lower(x, q).as_text()


def _terms(x, q):
    """float64[o, k] |x_k * level * scale| with x rounded to bfloat16, and the exact sums."""
    levels = np.asarray(quant.unpack_values(q, np.float32), np.float64)  # [o, k_padded], exact
    scales = np.repeat(np.asarray(q.scales, np.float64).reshape(levels.shape[0], -1), 64, 1)
    xb = np.asarray(jnp.asarray(x[0]).astype(jnp.bfloat16), np.float64)
    xb = np.pad(xb, (0, levels.shape[1] - xb.size))
    terms = xb[None] * levels * scales
    return terms.sum(1), np.abs(terms).sum(1)


@needs_kernel
@pytest.mark.parametrize(
    "k, o",
    [
        (2304, 2048),
        (2048, 2304),
        (2304, 9216),
        (9216, 2304),  # 3B q/kv, attn out, gating, linear
        (100, 37),
        (64, 1),
        (130, 5),
        (4160, 3),
    ],  # odd shapes, padded last group  # fmt: skip
)
def test_native_product_equals_the_xla_loop_within_the_bfloat16_input_rounding(k, o, monkeypatch):
    # The kernel's semantics: the input rounded to bfloat16 (the numerics policy for
    # bfloat16 weights), products with the levels exact, float32 sums (per group, then
    # times the scale). Against a float64 sum of the same terms its error is float32
    # re-association, <= K * eps32 * sum|terms|. XLA's loop keeps the float32 input,
    # so the two differ by the rounding, <= eps_bf16 * sum|terms|, plus both sums' error.
    q, x = _int4(k, o, seed=k + o)
    got, text = _product(x, q, True, monkeypatch)
    assert native.INT4_TARGET in text  # the kernel ran
    loop, text = _product(x, q, False, monkeypatch)
    assert native.INT4_TARGET not in text
    exact, size = _terms(x, q)
    assert got.shape == loop.shape == (1, o)
    assert np.all(np.abs(got[0] - exact) <= k * EPS32 * size)
    assert np.all(np.abs(got[0] - loop[0]) <= (EPS_BF16 + 2 * k * EPS32) * size)
    assert np.abs(got - loop).max() > 0  # the rounding is there: a different computation


@needs_kernel
def test_native_kernel_is_used_only_for_one_row_of_bfloat16_weights_on_cpu(monkeypatch):
    # Decoding (one row) of int4 weights standing for bfloat16 takes the kernel; more
    # rows, float32 weights (whose policy keeps float32 inputs), another backend and
    # the opt-outs (quant.NATIVE_INT4, PALI_KIT_NATIVE=0) keep XLA's own loop.
    q, x = _int4(256, 64)
    q32, _ = _int4(256, 64, dtype=np.float32)
    lowered = lambda x, q: jax.jit(lambda x, q: quant.matmul(x, q)).lower(x, q).as_text()  # noqa: E731
    assert native.INT4_TARGET in lowered(x, q)
    assert native.INT4_TARGET not in lowered(np.concatenate([x, x]), q)
    assert native.INT4_TARGET not in lowered(x, q32)
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        assert native.INT4_TARGET not in lowered(x, q)
    with monkeypatch.context() as m:
        m.setattr(quant, "NATIVE_INT4", False)
        assert native.INT4_TARGET not in lowered(x, q)
    with monkeypatch.context() as m:
        m.setenv(native.ENV, "0")
        assert not native.int4_available()
        assert native.INT4_TARGET not in lowered(x, q)
    with monkeypatch.context() as m:  # XLA held below AVX-512: the kernel steps aside too
        m.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_cpu_max_isa=AVX2")
        assert not native.int4_available()
        assert native.INT4_TARGET not in lowered(x, q)


@pytest.mark.parametrize(
    "flags, capped",
    [("", False), ("--xla_cpu_max_isa=AVX2", True), ("--xla_cpu_max_isa=SSE4_2", True),
     ("--xla_cpu_max_isa=AVX512", False), ("--xla_cpu_max_isa=avx512_bf16", False),
     ("--xla_cpu_use_thunk_runtime=true", False)],
)  # fmt: skip
def test_xla_isa_cap_is_read_from_xla_flags(flags, capped, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert native.xla_isa_capped() is capped


@needs_kernel
@pytest.mark.parametrize(
    "widths, o",
    [((64,), 5), ((32,), 3), ((96, 32, 160, 64), 37), ((2304, 2304), 40), ((352,), 3000),
     ((1152, 32, 1184), 700)],
)  # fmt: skip
def test_native_kernel_on_column_blocks_against_a_float64_sum(widths, o):
    # Hand-made blocks (int8[o, B] each, B bytes a multiple of 32): single groups (a
    # block's last 32 bytes take the 256-bit path), blocks starting at an odd group,
    # several blocks in one call, and enough rows (>= 64 KB) to be split in chunks over
    # the caller and the intra-op pool's threads. The semantics: products of the bfloat16
    # inputs and the levels are exact, each group's sum times its scale, all in float32:
    # against a float64 sum of the same terms the error is float32 re-association over
    # K = 2 sum(B) terms, <= K * eps32 * sum|terms| per row.
    assert native.int4_available()
    rng = np.random.default_rng(sum(widths) + o)
    row = sum(widths)
    x = rng.standard_normal(2 * row).astype(ml_dtypes.bfloat16)
    packed = rng.integers(-128, 128, (o, row), dtype=np.int8)
    scales = rng.uniform(0.5, 2.0, (o, row // 32)).astype(np.float32)
    blocks = np.split(packed, np.cumsum(widths)[:-1], axis=1)
    got = np.asarray(native.int4_row_product(jnp.asarray(x), [jnp.asarray(b) for b in blocks],
                                             jnp.asarray(scales)))  # fmt: skip
    low = ((packed.astype(np.int16) << 12) >> 12).astype(np.float64)  # sign-extended nibbles
    high = (packed.astype(np.int16) >> 4).astype(np.float64)
    levels = np.stack([low, high], -1).reshape(o, 2 * row)  # input 2j: low nibble of byte j
    terms = x.astype(np.float64)[None] * levels * np.repeat(scales.astype(np.float64), 64, 1)
    exact, size = terms.sum(1), np.abs(terms).sum(1)
    assert got.shape == (o,) and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= 2 * row * EPS32 * size)
    assert np.abs(got - exact).max() > 0 or row <= 64  # float32 sums, not a float64 path


@needs_kernel
def test_native_kernel_rejects_inconsistent_shapes():
    assert native.int4_available()
    x = jnp.zeros((96,), jnp.bfloat16)
    with pytest.raises(Exception, match="inconsistent shapes"):  # 48 bytes: not whole groups
        jax.block_until_ready(native.int4_row_product(x, [jnp.zeros((4, 48), jnp.int8)],
                                                      jnp.ones((4, 2), jnp.float32)))  # fmt: skip
    with pytest.raises(Exception, match="inconsistent shapes"):  # 64 bytes want 128 inputs
        jax.block_until_ready(native.int4_row_product(x, [jnp.zeros((4, 64), jnp.int8)],
                                                      jnp.ones((4, 2), jnp.float32)))  # fmt: skip
    with pytest.raises(Exception, match="inconsistent shapes"):  # blocks of other row counts
        blocks = [jnp.zeros((4, 32), jnp.int8), jnp.zeros((3, 32), jnp.int8)]
        jax.block_until_ready(native.int4_row_product(jnp.zeros((128,), jnp.bfloat16), blocks,
                                                      jnp.ones((4, 2))))  # fmt: skip


@needs_kernel
def test_decode_with_the_native_kernel_gives_the_same_tokens(monkeypatch):
    # The demo model, bfloat16 weights quantized to int4: the decode steps' one-row
    # products round their inputs to bfloat16 with the kernel (relative change <= 2^-8
    # per product, the same rounding the bfloat16 model's own products make), the
    # prefill is the same program. Greedy tokens agree; log-probabilities (O(1)) move
    # by about what one bfloat16 rounding of every product's input moves them through
    # the demo's 4 layers: atol 0.05 (20 * 2^-8 * |logprob|).
    import pali_kit as pk
    from pali_kit.data import ShapesDataset

    ds = ShapesDataset(2, size=64, seed=4321, tasks=["caption", "detect"])
    images, prompts = [ds[i].image for i in range(2)], [ds[i].prefix for i in range(2)]
    from pali_kit import decode

    model = pk.load("demo", dtype="bfloat16", quantize="int4", verbose=False)
    runs = {}
    for on in (True, False):  # one prompt at a time: the kernel takes one-row products
        monkeypatch.setattr(quant, "NATIVE_INT4", on)
        jax.clear_caches()
        decode._jitted.cache_clear()
        runs[on] = [model.generate([i], [p], max_new_tokens=12)[0] for i, p in zip(images, prompts)]
    got, want = runs[True], runs[False]
    for g, w in zip(got, want):
        assert g.text == w.text and len(g.text) > 3
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=0.05)
    assert any(np.any(g.logprobs != w.logprobs) for g, w in zip(got, want))  # two programs


@needs_kernel
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native.build(native.INT4_SOURCE, native.compiler())
    assert lib.parent == tmp_path / "pali_kit" / "native" and lib.suffix == ".so"
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind
    stamp = lib.stat().st_mtime_ns

    def no_compiler(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    assert native.build(native.INT4_SOURCE, native.compiler()) == lib
    assert lib.stat().st_mtime_ns == stamp


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """pali_kit.native as in a new process with an empty kernel cache (restored after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "xla_isa_capped", lambda: False)  # the fallback under test
    monkeypatch.setattr(native, "_registered", set())
    native._int4_registered.cache_clear()
    native._warn_once.cache_clear()
    yield tmp_path
    native._int4_registered.cache_clear()
    native._warn_once.cache_clear()


def _xla_loop_still_answers(monkeypatch):
    q, x = _int4(192, 16)
    got, text = _product(x, q, True, monkeypatch)  # asked for the kernel, which is missing
    assert native.INT4_TARGET not in text
    want, _ = _product(x, q, False, monkeypatch)
    np.testing.assert_array_equal(got, want)


@needs_flags
def test_without_a_compiler_it_warns_once_and_uses_the_xla_loop(fresh_native, monkeypatch):
    monkeypatch.setenv("PATH", str(fresh_native))  # an empty folder: no c++, no g++
    assert native.compiler() is None
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert not native.int4_available()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        assert not native.int4_available()
        _xla_loop_still_answers(monkeypatch)


@needs_flags
def test_a_failing_build_warns_and_uses_the_xla_loop(fresh_native, monkeypatch):
    cxx = fresh_native / "broken-c++"
    cxx.write_text("#!/bin/sh\necho 'error: no such header' >&2\nexit 1\n")
    cxx.chmod(cxx.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(cxx))
    assert native.compiler() == str(cxx)
    with pytest.warns(RuntimeWarning, match="(?s)could not be built.*no such header"):
        assert not native.int4_available()
    assert not [p for p in (fresh_native / "cache").rglob("*") if p.is_file()]  # nothing kept
    _xla_loop_still_answers(monkeypatch)
    assert os.environ["CXX"] == str(cxx)
