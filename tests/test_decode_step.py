"""The decode loop's one call per token (the step samples) against a step call
followed by a sampler call, as ``decode.iter_tokens`` ran before.

Both compute the same logits (the same step program up to fusion with the
sampler) and sample them with the same key, so tokens are equal; log-probs are
a log-softmax over V = 2176 float32 terms that XLA may sum in another order when
it is fused with the step: ~V * 2^-24 * max|logit| apart, well under 1e-4 of
their O(1-10) size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import decode
from pali_kit.model import inference_params

from .conftest import tiny_config


def _two_calls_per_token(config, run, image, text, mask, n, sampler, seed=0):
    """The loop of ``iter_tokens`` with a separate sampler call after each step."""
    sampler = decode.parse_sampler(sampler)
    b, t = text.shape
    tt = decode.bucket_length(t)
    size = decode.bucket_cache(config.vision.num_tokens, tt, n)
    prefill, step, _ = decode._jitted(config, size, "float32", decode.cache_form(run))
    choose = decode._sampler_fn(sampler)
    text = np.pad(text, ((0, 0), (0, tt - t)))
    mask = np.pad(mask, ((0, 0), (0, tt - t)))
    logits, cache, valid, pos = prefill(run, image, text, mask)
    rng, done = jax.random.key(seed), np.zeros(b, bool)
    slot, tok, out = config.vision.num_tokens + tt, None, []
    for i in range(n):
        if i > 0:
            logits, cache, valid = step(run, tok, cache, valid, pos + (i - 1),
                                        jnp.int32(slot + i - 1))  # fmt: skip
        tok, logp, done = choose(logits, rng, jnp.int32(i), done, None)
        out.append((np.asarray(tok), np.asarray(logp)))
    return np.stack([o[0] for o in out], 1), np.stack([o[1] for o in out], 1)


@pytest.mark.parametrize("sampler", ["greedy", "temperature(0.7)", "top_k(5)"])
@pytest.mark.parametrize("layout", ["cpu", "official"])
def test_one_call_per_token_samples_like_two(sampler, layout):
    config = tiny_config()
    params = pk.init_params(config, 0)
    run = inference_params(params) if layout == "cpu" else params
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    text = rng.integers(2, 2000, (2, 5)).astype(np.int32)
    mask = np.ones(text.shape, bool)
    n = 6
    want = _two_calls_per_token(config, run, image, text, mask, n, sampler, seed=3)
    got = decode.generate_tokens(config, run, image, text, mask, max_new_tokens=n,
                                 sampler=sampler, seed=3)  # fmt: skip
    # no row emits EOS with these weights and prompts, so every position is compared
    assert not (want[0] == decode.EOS_ID).any()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-4 * max(1.0, np.abs(want[1]).max()))


def test_first_max_is_argmax_with_ties_infinities_and_nans():
    """``decode.first_max`` (greedy's token) answers as ``jnp.argmax`` and ``np.argmax``:
    the first of equal maxima, the first NaN of a row that holds one, index 0 of a
    row of -inf; compared exactly (indices), on small integers (many ties) and on a
    row of the 257152-token vocabulary."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (8, 50)).astype(np.float32)  # ties in every row
    x[1, :] = -np.inf
    x[2, [7, 30]] = np.nan
    x[3, [5, 9]] = np.inf
    x[4, 11] = np.nan
    x[4, 3] = np.inf
    x[5, :] = -np.inf
    x[5, 40] = -1e30
    big = rng.standard_normal((2, 257152)).astype(np.float32)
    big[1, [1000, 200000]] = 9.0  # a tie far apart
    for logits in (x, big):
        got = np.asarray(jax.jit(decode.first_max)(logits))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(logits, axis=-1)))
