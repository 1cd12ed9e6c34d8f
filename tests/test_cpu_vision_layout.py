"""The image encoder in the CPU inference layout computes what the official tree computes.

For half-precision weights the layout holds each encoder layer's MLP input matrix
(D, M) as an (out, in) block written over its own memory (``cpu.BLOCKED``).
Here: the image
embeddings match the official tree's, the official tree is rebuilt bit for bit,
the layout adds no memory, and ``abstract_layout`` predicts it from shapes.

Tolerances. Both layouts multiply the same rounded operands and accumulate in
float32; only the order of the float32 sums differs (another kernel for the
transposed block, the batch folded into the rows): a K-term dot product moves by
at most ~K * 2^-24 of the sum of its terms' magnitudes (K <= 100 here: < 1e-5).
In float32 that is all: 1e-5 of the embeddings' scale. With bfloat16/float16
weights a moved sum can also round its next-layer operand to the neighbouring
bfloat16/float16 value (one ulp: 2^-8 / 2^-11 relative). In these narrow models
(42 wide) one such term is a sizeable part of a sum, so a flip can move an output
by up to about one ulp of the scale; a few flips over three layers stay within
4 ulps: 2^-6 (bfloat16), 2^-9 (float16). (The layout with every matrix as
stored differs from the official tree by the same 2e-3 to 5e-3 in bfloat16 here.)
A wrong layout (a block not transposed, layers mixed up) is off by O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit.model import PaliGemma, cpu, inference_params
from pali_kit.model.cpu import Matrix, abstract_layout, official_params, without_blocked

from .conftest import tiny_config

TOL = {"float32": 1e-5, "bfloat16": 2.0**-6, "float16": 2.0**-9}


def _odd_config(mlp_dim: int = 100):
    """MLP width 100 (not a multiple of 16, 64 or 128), head_dim 7 (odd), 3 layers.

    A layer's (42, 100) bfloat16 slice is 8400 bytes: not 64-byte aligned, so the
    layout copies the layers apart; with ``mlp_dim=112`` (9408 bytes) it views them.
    """
    return tiny_config(img_width=42, img_num_heads=6, img_mlp_dim=mlp_dim, img_depth=3)


def _embed(config):
    return jax.jit(lambda p, x: PaliGemma(config).apply({"params": p}, x, method="embed_image"))


def _image(config, batch=1):
    res = config.vision.image_size
    return np.random.default_rng(1).uniform(-1, 1, (batch, res, res, 3)).astype(np.float32)


def _fc1(run):
    return run["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_odd_shapes_give_the_official_image_embeddings(dtype):
    config = _odd_config()
    params = jax.tree.map(lambda a: a.astype(dtype), pk.init_params(config, 0))
    run = inference_params(params)
    fc1 = _fc1(run)
    assert len(fc1) == config.vision.depth and all(isinstance(m, Matrix) for m in fc1)
    # half precision: (out, in) blocks; float32: views of the official matrix
    assert all(m.transposed == (dtype != "float32") for m in fc1)
    if dtype != "float32":
        assert fc1[0].groups[0][0].shape == (100, 42)
    embed, image = _embed(config), _image(config, batch=2)
    got, want = embed(run, image), embed(params, image)
    assert got.shape == want.shape == (2, config.vision.num_tokens, config.llm.width)
    assert _rel(got, want) < TOL[dtype], _rel(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fixture_models_give_the_official_image_embeddings(ref, dtype):
    model, expect = ref
    params = jax.tree.map(lambda a: a.astype(dtype), model.params)
    run = inference_params(params)
    assert all(m.transposed == (dtype == "bfloat16") for m in _fc1(run))
    embed = _embed(model.config)
    got, want = embed(run, expect["image"]), embed(params, expect["image"])
    assert _rel(got, want) < TOL[dtype], _rel(got, want)


def test_in_place_layout_adds_no_memory_and_rebuilds_the_official_tree():
    config = _odd_config(mlp_dim=112)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    mine = jax.tree.map(lambda a: jnp.array(a, copy=True), params)  # arrays the layout may reuse
    stacked = mine["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    start = stacked.unsafe_buffer_pointer()
    run = inference_params(mine, in_place=True)
    # every layer's block lies in the official array's own memory, layer after layer
    blocks = [m.groups[0][0] for m in _fc1(run)]
    for i, b in enumerate(blocks):
        assert b.unsafe_buffer_pointer() == start + i * b.nbytes
    skeleton = without_blocked(mine, run)
    assert _fc1(skeleton) is None  # that memory holds the blocks now
    del mine, stacked
    rebuilt = official_params(run, skeleton)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def test_loaded_model_holds_the_blocks_and_gives_back_the_official_tree(tmp_path):
    config = _odd_config(mlp_dim=112)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    model = pk.load(pk.save(pk.Model(params, config), tmp_path / "m.npz"), verbose=False)
    assert model._run_replaced and cpu.holds_blocks(model.run_params)
    assert model._params["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"][
        "kernel"
    ] == jax.ShapeDtypeStruct((3, 42, 112), jnp.bfloat16)  # not kept beside the blocks
    embed, image = _embed(config), _image(config)
    got, want = embed(model.run_params, image), embed(params, image)
    assert _rel(got, want) < TOL["bfloat16"], _rel(got, want)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_abstract_layout_predicts_the_image_encoder_layout(dtype):
    config = _odd_config()
    params = jax.tree.map(lambda a: a.astype(dtype), pk.init_params(config, 0))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    like = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)  # noqa: E731
    predicted, actual = abstract_layout(shapes)["img"], like(inference_params(params)["img"])
    assert jax.tree.structure(predicted) == jax.tree.structure(actual)
    assert jax.tree.leaves(predicted) == jax.tree.leaves(actual)
