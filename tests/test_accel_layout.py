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
    monkeypatch.setattr(accel, "is_accelerator", lambda device: True)
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
    monkeypatch.setattr(accel, "is_accelerator", lambda device: True)
    monkeypatch.setattr(accel, "split_stacks", lambda p, **kw: calls.append(1) or split(p, **kw))
    got = pt.evaluate(model.params, model.config, val, demo_tokenizer, **kw)
    assert calls and got.predictions == expected.predictions and got.scores == expected.scores
    assert any(got.predictions)  # the demo model answers


MESH_CHILD = r"""
import sys
sys.path.insert(0, {tests!r})
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from conftest import tiny_config
from pali_kit import data as pdata, train as pt
from pali_kit.model import PaliGemma, accel, inference_params, init_params
from pali_kit.tokenizer import Tokenizer

assert jax.device_count() == 2, jax.devices()
config = tiny_config()
params = jax.tree.map(np.asarray, init_params(config, 0))
rng = np.random.default_rng(0)
examples = [pdata.Example(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), "caption en",
                          "a shape") for _ in range(4)]
tok = Tokenizer.demo()
mesh = pt.make_mesh()
# min_shard_bytes=0: the tiny weights are sharded as a 3B model's would be
trainer = pt.Trainer(params, config, trainable="attention", num_steps=2, mesh=mesh,
                     min_shard_bytes=0)
evaluator = pt.Evaluator(examples, tok, metric="exact_match", batch_size=2, max_new_tokens=4)
out = {{}}
# CPU devices: the stacked tree (the reference)
assert not accel.on_accelerators(trainer.params)
stacked = trainer.evaluate(evaluator)
image = jnp.asarray(rng.uniform(-1, 1, (2, 28, 28, 3)), jnp.float32)
text = jnp.asarray(rng.integers(0, config.llm.vocab_size, (2, 8)), jnp.int32)
forward = jax.jit(lambda p: PaliGemma(config).apply({{"params": p}}, image, text, text * 0))
out["stacked_logits"] = np.asarray(forward(trainer.params))

# the CPU devices stand in for 2 GPUs
accel.is_accelerator = lambda device: True
calls = []
split = accel.split_stacks
accel.split_stacks = lambda p, **kw: calls.append(1) or split(p, **kw)
assert accel.on_accelerators(trainer.params) and not accel.on_one_accelerator(trainer.params)
got = trainer.evaluate(evaluator)
out["evaluations_split"] = np.asarray(len(calls))
out["same_predictions"] = np.asarray(got.predictions == stacked.predictions
                                     and got.scores == stacked.scores)
full = trainer.params
run = inference_params(full)
out["split_logits"] = np.asarray(forward(run))
# every layer keeps its stack's sharding less the layer axis
checked = sharded = 0
for path in accel.STACKS:
    s, r = full, run
    for key in path:
        s, r = s[key], r[key]
    layers = jax.tree.leaves(r, is_leaf=lambda x: isinstance(x, tuple))
    for a, parts in zip(jax.tree.leaves(s), layers, strict=True):
        assert isinstance(parts, tuple) and len(parts) == a.shape[0]
        want = NamedSharding(mesh, P(*a.sharding.spec[1:]))
        assert a.sharding.spec[0] is None, a.sharding.spec
        for part in parts:
            assert part.sharding.is_equivalent_to(want, part.ndim), (part.sharding, want)
        np.testing.assert_array_equal(np.stack([np.asarray(p) for p in parts]), np.asarray(a))
        assert not a.is_deleted()  # the trainer's own weights are kept (copies were split)
        checked += 1
        sharded += "data" in tuple(want.spec)
out["checked"], out["sharded"] = np.asarray(checked), np.asarray(sharded)
# a stack split along the layer axis: each layer is split along another axis instead
w = jax.device_put(jnp.arange(2 * 4 * 6.0).reshape(2, 4, 6), NamedSharding(mesh, P("data")))
parts = accel.split_stacks({{"img": {{"Transformer": {{"encoderblock": w}}}},
                            "llm": {{"layers": w}}}})["llm"]["layers"]
out["moved_spec"] = np.asarray(str(tuple(parts[0].sharding.spec)))
out["moved_equal"] = np.asarray(all(np.array_equal(p, w[i]) for i, p in enumerate(parts)))
# a Model whose weights are sharded over the mesh generates from per-layer arrays too
import pali_kit as pk
model = pk.load("demo", verbose=False)
picture = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
(expected,) = model.generate(picture, "caption en")  # (before: CPU devices, as loaded)
model.params = jax.device_put(model.params, pt.shardings_for(model.params, mesh, 0))
model_run = model.run_params
(answer,) = model.generate(picture, "caption en")
out["model_split"] = np.asarray(isinstance(model_run["llm"]["layers"]["mlp"]["linear"], tuple))
out["model_same"] = np.asarray(answer.text == expected.text
                               and np.array_equal(answer.tokens, expected.tokens))
# training is unchanged: still the stacked tree (lax.scan), and it steps
batch = next(iter(pdata.Batcher(examples, tok, batch_size=2, text_len=12, image_size=28,
                                seed=0, prefetch=0)))
loss = trainer.step(batch)["loss"]
out["stacked_training"] = np.asarray(not isinstance(
    trainer.state.params["llm"]["layers"]["attn"]["q_einsum"]["w"], tuple) and np.isfinite(loss))
# the exported CUDA program of the sharded split tree slices no weight argument
try:
    from jax import export
    img = jax.ShapeDtypeStruct(image.shape, image.dtype)
    txt = jax.ShapeDtypeStruct(text.shape, text.dtype)
    fn = jax.jit(lambda p, i, t: PaliGemma(config).apply({{"params": p}}, i, t, t * 0))
    def program(tree):
        shapes = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
        ir = export.export(fn, platforms=("cuda",))(shapes, img, txt).mlir_module()
        main = ir[ir.index("func.func public @main"):]
        # slices of weight arguments; arguments split along "data"
        return main.count("stablehlo.slice %arg"), main.split("\n")[0].count('{{"data"}}')

    out["cuda_weight_slices"], out["cuda_sharded_args"] = program(run)
    out["cuda_stacked_slices"], _ = program(full)  # the control
except Exception as e:  # recorded: the parent test says why
    out["cuda_error"] = np.asarray(repr(e)[:2000])
np.savez({tmp!r} + "/results.npz", **out)
"""


