"""Shared fixtures: the big_vision reference models and tiny random models."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Tests compile many small programs: a lower XLA backend optimisation level halves
# compile time and changes no result beyond float rounding. Set before JAX loads, and
# added to the flags already given (`make test-isa` passes --xla_cpu_max_isa=... there).
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()
os.environ.setdefault("PALI_KIT_COMPILATION_CACHE", "0")
# The weights cache (on by default) would write half-precision test checkpoints into
# ~/.cache; its tests choose their folder explicitly.
os.environ.setdefault("PALI_KIT_WEIGHTS_CACHE", "0")

import numpy as np  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# XLA:CPU converts float16 through the F16C instructions; when they are ruled out
# (`--xla_cpu_max_isa=SSE4_2`, as `make test-isa ISAS=SSE4_2` does) a compiled program
# that touches float16 fails to link ("Symbols not found: __truncsfhf2"), a limit of XLA
# rather than of the kit. There, the tests whose id names float16 are skipped; everything
# else runs.
NO_F16C = "--xla_cpu_max_isa=SSE" in os.environ.get("XLA_FLAGS", "")


def pytest_collection_modifyitems(config, items):
    if not NO_F16C:
        return
    skip = pytest.mark.skip(reason="XLA:CPU cannot convert float16 without F16C (ISA limit)")
    for item in items:
        if re.search(r"(?<!b)float16", item.nodeid):  # float16, not bfloat16
            item.add_marker(skip)


# Float tolerances. XLA picks its kernels (and so the order of every sum) by CPU instruction
# set, fusion and shapes; re-associating a float32 sum of K terms moves it by up to about
# K * eps * max|term|. Two computations of the same quantity are therefore compared relative
# to the scale of the values (max |desired|), never with an absolute 1e-5 that holds on one
# machine. `make test-isa` reruns the numerical tests under other instruction sets.
F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


# Two float32 forward passes of the same tiny fixture model (tests/fixtures, width 32, depth
# 2) through different programs (big_vision vs the kit, scan vs unrolled, views vs stacked,
# padded vs not): the longest sum is the patch embedding's K = 14*14*3 = 588 terms, so one
# re-association moves a value by up to K * eps = 7e-5 of the scale; the layers' norms keep
# that relative size (seen: about 1e-6 on AVX-512, AVX2 and SSE4.2). A real mistake (a mask,
# a layer order, a scale) moves the logits by 1e-2 of their scale or more.
FORWARD_REL = 1e-4


def scaled_error(actual, desired) -> float:
    """max |actual - desired| / max |desired|, in float64 (any shapes that broadcast)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    return float(np.max(np.abs(actual - desired)) / np.max(np.abs(desired)))


def assert_close_to_scale(actual, desired, rel: float, what: str = "") -> None:
    """Assert max |actual - desired| <= rel * max |desired|; the caller argues `rel`."""
    err = scaled_error(actual, desired)
    assert err <= rel, (
        f"{what or 'values'}: max |difference| / max |desired| = {err:.2e} > {rel:.1e}"
    )


def assert_generates_like_the_official_tree(model, params, config) -> None:
    """``model`` (any weight layout) decodes 4 greedy tokens from a 28 px image exactly as
    ``pk.Model(params, config)`` does: the same program on the same values, so the tokens
    and their log-probabilities are equal, not just close."""
    import pali_kit as pk

    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
    text, mask = np.array([[5, 6, 7]], np.int32), np.ones((1, 3), bool)
    a = model.generate_tokens(image, text, mask, max_new_tokens=4)
    b = pk.Model(params, config).generate_tokens(image, text, mask, max_new_tokens=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


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


def tiny_bf16_model(seed: int = 3):
    """``(config, params)``: a tiny PaliGemma 2 in bfloat16 whose MLP down-projection
    spans two CPU-layout column blocks (``model.cpu.BLOCK``); every other LLM matrix
    one block or more."""
    import jax
    import jax.numpy as jnp

    import pali_kit as pk
    from pali_kit.model.cpu import BLOCK

    config = tiny_config(llm_mlp_dim=BLOCK + 64)
    return config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, seed))


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


