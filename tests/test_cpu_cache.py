"""The CPU layout's KV cache (``model.cpu.HeadMajorCache``) against the official one.

The official cache (``gemma.KVCache``) keeps every layer's keys and values as
[B, S, K, H]; XLA:CPU's attention products read keys as [B, K, S, H] and values
as [B, K, H, S], so a CPU decode step compiled on the official cache copies every
layer's whole cache into that order. The CPU layout's cache stores that order
and hands the Attention the official order as a transpose, which XLA folds into
the products. Here: both forms decode the same tokens, the compiled CPU step
copies no cache-sized array, and what GPU/TPU compile still uses the official
cache and has no barrier.

Tolerances: both forms compute the same products on the same values; only the
kernels XLA picks for the two attention products may differ, i.e. float32 sums
of S (<= 512) or H terms re-associated: each moves by at most ~S * 2^-24 of the
sum of |terms|, ~3e-5 relative, and the layers' norms keep that relative size.
So logits agree to 1e-4 of their scale (``FORWARD_REL``) and log-probs (O(1)
to O(10) in size) to 1e-4 absolute times their scale; greedy tokens are equal
(a tie closer than that is improbable for random weights and would show as
differing tokens, not as a pass).
"""

from __future__ import annotations

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pali_kit as pk
from pali_kit import decode
from pali_kit.model import KVCache, inference_params
from pali_kit.model.cpu import HeadMajorCache, abstract_layout, cache_form

from .conftest import FORWARD_REL, assert_close_to_scale, tiny_config

S = 160  # cache slots of the compiled steps below (28 px image: 4 image tokens)


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.fixture
def official_cache(monkeypatch):
    """Make ``decode`` compile with the official cache whatever the run tree."""

    def use(form):
        monkeypatch.setattr(decode, "cache_form", lambda params: form)

    return use