def test_eval_on_a_two_device_mesh_runs_sharded_per_layer_arrays(tmp_path):
    # Trainer.evaluate / pt.evaluate on a mesh of 2 devices (2 T4s; here 2 forced CPU
    # devices standing in for GPUs): the stacks are split per layer, each layer with
    # its stack's NamedSharding less the layer axis; the predictions are those of the
    # stacked tree, the logits agree to float32 summation order (FORWARD_REL: the same
    # products on the same operands); the trainer's stacked weights stay as they are.
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PALI_KIT_COMPILATION_CACHE"] = "0"
    code = MESH_CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    res = dict(np.load(tmp_path / "results.npz"))
    assert int(res["evaluations_split"]) >= 1 and bool(res["same_predictions"])
    assert_close_to_scale(res["split_logits"], res["stacked_logits"], FORWARD_REL)
    assert int(res["checked"]) > 10 and int(res["sharded"]) > 0
    assert res["moved_spec"].item() == "(None, 'data')" and bool(res["moved_equal"])
    assert bool(res["stacked_training"])
    assert bool(res["model_split"]) and bool(res["model_same"])
    assert "cuda_error" not in res, res.get("cuda_error")
    assert int(res["cuda_weight_slices"]) == 0 and int(res["cuda_sharded_args"]) > 0
    assert int(res["cuda_stacked_slices"]) > 0  # the stacked tree's program slices its weights
