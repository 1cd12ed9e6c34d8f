"""The shipped demo model (data/demo_model.npz): it loads as the kit's default and knows its world.

Scores are measured on held-out scenes (a seed the trainer never used) with
greedy decoding; the thresholds sit well below what the shipped file reaches
(data/README.md), so they catch a broken file or a broken pipeline, not small
numeric drift.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import data
from pali_kit.api import demo_config
from pali_kit.segmentation import load_vae


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the random-model fallback warns: must not happen
        return pk.load("demo", verbose=False)


def test_demo_model_is_the_trained_file_in_the_official_layout(model):
    assert model.name == "pali_kit demo"
    expected = demo_config(model.tokenizer.vocab_size)
    shapes = jax.tree.map(lambda s: s.shape, pk.param_shapes(expected))
    assert jax.tree.map(np.shape, model.params) == shapes
    assert model.config.llm.post_norms and model.resolution == expected.resolution == 64


def test_demo_model_knows_its_world_on_held_out_scenes(model):
    tasks = ("count", "color", "detect", "segment")
    scores = data.score_shapes(model, 32, seed=424242, tasks=tasks, vae=load_vae("demo"))
    least = {"count": 0.6, "color": 0.5, "detect": 0.35, "segment": 0.35}
    assert all(scores[t] >= least[t] for t in tasks), scores


def test_scores_of_a_random_model_are_near_zero():
    """The same scoring gives nothing to an untrained model of the same size (it can fail)."""
    config = demo_config()
    random = pk.Model(pk.model.init_params(config, 1), config, pk.Tokenizer.demo())
    scores = data.score_shapes(random, 16, seed=424242, tasks=("count", "detect"))
    assert scores["count"] <= 0.5 and scores["detect"] <= 0.1, scores