# ----------------------------------------------------------------------------- independent checks
# tests/test_parity.py (against transformers) and the VAE reference tests of
# tests/test_segmentation.py (against a PyTorch VAE) check the kit against independent
# implementations; they need the parity extra. `make test` and CI set PALI_KIT_REQUIRE_PARITY=1:
# there a missing torch/transformers fails the run instead of skipping those checks.
PARITY_MODULES = ("torch", "transformers")
PARITY_INSTALL = (
    "pip install -e '.[parity]' --extra-index-url https://download.pytorch.org/whl/cpu "
    "(or `make test`)"
)


def _missing_parity_modules() -> list[str]:
    import importlib.util

    return [name for name in PARITY_MODULES if importlib.util.find_spec(name) is None]


def pytest_configure(config):
    if os.environ.get("PALI_KIT_REQUIRE_PARITY") == "1" and (missing := _missing_parity_modules()):
        raise pytest.UsageError(
            f"PALI_KIT_REQUIRE_PARITY=1 but {', '.join(missing)} cannot be imported: the parity "
            f"and VAE reference tests would not run. Install them: {PARITY_INSTALL}"
        )


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def _is_independent_check_skip(report) -> bool:
    return report.skipped and any(name in _skip_reason(report) for name in PARITY_MODULES)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # PALI_KIT_REQUIRE_PARITY=1 with the modules present: any skip of these checks is a failure.
    report = (yield).get_result()
    if os.environ.get("PALI_KIT_REQUIRE_PARITY") == "1" and _is_independent_check_skip(report):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"PALI_KIT_REQUIRE_PARITY=1, but this independent check skipped: {reason}"


def pytest_terminal_summary(terminalreporter):
    skipped = [
        r for r in terminalreporter.stats.get("skipped", []) if _is_independent_check_skip(r)
    ]
    if not skipped:
        return
    where = sorted({r.nodeid.split("::")[0] or r.fspath for r in skipped})
    terminalreporter.section("independent checks skipped", sep="!", red=True, bold=True)
    terminalreporter.line(
        f"{len(skipped)} skipped test(s) or module(s) compare the kit with transformers and a "
        f"PyTorch VAE ({', '.join(where)}): torch/transformers are not installed.\n"
        f"To run them: {PARITY_INSTALL}"
    )


# A child process of the compile-ahead tests (tests/test_cold_start.py, test_program_cache.py):
# argv = [checkpoint path, "1" to compile ahead (else off)]; it prints one JSON line with the
# compile events while loading and while generating, the tokens, log-probs and whether a
# weights cache was mapped.
COMPILE_AHEAD_CHILD = """
import json, sys, threading, warnings
import numpy as np
from jax import monitoring
import pali_kit as pk
from pali_kit import api

warnings.simplefilter("error", RuntimeWarning)  # a failed or mispredicted compile ahead
EVENTS = []
monitoring.register_event_duration_secs_listener(
    lambda event, secs, fun_name=None, **kw: EVENTS.append(
        (event.rsplit("/", 1)[-1], fun_name, threading.current_thread().name)))
path, ahead = sys.argv[1], sys.argv[2] == "1"
api.COMPILE_AHEAD_MIN_BYTES = 0 if ahead else 1 << 62
model = pk.load(path, verbose=False, tokenizer=pk.Tokenizer.demo())
if ahead:
    model._compiled_ahead.result()
loading = list(EVENTS)
EVENTS.clear()
image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
[out] = model.generate(image, "caption en", max_new_tokens=6)
maps = open("/proc/self/maps").read() if sys.platform == "linux" else ""
print(json.dumps(dict(loading=loading, generating=EVENTS, tokens=out.tokens.tolist(),
                      logprobs=out.logprobs.tolist(), mapped=".weights" in maps)))
"""
