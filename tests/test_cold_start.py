"""What a fresh process pays before its first token: the persistent compilation cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import api
from pali_kit.api import CACHE_MIN_COMPILE_S, demo_config
from pali_kit.model import cpu, inference_params, param_shapes
from pali_kit.model.common import aligned_empty, to_device

from .conftest import COMPILE_AHEAD_CHILD

CODE = """
import sys, jax
from pali_kit import api
api.enable_compilation_cache(sys.argv[1])
print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
"""


def _settings(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PALI_KIT_"))}
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path / "default")],
        env={**base, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    folder, seconds = out.stdout.split()
    return folder, float(seconds)


@pytest.mark.parametrize("dir_from_env", [False, True])
def test_short_compiles_are_kept_in_the_persistent_cache(tmp_path, dir_from_env):
    # the sampler over a 257k vocabulary compiles in ~0.7 s: under JAX's default 1 s
    # it would be compiled again by every process
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "env")} if dir_from_env else {}
    folder, seconds = _settings(tmp_path, **env)
    assert folder == str(tmp_path / ("env" if dir_from_env else "default"))
    assert seconds == CACHE_MIN_COMPILE_S < 0.5


def test_a_users_own_minimum_compile_time_is_kept(tmp_path):
    _, seconds = _settings(tmp_path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5")
    assert seconds == 5.0


# --- compiling the first generation while the weights load --------------------------------


def _run_ahead(path, ahead: bool, cache, weights_cache=None) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PALI_KIT_"))}
    env = {**base, "PALI_KIT_COMPILATION_CACHE": "1", "JAX_COMPILATION_CACHE_DIR": str(cache)}
    # (no weights cache in ~/.cache: "0" unless the test gives a folder)
    env["PALI_KIT_WEIGHTS_CACHE"] = "0" if weights_cache is None else str(weights_cache)
    out = subprocess.run([sys.executable, "-c", COMPILE_AHEAD_CHILD, str(path), "1" if ahead else "0"],
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _compiled(events) -> set:
    return {name for event, name, _ in events if event == "backend_compile_duration"}


def test_a_loaded_models_first_token_compiles_nothing_after_the_compile_ahead(tmp_path):
    path = pk.save(pk.load("demo", dtype="bfloat16", verbose=False), tmp_path / "m.npz")
    # without compiling ahead (this fills the persistent cache, as an earlier process would)
    plain = _run_ahead(path, False, tmp_path / "cache")
    assert {"jit(prefill)", "jit(choose)", "jit(step)"} <= _compiled(plain["generating"])
    # a cold process with that cache warm: what the first token needs is compiled
    # (fetched) on the background thread while the weights load; the step (second
    # token) is compiled at its first call, as without compiling ahead
    ahead = _run_ahead(path, True, tmp_path / "cache")
    threads = {name: thread for event, name, thread in ahead["loading"]
               if event == "backend_compile_duration"}  # fmt: skip
    # (the prefill as the program pali_kit.program_cache stores: jit(stored_prefill))
    assert threads["jit(stored_prefill)"] == threads["jit(choose)"] == "pali_kit compile ahead"
    assert _compiled(ahead["generating"]) == {"jit(step)"}
    # the same program on the same inputs: the same answer, bit for bit
    assert ahead["tokens"] == plain["tokens"]
    assert ahead["logprobs"] == plain["logprobs"]


def test_a_process_mapping_the_weights_cache_compiles_ahead_and_answers_the_same(tmp_path):
    from pali_kit.weights_cache import cache_file

    path = pk.save(pk.load("demo", dtype="bfloat16", verbose=False), tmp_path / "m.npz")
    plain = _run_ahead(path, False, tmp_path / "cache")  # fills the compilation cache
    assert not plain["mapped"]
    first = _run_ahead(path, True, tmp_path / "cache", tmp_path / "weights")  # writes it
    assert cache_file(tmp_path / "weights", path).is_file() and not first["mapped"]
    mapped = _run_ahead(path, True, tmp_path / "cache", tmp_path / "weights")
    assert mapped["mapped"] or sys.platform != "linux"
    # the run tree from the mapping is the one compiled ahead for: only the step compiles
    assert _compiled(mapped["generating"]) == {"jit(step)"}
    assert mapped["tokens"] == plain["tokens"] and mapped["logprobs"] == plain["logprobs"]


ODD = {
    "aligned": {},
    # a (4303,) bias is not 64 bytes long: its layers are copied, the kernels viewed
    # (as SigLIP So400m's in bfloat16); the MLP is wider than one (out, in) block (3 uneven ones)
    "pieces": dict(img_mlp_dim=4303, llm_mlp_dim=2 * cpu.BLOCK + 4),
    # an unaligned stacked kernel over 4 MiB: the encoder's stack stays whole
    "stacked": dict(img_width=72, img_num_heads=3, img_mlp_dim=15001),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("odd", list(ODD))
def test_the_layout_predicted_from_shapes_is_the_cpu_layout(dtype, odd):
    config = demo_config().replace(**ODD[odd])
    shapes = param_shapes(config, dtype)
    # arrays placed as the .npz loader places them (values do not matter here)
    params = jax.tree.map(lambda s: to_device(aligned_empty(s.shape, s.dtype)), shapes)
    run = inference_params(params)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), run)
    predicted = cpu.abstract_layout(shapes)
    assert jax.tree.structure(predicted) == jax.tree.structure(like)
    assert jax.tree.leaves(predicted) == jax.tree.leaves(like)


def test_a_failed_compile_ahead_warns_and_the_first_call_compiles(tmp_path, monkeypatch):
    demo = pk.load("demo", dtype="float16", verbose=False)
    path = pk.save(demo, tmp_path / "m.npz")
    broken = lambda shapes: {**cpu.abstract_layout(shapes), "img": {}}  # tracing it fails
    monkeypatch.setattr(api, "abstract_layout", broken)
    monkeypatch.setattr(api, "COMPILE_AHEAD_MIN_BYTES", 0)
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.warns(RuntimeWarning) as caught:
        model = pk.load(path, verbose=False, tokenizer=demo.tokenizer)  # does not fail
        assert model._compiled_ahead.exception() is not None
        [out] = model.generate(image, "caption en", max_new_tokens=4)
    messages = " ".join(str(w.message) for w in caught)
    assert "compiling the prefill function ahead failed" in messages
    assert "differs from the one predicted" in messages  # the broken prediction is reported
    [want] = demo.generate(image, "caption en", max_new_tokens=4)
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_array_equal(out.logprobs, want.logprobs)


LEAN = """
import sys
import pali_kit as pk
from pali_kit import api, decode  # what pk.load and a first generate import
heavy = ("matplotlib", "optax", "ipywidgets", "IPython", "torch", "transformers", "pandas",
         "tensorflow", "kagglehub", "pali_kit.train", "pali_kit.widgets", "pali_kit.viz",
         "pali_kit.hf")
print(" ".join(sorted({m for m in sys.modules if m.split(".")[0] in heavy or m in heavy})))
"""


def test_what_a_cold_process_imports_before_its_first_token_stays_lean():
    # plotting, training, widgets and the transformers bridge cost a cold process
    # seconds of imports (torch alone ~1 s) and the first token needs none of them
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PALI_KIT_"))}
    out = subprocess.run([sys.executable, "-c", LEAN], env=base, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == []
