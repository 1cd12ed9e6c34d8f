"""What a fresh process pays before its first token: the persistent compilation cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pali_kit.api import CACHE_MIN_COMPILE_S

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
