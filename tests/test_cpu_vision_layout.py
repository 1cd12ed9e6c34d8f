"""The image encoder in the CPU inference layout computes what the official tree computes.

On CPU each encoder layer's weights are views of the stacked official arrays
(``pali_kit.model.cpu``: one 2-D matrix per kernel, multiplied behind a barrier).
Here, with awkward shapes (MLP width 100 or 112, head_dim 7, 3 layers)
and the reference fixtures: the image embeddings match the official tree's, the
layout shares the official arrays' memory (nothing added), ``model.params``
gives the official tree back bit for bit, and ``abstract_layout`` predicts the
layout from shapes alone.

Tolerances. Both layouts multiply the same rounded operands and accumulate in
float32; only the order of the float32 sums differs (another kernel for the
matrix product, the batch folded into the rows): a K-term dot product moves by
at most ~K * 2^-24 of the sum of its terms' magnitudes (K <= 100 here: < 1e-5).
In float32 that is all: 1e-5 of the embeddings' scale. With bfloat16/float16
weights a moved sum can also round its next-layer operand to the neighbouring
bfloat16/float16 value (one ulp: 2^-8 / 2^-11 relative). In these narrow models
(42 wide) one such term is a sizeable part of a sum, so a flip can move an output
by up to about one ulp of the scale; a few flips over three layers stay within
4 ulps: 2^-6 (bfloat16), 2^-9 (float16). (Measured here: 2e-3 to 5e-3 in
bfloat16, 4e-4 in float16, 7e-7 in float32.)
A wrong layout (a matrix reshaped wrongly, layers mixed up) is off by O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit.model import PaliGemma, inference_params
from pali_kit.model.cpu import Matrix, abstract_layout

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
    embed, image = _embed(config), _image(config, batch=2)
    got, want = embed(run, image), embed(params, image)
    assert got.shape == want.shape == (2, config.vision.num_tokens, config.llm.width)
    assert _rel(got, want) < TOL[dtype], _rel(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fixture_models_give_the_official_image_embeddings(ref, dtype):
    model, expect = ref
    params = jax.tree.map(lambda a: a.astype(dtype), model.params)
    run = inference_params(params)
    assert all(isinstance(m, Matrix) for m in _fc1(run))
    embed = _embed(model.config)
    got, want = embed(run, expect["image"]), embed(params, expect["image"])
    assert _rel(got, want) < TOL[dtype], _rel(got, want)


def test_loaded_model_shares_the_image_weights_and_gives_back_the_official_tree(tmp_path):
    config = _odd_config(mlp_dim=112)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    model = pk.load(pk.save(pk.Model(params, config), tmp_path / "m.npz"), verbose=False)
    run = model.run_params
    # each layer's MLP matrices (9408 bytes a layer: 64-byte aligned) are views of the
    # official stacked arrays: no second copy (the 3528-byte q/k/v slices are copied)
    official = model._params["img"]["Transformer"]["encoderblock"]
    for path in (("MlpBlock_0", "Dense_0"), ("MlpBlock_0", "Dense_1")):
        stacked = official[path[0]][path[1]]["kernel"]
        views = run["img"]["Transformer"]["encoderblock"][path[0]][path[1]]["kernel"]
        for i, m in enumerate(views):
            view = m.groups[0][0]
            assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * view.nbytes
    embed, image = _embed(config), _image(config)
    got, want = embed(run, image), embed(params, image)
    assert _rel(got, want) < TOL["bfloat16"], _rel(got, want)
    rebuilt = model.params
    assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize("mlp_dim", [100, 112])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_abstract_layout_predicts_the_image_encoder_layout(dtype, mlp_dim):
    config = _odd_config(mlp_dim)
    params = jax.tree.map(lambda a: a.astype(dtype), pk.init_params(config, 0))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    like = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)  # noqa: E731
    predicted, actual = abstract_layout(shapes)["img"], like(inference_params(params)["img"])
    assert jax.tree.structure(predicted) == jax.tree.structure(actual)
    assert jax.tree.leaves(predicted) == jax.tree.leaves(actual)
