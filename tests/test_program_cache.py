"""Stored prefill programs (pali_kit.program_cache): a later process skips tracing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import program_cache
from pali_kit.model.cpu import HeadMajorCache, Matrix

from .conftest import COMPILE_AHEAD_CHILD

pytestmark = pytest.mark.skipif(not program_cache.available(),
                                reason="jax.export serialization unavailable (flatbuffers)")  # fmt: skip


# --- in one process: the file, its key, damage ----------------------------------------------


def _fn(tree, x):
    w = tree["w"].groups[0][0]
    cache = HeadMajorCache((x @ w,), (x,), 1, 1)
    return x @ w + tree["b"], cache


def _args(n=4):
    w = jnp.arange(n * n, dtype=jnp.float32).reshape(n, n) / 7
    tree = {"w": Matrix([[w]], shape=(n, n)), "b": jnp.ones((n,), jnp.float32)}
    return tree, jnp.linspace(-1, 1, 2 * n, dtype=jnp.float32).reshape(2, n)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(program_cache, "folder", lambda: tmp_path)
    return tmp_path


def test_a_stored_program_is_found_for_its_key_and_computes_the_same(folder):
    args, key = _args(), ["a config", 1]
    assert program_cache.load("fn", key, args) is None
    path = program_cache.store("fn", key, jax.jit(_fn), args)
    assert path is not None and path.parent == folder
    exported = program_cache.load("fn", key, args)
    assert exported is not None
    got = program_cache.callable_of(exported, "stored_fn")(*args)
    want = jax.jit(_fn)(*args)
    # the same program on the same inputs: bit for bit, and the same result tree
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_another_key_or_other_shapes_find_nothing(folder):
    args, key = _args(), ["a config", 1]
    program_cache.store("fn", key, jax.jit(_fn), args)
    assert program_cache.load("fn", ["a config", 2], args) is None
    assert program_cache.load("fn", key, _args(8)) is None
    assert program_cache.load("other", key, args) is None


@pytest.mark.parametrize("damage", ["flipped", "truncated", "foreign", "garbage"])
def test_a_damaged_or_foreign_file_is_ignored_with_a_warning(folder, damage):
    args, key = _args(), ["a config", 1]
    path = program_cache.store("fn", key, jax.jit(_fn), args)
    data = path.read_bytes()
    if damage == "flipped":  # a byte of the payload
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "foreign":  # a valid program stored for another key, under this name
        other = program_cache.store("fn", ["another config"], jax.jit(_fn), args)
        data = other.read_bytes()
    else:
        data = os.urandom(len(data))
    path.write_bytes(data)
    with pytest.warns(program_cache.ProgramCacheWarning, match="not usable"):
        assert program_cache.load("fn", key, args) is None


def test_the_cache_is_off_without_a_compilation_cache_folder_or_when_opted_out(monkeypatch,
                                                                                tmp_path):  # fmt: skip
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv(program_cache.ENV, raising=False)
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert program_cache.folder() == tmp_path / program_cache.FOLDER
        monkeypatch.setenv(program_cache.ENV, "0")
        assert program_cache.folder() is None
        monkeypatch.delenv(program_cache.ENV)
        jax.config.update("jax_compilation_cache_dir", None)
        assert program_cache.folder() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_the_key_follows_the_kits_source_and_the_xla_flags(monkeypatch):
    args = _args()
    base = program_cache.program_key("fn", ["k"], args)
    assert program_cache.program_key("fn", ["k"], args) == base
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2")
    assert program_cache.program_key("fn", ["k"], args) != base
    monkeypatch.undo()
    monkeypatch.setattr(program_cache, "source_hash", lambda: "an edited kit")
    assert program_cache.program_key("fn", ["k"], args) != base


# --- across processes: pk.load's compile ahead ----------------------------------------------


def _run(path, cache, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PALI_KIT_"))}
    env = {**base, "JAX_COMPILATION_CACHE_DIR": str(cache), "PALI_KIT_WEIGHTS_CACHE": "0", **env}
    out = subprocess.run([sys.executable, "-c", COMPILE_AHEAD_CHILD, str(path), "1"], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.splitlines()[-1]), "stderr": out.stderr}


def _traced(res) -> set:
    return {name for event, name, _ in res["loading"] + res["generating"]
            if event == "jaxpr_trace_duration"}  # fmt: skip


def _compiled(events) -> set:
    return {name for event, name, _ in events if event == "backend_compile_duration"}


def test_a_later_process_runs_the_stored_prefill_and_answers_the_same(tmp_path):
    path = pk.save(pk.load("demo", dtype="bfloat16", verbose=False), tmp_path / "m.npz")
    cache = tmp_path / "cache"
    programs = cache / program_cache.FOLDER
    # the program cache off: the traced path, as before (it also fills the compilation cache)
    plain = _run(path, cache, **{program_cache.ENV: "0"})
    assert "prefill" in _traced(plain) and not programs.exists()
    first = _run(path, cache)  # traces (exports) the prefill, stores it and runs that program
    assert "prefill" in _traced(first)
    [stored] = programs.glob("prefill-*.jaxexport")
    second = _run(path, cache)  # calls the stored program: the model is not traced
    assert "prefill" not in _traced(second)
    for res in (first, second):
        threads = {name: thread for event, name, thread in res["loading"]
                   if event == "backend_compile_duration"}  # fmt: skip
        assert threads["jit(stored_prefill)"] == threads["jit(choose)"] == "pali_kit compile ahead"
    # the first token compiles nothing more than with the traced prefill (the step, at token 2)
    assert _compiled(second["generating"]) == _compiled(plain["generating"]) - {"jit(prefill)"}
    assert _compiled(second["generating"]) == {"jit(step)"}
    for res in (first, second):  # the same program: the same answer, bit for bit
        assert res["tokens"] == plain["tokens"] and res["logprobs"] == plain["logprobs"]
    assert "ProgramCacheWarning" not in first["stderr"] + second["stderr"]

    # a damaged file: warned, traced again, the same answer, and stored again
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    damaged = _run(path, cache)
    assert "ProgramCacheWarning" in damaged["stderr"] and "prefill" in _traced(damaged)
    assert damaged["tokens"] == plain["tokens"] and damaged["logprobs"] == plain["logprobs"]
    again = _run(path, cache)
    assert "prefill" not in _traced(again) and "ProgramCacheWarning" not in again["stderr"]
    assert again["tokens"] == plain["tokens"] and again["logprobs"] == plain["logprobs"]
