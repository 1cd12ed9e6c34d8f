"""Shared fixtures: the big_vision reference models and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

# Tests compile many small programs: a lower XLA backend optimisation level halves
# compile time and changes no result beyond float rounding. Set before JAX loads.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("PALI_KIT_COMPILATION_CACHE", "0")

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def reference(name: str):
    """(params path, expected outputs) of a big_vision reference fixture."""
    return FIXTURES / f"{name}.params.npz", dict(np.load(FIXTURES / f"{name}.expect.npz"))


@pytest.fixture(params=["pub_gemma1", "pub_gemma2"])
def ref(request):
    """A loaded reference model (pk.Model) and what big_vision computed from it."""
    from pali_kit import checkpoints
    from pali_kit.api import Model

    path, expect = reference(request.param)
    params = checkpoints.load_params(path)
    return Model(params, checkpoints.infer_config(params, str(path))), expect


def tiny_config(gemma2: bool = True, vocab_size: int = 2176, image_size: int = 28, **kw):
    """A very small PaliGemma (1 or 2) for fast tests."""
    from pali_kit.configs import paligemma_config

    base = paligemma_config("gemma2_2b" if gemma2 else "gemma_2b", 224)
    fields = dict(
        img_width=32, img_depth=1, img_mlp_dim=64, img_num_heads=2, patch_size=14,
        image_size=image_size, llm_width=32, llm_depth=2, llm_mlp_dim=64, llm_num_heads=4,
        num_kv_heads=2 if gemma2 else 1, llm_head_dim=8, vocab_size=vocab_size,
    )  # fmt: skip
    fields.update(kw)
    return base.replace(**fields)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from pali_kit.tokenizer import Tokenizer

    return Tokenizer.demo()


@pytest.fixture(scope="session")
def tiny_model(demo_tokenizer):
    """A tiny random PaliGemma 2 with the demo tokenizer (answers are noise)."""

    from pali_kit.api import Model
    from pali_kit.model import init_params

    config = tiny_config()
    params = init_params(config, 1)
    return Model(params, config, demo_tokenizer, name="tiny")
