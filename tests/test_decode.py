"""Cached decoding: exact against the reference and the uncached forward; samplers; buckets."""

from __future__ import annotations

import numpy as np
import pytest

from pali_kit import decode
from pali_kit.decode import EOS_ID, parse_sampler

from .conftest import FORWARD_REL, assert_close_to_scale


def test_greedy_matches_big_vision_decoder(ref):
    model, expect = ref
    tokens, logp = model.generate_tokens(
        expect["image"], expect["prompt"], expect["mask_input"], max_new_tokens=8
    )
    np.testing.assert_array_equal(tokens, expect["decode_tokens"])
    # log-softmax is 2-Lipschitz in the max norm: the log-probs move by at most twice what
    # the logits do, FORWARD_REL of max |logit| (conftest), as big_vision's and ours differ.
    bound = 2 * FORWARD_REL * np.abs(expect["text_logits"]).max()
    assert np.abs(logp - expect["decode_logp"]).max() <= bound


def test_cached_greedy_equals_argmax_of_uncached_forward_at_every_step(ref):
    model, expect = ref
    image, prompt, mask = expect["image"][:1], expect["prompt"][:1], expect["mask_input"][:1]
    steps = 6
    tokens, _ = model.generate_tokens(image, prompt, mask, max_new_tokens=steps)
    real = prompt[0][mask[0]]
    width = len(real) + steps  # one padded shape for every step: a single compile
    for i in range(steps):
        n = len(real) + i
        text = np.zeros((1, width), np.int32)
        text[0, :n] = np.concatenate([real, tokens[0, :i]])
        mask_ar = (np.arange(width) >= len(real)).astype(np.int32)[None]
        logits = np.asarray(model.logits(image, text, mask_ar, np.arange(width)[None] < n))
        assert tokens[0, i] == np.argmax(logits[0, n - 1]), f"step {i}"


def test_ragged_batch_rows_equal_their_solo_results(ref):
    model, expect = ref
    batch, _ = model.generate_tokens(
        expect["image"], expect["prompt"], expect["mask_input"], max_new_tokens=8
    )
    for i in range(2):
        n = int(expect["mask_input"][i].sum())
        solo, _ = model.generate_tokens(
            expect["image"][i : i + 1], expect["prompt"][i : i + 1, :n],
            np.ones((1, n), bool), max_new_tokens=8,
        )  # fmt: skip
        np.testing.assert_array_equal(solo[0], batch[i])


def test_batch_of_three_is_padded_to_four_and_cut_back(ref):
    model, expect = ref
    rows = [0, 1, 0]
    tokens, logp = model.generate_tokens(
        expect["image"][rows], expect["prompt"][rows], expect["mask_input"][rows], max_new_tokens=8
    )
    assert tokens.shape == (3, 8) and logp.shape == (3, 8)
    np.testing.assert_array_equal(tokens, expect["decode_tokens"][rows])


def _run(model, expect, sampler, seed=0, **kw):
    return model.generate_tokens(
        expect["image"], expect["prompt"], expect["mask_input"], max_new_tokens=8,
        sampler=sampler, seed=seed, **kw,
    )  # fmt: skip


def test_beam_one_equals_greedy(ref):
    model, expect = ref
    np.testing.assert_array_equal(
        _run(model, expect, "beam(1)")[0], _run(model, expect, "greedy")[0]
    )


def test_beam_search_never_scores_below_greedy(tiny_model):
    image = np.zeros((1, 28, 28, 3), np.float32)
    text, mask = np.array([[2, 50, 60, 4]]), np.ones((1, 4), bool)
    greedy = tiny_model.generate_tokens(image, text, mask, max_new_tokens=6)
    beam = tiny_model.generate_tokens(image, text, mask, max_new_tokens=6, sampler="beam(4)")
    assert decode.sequence_scores(*beam)[0] >= decode.sequence_scores(*greedy)[0] - 1e-4


def test_nucleus_one_equals_temperature_one_for_the_same_seed(ref):
    model, expect = ref
    a = _run(model, expect, "nucleus(1.0)", seed=3)[0]
    b = _run(model, expect, "temperature(1.0)", seed=3)[0]
    np.testing.assert_array_equal(a, b)


def test_sampling_is_reproducible_and_seed_dependent(ref):
    model, expect = ref
    a = _run(model, expect, "temperature(2.0)", seed=1)[0]
    np.testing.assert_array_equal(a, _run(model, expect, "temperature(2.0)", seed=1)[0])
    assert not np.array_equal(a, _run(model, expect, "temperature(2.0)", seed=2)[0])


def test_top_k_one_and_tiny_nucleus_are_greedy(ref):
    model, expect = ref
    greedy = _run(model, expect, "greedy")[0]
    np.testing.assert_array_equal(_run(model, expect, "top_k(1)", seed=5)[0], greedy)
    np.testing.assert_array_equal(_run(model, expect, "nucleus(1e-6)", seed=5)[0], greedy)


def test_top_k_only_samples_among_the_k_best(ref):
    model, expect = ref
    image, prompt, mask = expect["image"][:1], expect["prompt"][:1], expect["mask_input"][:1]
    real = prompt[0][mask[0]][None]
    logits = np.asarray(model.logits(image, real, np.zeros_like(real)))[0, -1]
    allowed = set(np.argsort(-logits)[:3].tolist())
    for seed in range(8):
        tok, _ = model.generate_tokens(
            image, prompt, mask, max_new_tokens=1, sampler="top_k(3, 5.0)", seed=seed
        )
        assert int(tok[0, 0]) in allowed