def _inputs(batch, size=28, length=5, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    text = rng.integers(2, 2000, (batch, length)).astype(np.int32)
    mask = np.ones(text.shape, bool)
    mask[-1, length - 2 :] = False  # a ragged batch: the last row is shorter
    return image, text, mask


def _generate_both(official_cache, config, run, image, text, mask, **kw):
    out = {}
    for form in (KVCache, HeadMajorCache):
        official_cache(form)
        out[form] = decode.generate_tokens(config, run, image, text, mask, **kw)
    return out[KVCache], out[HeadMajorCache]


def test_the_cpu_layout_gets_the_head_major_cache():
    config = tiny_config()
    params = pk.init_params(config, 0)
    assert cache_form(params) is KVCache  # the official tree (GPU/TPU, training)
    assert cache_form(inference_params(params)) is HeadMajorCache
    assert cache_form(abstract_layout(_shapes(params))) is HeadMajorCache


@pytest.mark.parametrize("gemma2", [True, False], ids=["gemma2", "gemma1"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_head_major_cache_decodes_like_the_official_cache(official_cache, gemma2, dtype, batch):
    config = tiny_config(gemma2=gemma2)
    params = jax.tree.map(lambda a: a.astype(dtype), pk.init_params(config, 0))
    run = inference_params(params)
    image, text, mask = _inputs(batch)
    a, b = _generate_both(official_cache, config, run, image, text, mask, max_new_tokens=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(b[1], a[1], rtol=0, atol=1e-4 * max(1.0, np.abs(a[1]).max()))


@pytest.mark.parametrize("sampler", ["greedy", "beam(3)"])
@pytest.mark.parametrize("cache_dtype", [None, "bfloat16"])
def test_head_major_cache_with_beams_and_cache_dtype(official_cache, sampler, cache_dtype):
    config = tiny_config()
    run = inference_params(pk.init_params(config, 2))
    image, text, mask = _inputs(2, seed=1)
    a, b = _generate_both(official_cache, config, run, image, text, mask, max_new_tokens=5,
                          sampler=sampler, cache_dtype=cache_dtype)  # fmt: skip
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(b[1], a[1], rtol=0, atol=1e-4 * max(1.0, np.abs(a[1]).max()))


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_demo_model_logits_are_the_official_caches(quantize):
    """The demo model (the kit's embedded one), float32 and int4: prefill and three
    decode steps, logits of both cache forms against each other."""
    model = pk.load("demo", quantize=quantize, verbose=False)
    cfg, run = model.config, model.run_params
    assert cache_form(run) is HeadMajorCache
    r = cfg.resolution
    image = np.random.default_rng(3).uniform(-1, 1, (1, r, r, 3)).astype(np.float32)
    text, mask = np.array([[5, 6, 7, 8]], np.int32), np.ones((1, 4), bool)
    logits = {}
    for form in (KVCache, HeadMajorCache):
        prefill, step, _ = decode._jitted(cfg, cfg.vision.num_tokens + 128, "float32", form)
        out, cache, valid, pos = prefill(run, image, text, mask)
        seen = [out]
        for i in range(3):
            tok = jnp.argmax(out, axis=-1).astype(jnp.int32)
            out, cache, valid = step(run, tok, cache, valid, pos + i,
                                     jnp.int32(cfg.vision.num_tokens + 4 + i))  # fmt: skip
            seen.append(out)
        logits[form] = np.stack(seen)
    assert_close_to_scale(logits[HeadMajorCache], logits[KVCache], FORWARD_REL, "logits")


def test_take_reorders_like_the_official_cache():
    config = tiny_config()
    rng = np.random.default_rng(0)
    official = KVCache.zeros(config.llm, 3, 16)
    official = KVCache(*jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                     (official.k, official.v)))  # fmt: skip
    head_major = HeadMajorCache.zeros(config.llm, 3, 16)
    layers = [head_major.layer(i).write(*official.layer(i), 0) for i in range(config.llm.depth)]
    head_major = head_major.of_layers(layers)
    for rows in ([2, 0, 1], [1, 1, 1], [0]):
        a, b = official.take(jnp.asarray(rows)), head_major.take(jnp.asarray(rows))
        for i in range(config.llm.depth):
            for x, y in zip(a.layer(i).read(), b.layer(i).read()):
                np.testing.assert_array_equal(x, y)


# --- the compiled programs ---------------------------------------------------------------

_COPY = re.compile(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(")


def _cache_sized_copies(hlo: str, n: int) -> list[str]:
    """Lines of optimized HLO that copy or transpose an array of ``n`` elements."""
    out = []
    for line in hlo.splitlines():
        m = _COPY.search(line)
        if m and math.prod(int(d) for d in m[1].split(",") if d) == n:
            out.append(line.strip()[:160])
    return out


def _compiled_step(config, run, form, batch):
    prefill, step, _ = decode._jitted(config, S, "float32", form)
    image, text, mask = _inputs(batch)
    _, cache, valid, pos = prefill(run, image, text, mask)
    lowered = step.jitted.lower(run, jnp.zeros((batch,), jnp.int32), cache, valid, pos,
                                jnp.int32(40))  # fmt: skip
    return lowered.compile().as_text()


@pytest.mark.parametrize("gemma2", [True, False], ids=["gemma2", "gemma1"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_compiled_cpu_step_copies_no_cache(gemma2, batch, dtype):
    # kv heads > 1 (Gemma 2 tiny: 2) and == 1 (Gemma 1: multi-query), batch 1 and 2:
    # the axes of size 1 are what made XLA copy the cache (see model.cpu._head_major).
    config = tiny_config(gemma2=gemma2, llm_head_dim=16)
    llm = config.llm
    run = inference_params(jax.tree.map(lambda a: a.astype(dtype), pk.init_params(config, 0)))
    n = batch * S * llm.num_kv_heads * llm.head_dim  # one layer's keys (or values)
    hlo = _compiled_step(config, run, HeadMajorCache, batch)
    assert _cache_sized_copies(hlo, n) == []
    # the check can fail: on the official cache XLA:CPU relayouts every layer's cache
    official = _cache_sized_copies(_compiled_step(config, run, KVCache, batch), n)
    assert len(official) >= llm.depth


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_step_uses_the_official_cache_and_no_barrier(platform):
    config = tiny_config()
    shapes = _shapes(pk.init_params(config, 0))  # the official tree: what GPU/TPU run
    form = cache_form(shapes)
    assert form is KVCache
    prefill, step, _ = decode._jitted(config, 64, "float32", form)
    cache = _shapes(KVCache.zeros(config.llm, 1, 64))
    args = (shapes, jax.ShapeDtypeStruct((1,), jnp.int32), cache,
            jax.ShapeDtypeStruct((1, 64), bool), jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
    exported = export.export(step.jitted, platforms=(platform,))(*args)
    text = exported.mlir_module()
    assert "stablehlo.dot_general" in text
    assert "stablehlo.optimization_barrier" not in text
    llm = config.llm
    official = jax.ShapeDtypeStruct((1, 64, llm.num_kv_heads, llm.head_dim), jnp.float32)
    assert [a for a in exported.in_avals if a.shape == official.shape]


def test_compile_ahead_traces_the_head_major_step():
    """``decode.compile_ahead`` (prefill, sampler and step) on the CPU layout's shapes:
    its prefill returns the head-major cache and its step accepts it (a failure there
    would surface as the future's exception, or as a warning at the first call)."""
    config = tiny_config(image_size=224)
    run = inference_params(pk.init_params(config, 0))
    shapes = _shapes(run)
    assert decode.compile_ahead(config, shapes, max_new_tokens=4, step=True).result() is None
    prefill = decode._jitted(config, decode.bucket_cache(256, 32, 4), "float32", HeadMajorCache)[0]
    assert prefill.pending is not None  # compiled ahead for the head-major cache
    image = np.zeros((1, 224, 224, 3), np.float32)
    text, mask = np.array([[5, 6]], np.int32), np.ones((1, 2), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode.generate_tokens(config, run, image, text, mask, max_new_tokens=4)
    assert prefill.pending is None  # the first call waited for it and found no error
    traced = prefill.jitted.trace(
        shapes, image, np.zeros((1, 32), np.int32), np.ones((1, 32), bool)
    )
    assert isinstance(traced.out_info[1], HeadMajorCache)
