"""The numerics policy: half-precision *storage* never overflows an activation that float32 holds.

The model here is a tiny random PaliGemma whose norm scales and MLP/attention
weights are multiplied by powers of two (exact in every dtype) until the
inputs of the MLP down-projections and the attention output projections pass
1e5 in float32, far above float16's 65504. Logits stay O(1) (every block
input is normalised).

Tolerances, relative to max |float32 logits|, in units of u, the relative
rounding error of one value in the half dtype (float16 2^-11, bfloat16 2^-8):
the policy rounds the input of each product once (float16: to 2^-11 of its row's
largest value; bfloat16: to 2^-8 of itself) and accumulates in float32. A logit
depends on about 16 such products in sequence (tiny model: 6 in the vision
tower, 4 per LLM layer, the output layer), and with random weights a relative
error passes through a product about unchanged, so the policy's error is below
16u against float32 math on the same rounded weights. Rounding the weights
themselves adds up to another 16u against the unrounded float32 model: 32u.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit.model import PaliGemma, common

from .conftest import tiny_config

U = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def large_activation_params(params):
    """Copy of ``params`` with activations > 1e5 in float32 (all factors powers of two)."""
    p = jax.tree.map(np.array, params)
    llm = p["llm"]["layers"]
    llm["pre_attention_norm"]["scale"][:] = 127.0  # normalised input x128
    llm["attn"]["q_einsum"]["w"] *= 2.0**-7  # queries and keys as before
    llm["attn"]["kv_einsum"]["w"][:, 0] *= 2.0**-7
    llm["attn"]["kv_einsum"]["w"][:, 1] *= 2.0**9  # values (attention output) ~1e5
    llm["pre_ffw_norm"]["scale"][:] = 127.0
    llm["mlp"]["gating_einsum"] *= 2.0**2  # gelu(gate) * up ~1e6
    block = p["img"]["Transformer"]["encoderblock"]
    block["LayerNorm_0"]["scale"] *= 2.0**7
    attn = block["MultiHeadDotProductAttention_0"]
    attn["query"]["kernel"] *= 2.0**-7
    attn["key"]["kernel"] *= 2.0**-7
    attn["value"]["kernel"] *= 2.0**10
    block["LayerNorm_1"]["scale"] *= 2.0**7
    block["MlpBlock_0"]["Dense_0"]["kernel"] *= 2.0**9
    return p


@pytest.fixture(scope="module", params=[True, False], ids=["gemma2", "gemma1"])
def large(request):
    config = tiny_config(gemma2=request.param)
    params = large_activation_params(pk.init_params(config, 0))
    rng = np.random.default_rng(0)
    inputs = (
        rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32),
        rng.integers(2, 2000, (2, 6)).astype(np.int32),
        np.array([[0, 0, 0, 1, 1, 1]] * 2, np.int32),
    )
    return config, params, inputs


def _logits(config, params, inputs):
    return np.asarray(jax.jit(PaliGemma(config).apply)({"params": params}, *inputs))


def _cast(params, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), params)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_the_scaled_model_has_activations_beyond_float16(large, monkeypatch):
    config, params, inputs = large
    seen = {}
    plain = common.policy_einsum

    def spy(eq, x, w, compute_dtype=None):
        seen[eq] = max(seen.get(eq, 0.0), float(jnp.max(jnp.abs(x))))
        return plain(eq, x, w, compute_dtype)

    monkeypatch.setattr(common, "policy_einsum", spy)
    PaliGemma(config).apply({"params": params}, *inputs)  # eager, so the spy sees values
    assert seen["btf,fd->btd"] > 1e5  # LLM MLP down-projection input
    assert seen["btnh,nhd->btd"] > 1e5  # LLM attention output projection input
    assert seen["...ij,ijp->...p"] > 1e5  # vision attention output projection input
    assert seen["...i,ip->...p"] > 1e5  # vision MLP (Dense_1) input


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_stay_finite_and_close_to_float32(large, dtype):
    config, params, inputs = large
    want = _logits(config, params, inputs)
    half = _cast(params, dtype)
    got = _logits(config, half, inputs)
    same_weights = _logits(config.replace(compute_dtype="float32"), half, inputs)
    assert np.isfinite(got).all()
    assert _rel(got, same_weights) < 16 * U[dtype]
    assert _rel(got, want) < 32 * U[dtype]
    # and the CPU inference layout (what pk.Model runs here) computes the same
    model = pk.Model(half, config)
    via_model = np.asarray(model.logits(*inputs))
    assert _rel(via_model, want) < 32 * U[dtype]


def test_float16_compute_opt_in_overflows_where_the_policy_does_not(large):
    # What the kit did before the policy: activations cast down to float16.
    config, params, inputs = large
    half = _cast(params, "float16")
    assert not np.isfinite(_logits(config.replace(compute_dtype="float16"), half, inputs)).all()
    assert np.isfinite(_logits(config, half, inputs)).all()


def test_generation_with_float16_weights_has_finite_log_probs(large):
    config, params, inputs = large
    image, text, _ = inputs
    model = pk.Model(_cast(params, "float16"), config)
    tokens, logprobs = model.generate_tokens(
        image, text, np.ones(text.shape, bool), max_new_tokens=4
    )
    assert np.isfinite(logprobs).all() and np.all(logprobs <= 0)
    f32_tokens, _ = pk.Model(params, config).generate_tokens(
        image, text, np.ones(text.shape, bool), max_new_tokens=1
    )
    np.testing.assert_array_equal(tokens[:, 0], f32_tokens[:, 0])


def test_train_step_with_frozen_float16_weights_is_finite(large):
    from pali_kit import train as pt

    config, params, (image, text, mask_ar) = large
    mask, _ = pt.trainable_mask(params, "attention")
    params = pt.cast_params(params, mask, frozen_dtype="float16")
    trainable, frozen = pt.split_params(params, mask)
    assert any(a.dtype == jnp.float16 for a in jax.tree.leaves(frozen))
    batch = {
        "image": image,
        "text": text,
        "mask_ar": mask_ar,
        "mask_loss": mask_ar,
        "mask_input": np.ones(text.shape, bool),
    }
    tx, _ = pt.make_optimizer("sgd", num_steps=1, lr=1e-3, warmup_percent=0)
    results = {}
    for compute in (None, "float16"):
        step = pt.make_train_step(config.replace(compute_dtype=compute), tx)
        state = pt.init_state(jax.tree.map(jnp.copy, trainable), tx)
        results[compute] = step(state, frozen, batch)[1]
    metrics = results[None]
    assert bool(metrics["ok"])
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["grad_norm"]) > 0
    # the float16 opt-in overflows here: the step's guard rejects it
    assert not bool(results["float16"]["ok"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_product_with_half_weights_is_exact_up_to_input_rounding(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 64)) * np.array([1e-3, 1.0, 1e6])[:, None, None]
    w = jnp.asarray(rng.standard_normal((64, 16)), dtype)
    got = np.asarray(jax.jit(common.mm, static_argnums=0)("btd,df->btf", x, w))
    exact = np.einsum("btd,df->btf", x, np.asarray(w, np.float64))
    # per row: each input is rounded to <= u of the row's largest magnitude, the
    # 64 products summed in float32: |error| <= 64 * u * max|x_row| * max|w|.
    bound = 64 * U[dtype] * np.abs(x).max(-1, keepdims=True) * float(np.abs(w.astype(float)).max())
    assert np.isfinite(got).all()
    assert np.all(np.abs(got - exact) <= bound)


def test_gradients_through_float16_weights_are_float32_and_keep_small_values():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 4)), jnp.float16)
    x = jnp.full((2, 8), 1e6, jnp.float32)

    def loss(x, scale):
        return scale * jnp.sum(common.mm("bd,df->bf", x, w))

    gx = jax.grad(loss)(x, 1e-10)  # float16 would flush 1e-10 * O(1) to zero
    assert gx.dtype == jnp.float32
    want = 1e-10 * np.sum(np.asarray(w, np.float64), axis=1)
    np.testing.assert_allclose(np.asarray(gx)[0], want, rtol=4 * U["float16"])


def test_compute_dtype_is_checked_and_reaches_both_towers():
    config = tiny_config().replace(compute_dtype=jnp.bfloat16)
    assert config.compute_dtype == "bfloat16" and config.vision.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype='int8'.*'float16'"):
        tiny_config().replace(compute_dtype="int8")


def test_load_takes_compute_dtype(tmp_path):
    config = tiny_config()
    path = pk.save(pk.Model(pk.init_params(config, 0), config), tmp_path / "m.npz")
    model = pk.load(path, compute_dtype="bfloat16", verbose=False)
    assert model.config.compute_dtype == "bfloat16"


def _cuda_dots(config, params) -> list[str]:
    """The dot_general lines of the forward as XLA:GPU is given it (jax.export for cuda)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    image = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = jax.jit(lambda p, i, t, m: PaliGemma(config).apply({"params": p}, i, t, m))
    ir = jax.export.export(fn, platforms=("cuda",))(shapes, image, text, text).mlir_module()
    return [ln for ln in ir.splitlines() if "stablehlo.dot_general" in ln]


def test_float32_products_ask_for_full_precision_on_accelerators():
    # XLA's default precision rounds float32 operands to TF32 on Ampere and newer
    # GPUs (bfloat16 passes on TPUs): on an H200 the fixture logits moved by 1e-2 of
    # their scale (docs/differences.md). Every product of two float32 operands asks
    # for HIGHEST; with bfloat16 weights the weight products are bfloat16 (no
    # precision needed) and attention's float32 products still ask for HIGHEST; a
    # half-precision compute_dtype leaves attention at the default (the opt-in).
    config = tiny_config()
    params = pk.init_params(config, 0)
    dots = _cuda_dots(config, params)
    assert dots and all("precision = [HIGHEST, HIGHEST]" in ln for ln in dots)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    dots = _cuda_dots(config, half)
    f32 = [ln for ln in dots if "xbf16>" not in ln.split(":")[-1].split("->")[0]]
    assert f32 and all("HIGHEST" in ln for ln in f32)  # attention
    assert all("HIGHEST" not in ln for ln in dots if ln not in f32)
    fast = _cuda_dots(config.replace(compute_dtype="bfloat16"), params)
    assert not any("HIGHEST" in ln for ln in fast)  # the check can fail