def test_logit_mask_restricts_tokens_but_logprob_is_unmasked(ref):
    model, expect = ref
    allowed = np.zeros(model.config.llm.vocab_size, bool)
    allowed[[7, 9]] = True
    tokens, logp = _run(model, expect, "greedy", logit_mask=allowed)
    assert set(np.unique(tokens).tolist()) <= {7, 9}
    assert np.all(logp < 0)


def test_tokens_after_eos_are_padding(ref):
    model, expect = ref
    allowed = np.zeros(model.config.llm.vocab_size, bool)
    allowed[EOS_ID] = True  # force an immediate EOS
    tokens, logp = _run(model, expect, "greedy", logit_mask=allowed)
    assert (
        (tokens[:, 0] == EOS_ID).all() and (tokens[:, 1:] == 0).all() and (logp[:, 1:] == 0).all()
    )


def test_best_of_n_keeps_the_most_likely_sample(ref):
    model, expect = ref
    best, best_lp = _run(model, expect, "temperature(1.5)", seed=4, best_of=4)
    assert best.shape == (2, 8)
    # Every candidate drawn with the same seed scores at most the chosen one.
    rep = lambda x: np.repeat(x, 4, axis=0)
    cands, cand_lp = model.generate_tokens(
        rep(expect["image"]), rep(expect["prompt"]), rep(expect["mask_input"]),
        max_new_tokens=8, sampler="temperature(1.5)", seed=4,
    )  # fmt: skip
    scores = decode.sequence_scores(cands, cand_lp).reshape(2, 4)
    # The same tokens scored by the same weights in two batch layouts: sums of 8 log-probs
    # that differ by re-association only (FORWARD_REL of the scale, conftest).
    assert_close_to_scale(decode.sequence_scores(best, best_lp), scores.max(axis=1), FORWARD_REL)


@pytest.mark.parametrize(
    "spec, parsed",
    [("greedy", ("greedy", ())), ("temperature(0.5)", ("temperature", (0.5,))),
     ("nucleus(0.9)", ("nucleus", (0.9,))), ("nucleus(0.9, 0.7)", ("nucleus", (0.9, 0.7))),
     ("top_k(40)", ("top_k", (40.0,))), ("beam(4)", ("beam", (4.0,)))],
)  # fmt: skip
def test_sampler_specs_parse(spec, parsed):
    s = parse_sampler(spec)
    assert (s.name, s.args) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        "gready",
        "temperature",
        "temperature(0)",
        "nucleus(1.5)",
        "top_k(2.5)",
        "beam(0)",
        "nucleus(a)",
    ],
)
def test_bad_sampler_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="sampler"):
        parse_sampler(spec)


def test_stream_pieces_concatenate_to_the_generated_text(tiny_model):
    image = np.full((28, 28, 3), 128, np.uint8)
    [full] = tiny_model.generate(image, "caption en", max_new_tokens=12)
    pieces = list(tiny_model.stream(image, "caption en", max_new_tokens=12))
    assert "".join(pieces) == full.text
    assert len(pieces) >= 2


def test_generate_returns_text_tokens_and_logprobs(tiny_model):
    image = np.full((28, 28, 3), 128, np.uint8)
    outs = tiny_model.generate(
        [image, image], ["caption en", "answer en how many shapes"], max_new_tokens=5
    )
    assert [o.prompt for o in outs] == ["caption en", "answer en how many shapes"]
    for o in outs:
        assert o.tokens.dtype == np.int32 and len(o.tokens) == len(o.logprobs) <= 5
        assert o.text == tiny_model.tokenizer.decode(o.tokens.tolist())


def test_twenty_prompts_of_different_lengths_compile_nothing_new(tiny_model):
    image = np.full((28, 28, 3), 90, np.uint8)
    tiny_model.generate(image, "caption en", max_new_tokens=8)  # warm up the bucket
    before = decode.compile_count()
    lengths = set()
    for n in range(1, 21):
        prompt = "answer en is there a " + " ".join(
            ["red circle"] * (n // 2) + ["square"] * (n % 2)
        )
        lengths.add(len(tiny_model.tokenizer.encode(prompt)))
        tiny_model.generate(image, prompt, max_new_tokens=8)
    assert len(lengths) == 20
    assert decode.compile_count() == before


def test_empty_batch_and_empty_prompt_are_rejected(tiny_model):
    image = np.zeros((1, 28, 28, 3), np.float32)
    with pytest.raises(ValueError, match="empty batch"):
        decode.generate_tokens(tiny_model.config, tiny_model.params, image[:0], np.zeros((0, 4), np.int32),
                               np.zeros((0, 4), bool), max_new_tokens=2)  # fmt: skip
    with pytest.raises(ValueError, match="at least one real token"):
        tiny_model.generate_tokens(
            image, np.zeros((1, 4), np.int32), np.zeros((1, 4), bool), max_new_tokens=2
        )


def test_cache_dtype_bfloat16_keeps_greedy_tokens(ref):
    model, expect = ref
    tokens, _ = _run(model, expect, "greedy", cache_dtype="bfloat16")
    agree = np.mean(tokens == expect["decode_tokens"])
    assert agree >= 0.75
