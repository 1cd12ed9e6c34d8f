"""The GPU/TPU inference layout (``pali_kit.model.accel``): one array per layer.

Compiled for a GPU, ``w[i]`` of a stacked weight is a slice that XLA writes out
as its own buffer, for every layer on every call (``bench/gpu_check.py`` on an
H200: 6.46 GB of prefill temporaries beside 6.06 GB of float16 weights). The
layout splits each stack once. Its functions are plain JAX, so they are tested
here on CPU arrays; ``Model`` applies them only where the weights live on one
GPU/TPU (patched below to run on the CPU).

Tolerances: the split tree runs the very same products on the same operands as
the stacked one (only where each layer's weights come from differs), so the
outputs agree to float32 summation order at most: ``FORWARD_REL`` (conftest).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pali_kit as pk
from pali_kit import quant
from pali_kit.model import PaliGemma, accel

from .conftest import FORWARD_REL, assert_close_to_scale, tiny_config


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, pk.init_params(config, 0)


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def test_split_gives_each_layer_its_own_array(tiny):
    config, params = tiny
    run = accel.split_stacks(params)
    q = run["llm"]["layers"]["attn"]["q_einsum"]["w"]
    assert isinstance(q, tuple) and len(q) == config.llm.depth
    stacked = params["llm"]["layers"]["attn"]["q_einsum"]["w"]
    for i, layer in enumerate(q):
        np.testing.assert_array_equal(layer, stacked[i])
    enc = run["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert isinstance(enc, tuple) and len(enc) == config.vision.depth
    # everything outside the stacks is the very same array
    assert run["llm"]["embedder"]["input_embedding"] is params["llm"]["embedder"]["input_embedding"]


def test_split_tree_computes_the_official_logits(tiny):
    config, params = tiny
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
    text = rng.integers(0, config.llm.vocab_size, (1, 8)).astype(np.int32)
    mask_ar = np.zeros((1, 8), np.int32)
    fn = jax.jit(lambda p: PaliGemma(config).apply({"params": p}, image, text, mask_ar))
    assert_close_to_scale(fn(accel.split_stacks(params)), fn(params), FORWARD_REL)


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_release_frees_the_stacks_and_official_rebuilds_them(tiny, scheme):
    _, params = tiny
    params = jax.tree.map(jnp.copy, params)  # arrays this test owns
    if scheme:
        params = quant.quantize_params(params, scheme)
    before = jax.tree.map(np.asarray, params)  # a QArray: its values and scales
    gate = params["llm"]["layers"]["mlp"]["gating_einsum"]
    gate = gate.values if scheme else gate
    run = accel.split_stacks(params, release=True)
    assert gate.is_deleted()  # freed as soon as split: the peak stays near the weights
    rebuilt = accel.official(run, accel.skeleton(params))
    flat = lambda t: jax.tree.leaves(t)  # noqa: E731  (a QArray's children are leaves)
    for a, b in zip(flat(rebuilt), flat(before), strict=True):
        np.testing.assert_array_equal(a, b)
    if scheme:
        assert isinstance(rebuilt["llm"]["layers"]["mlp"]["gating_einsum"], quant.QArray)


def test_a_loaded_model_on_an_accelerator_keeps_one_copy(monkeypatch):
    # Model.run_params splits the stacks where the weights live on one GPU/TPU
    # (patched here: the CPU stands in), frees the stacked arrays of a model it
    # owns, and Model.params gives the official tree back; generation is unchanged.
    reference = pk.load("demo", verbose=False)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (expected,) = reference.generate(image, "caption en")
    monkeypatch.setattr(accel, "on_one_accelerator", lambda params: True)
    model = pk.load("demo", verbose=False)
    gate = model.params["llm"]["layers"]["mlp"]["gating_einsum"]
    model = pk.load("demo", verbose=False)  # again: a model nobody took the tree of
    stacked = model._params["llm"]["layers"]["mlp"]["gating_einsum"]
    run = model.run_params
    assert isinstance(run["llm"]["layers"]["mlp"]["gating_einsum"], tuple)
    assert stacked.is_deleted()
    (got,) = model.generate(image, "caption en")
    assert got.text == expected.text and got.text
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(model.params["llm"]["layers"]["mlp"]["gating_einsum"], gate)


def test_the_gpu_program_slices_no_weight(tiny):
    # The control: the stacked tree's program slices its weight arguments.
    config, params = tiny
    image = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = jax.jit(lambda p, i, t, m: PaliGemma(config).apply({"params": p}, i, t, m))

    def weight_slices(p):
        ir = export.export(fn, platforms=("cuda",))(_shapes(p), image, text, text).mlir_module()
        return len(re.findall(r"stablehlo\.slice %arg", ir[ir.index("func.func public @main") :]))

    assert weight_slices(params) > 0
    assert weight_slices(accel.split_stacks(params)) == 0


def test_evaluation_on_an_accelerator_runs_the_split_layers(monkeypatch, demo_tokenizer):
    # pt.evaluate decodes with per-layer arrays where the weights live on one GPU/TPU
    # (patched: the CPU stands in), and scores the same as with the CPU layout.
    from pali_kit import data as pdata
    from pali_kit import train as pt

    model = pk.load("demo", verbose=False)
    val = pdata.ShapesDataset(4, size=64, seed=3)
    kw = dict(metric="exact_match", max_new_tokens=4, batch_size=4)
    expected = pt.evaluate(model.params, model.config, val, demo_tokenizer, **kw)
    calls = []
    split = accel.split_stacks
    monkeypatch.setattr(accel, "on_one_accelerator", lambda params: True)
    monkeypatch.setattr(accel, "split_stacks", lambda p, **kw: calls.append(1) or split(p, **kw))
    got = pt.evaluate(model.params, model.config, val, demo_tokenizer, **kw)
    assert calls and got.predictions == expected.predictions and got.scores == expected.scores
    assert any(got.predictions)  # the demo model answers
