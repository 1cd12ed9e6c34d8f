"""Generation: prefill a KV cache with image + prompt, then decode token by token.

    logits, cache = prefill(image tokens + prompt)       one bidirectional prefix block
    repeat:  token = sampler(logits)                      greedy, temperature, nucleus, top_k
             logits, cache = step(token, cache)           one causal token, cache updated in place
    until every row has produced EOS or max_new_tokens is reached

Cache layout (no re-alignment needed for ragged batches)::

    slot:  0 .. N-1      N .. N+T-1                 N+T, N+T+1, ...
           image         prompt (right-padded)      generated tokens, one slot per step

Padding slots are never attended to and do not advance RoPE positions, so a
padded row decodes exactly as it would alone. Shapes are bucketed (batch to a
power of two, prompt length to a power of two >= 32, cache to a multiple of
128) so that a notebook user trying new prompts hits compiled code.

Samplers are spec strings, as in big_vision: ``"greedy"``, ``"temperature(t)"``,
``"nucleus(p)"`` / ``"nucleus(p, t)"``, ``"top_k(k)"`` / ``"top_k(k, t)"``,
``"beam(n)"``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import constrain, program_cache
from .configs import PaliGemmaConfig
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    SamplerError,
    check_float_dtype,
    check_int,
    did_you_mean,
    short_repr,
)
from .model import PaliGemma
from .model.cpu import cache_form

EOS_ID = 1
PAD_ID = 0

# --- shape buckets ------------------------------------------------------------------


def bucket_batch(b: int) -> int:
    """Batch sizes are padded to a power of two."""
    return 1 << max(0, math.ceil(math.log2(max(b, 1))))


def bucket_length(t: int, minimum: int = 32) -> int:
    """Prompt lengths are padded to a power of two, at least ``minimum``."""
    return max(minimum, 1 << math.ceil(math.log2(max(t, 1))))


def bucket_cache(n_img: int, text_len: int, max_new_tokens: int, multiple: int = 128) -> int:
    """Cache slots: image + prompt + new tokens, the text part rounded up to ``multiple``."""
    return n_img + multiple * math.ceil((text_len + max_new_tokens) / multiple)


# --- samplers -------------------------------------------------------------------------

_SAMPLER_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")
_SAMPLER_ARGS = {"greedy": (0, 0), "temperature": (1, 1), "nucleus": (1, 2), "top_k": (1, 2),
                 "beam": (1, 1)}  # fmt: skip


@dataclass(frozen=True)
class Sampler:
    """A parsed sampler spec; hashable, so it can be a static jit argument."""

    name: str
    args: tuple[float, ...] = ()

    def __str__(self):
        return self.name + (f"({', '.join(f'{a:g}' for a in self.args)})" if self.args else "")


SAMPLER_HELP = (
    "greedy | temperature(t) | nucleus(p) | nucleus(p, t) | top_k(k) | top_k(k, t) | beam(n)"
)


def parse_sampler(spec: str | Sampler, vocab_size: int | None = None) -> Sampler:
    """ "nucleus(0.9, 0.7)" -> Sampler("nucleus", (0.9, 0.7)); checks names and ranges once.

    The rules (``vocab_size`` V bounds k and n when given; ``SamplerError`` otherwise):
      greedy            the most likely token; deterministic (``seed`` is not used)
      temperature(t)    sample from softmax(logits / t), 0 < t (finite); t -> 0 is greedy,
                        so t = 0 is refused: write "greedy"
      nucleus(p[, t])   sample from the smallest set of tokens with probability >= p,
                        0 < p <= 1; optional temperature t > 0
      top_k(k[, t])     sample among the k most likely tokens, 1 <= k <= V (an integer)
      beam(n)           beam search with n beams, 1 <= n <= V; deterministic
    """
    if isinstance(spec, Sampler):
        name, args, text = spec.name, tuple(spec.args), str(spec)
    elif isinstance(spec, str):
        text = spec
        m = _SAMPLER_RE.match(spec)
        if not m or m[1] not in _SAMPLER_ARGS:
            guess = did_you_mean(m[1], _SAMPLER_ARGS) if m else ""
            raise SamplerError(f"sampler={spec!r} is not a sampler{guess}; use {SAMPLER_HELP}")
        name, raw = m[1], (m[2] or "").strip()
        try:
            args = tuple(float(a) for a in raw.split(",")) if raw else ()
        except ValueError:
            raise SamplerError(
                f"sampler={spec!r}: the arguments must be numbers, e.g. {name}(0.9)"
            ) from None
    else:
        raise ArgumentTypeError(
            f"sampler={spec!r} must be a string such as 'greedy' or 'top_k(40)', "
            f"not a {type(spec).__name__}; use {SAMPLER_HELP}"
        )
    if name not in _SAMPLER_ARGS:
        raise SamplerError(f"sampler={text!r} is not a sampler; use {SAMPLER_HELP}")
    lo, hi = _SAMPLER_ARGS[name]
    if not lo <= len(args) <= hi:
        want = "no arguments" if hi == 0 else f"{lo}" + (f" or {hi}" if hi > lo else "")
        raise SamplerError(
            f"sampler={text!r}: {name} takes {want} argument(s), got {len(args)}; "
            f"use {SAMPLER_HELP}"
        )
    if not all(math.isfinite(a) for a in args):
        raise SamplerError(f"sampler={text!r}: arguments must be finite numbers")
    temps = {"temperature": args[:1], "nucleus": args[1:2], "top_k": args[1:2]}.get(name, ())
    if any(t <= 0 for t in temps):
        raise SamplerError(
            f"sampler={text!r}: the temperature must be > 0 (t -> 0 is greedy decoding: "
            "write sampler='greedy')"
        )
    if name == "nucleus" and not 0 < args[0] <= 1:
        raise SamplerError(
            f"sampler={text!r}: p={args[0]:g} must be in (0, 1] (the probability mass kept)"
        )
    if name in ("top_k", "beam"):
        what = "k" if name == "top_k" else "n"
        top = f"{vocab_size} (the vocabulary size)" if vocab_size else "the vocabulary size"
        if args[0] != int(args[0]) or args[0] < 1 or (vocab_size and args[0] > vocab_size):
            raise SamplerError(
                f"sampler={text!r}: {what}={args[0]:g} must be an integer with 1 <= {what} <= {top}"
            )
    return Sampler(name, args)


DETERMINISTIC = ("greedy", "beam")
MAX_NEW_TOKENS_LIMIT = 1 << 16


def check_generate_args(config: PaliGemmaConfig, *, max_new_tokens, sampler, seed, best_of=1,
                        cache_dtype=None, logit_mask=None, where: str = "generate_tokens"):  # fmt: skip
    """Check every generation keyword once; returns them parsed.

    Returns ``(sampler Sampler, max_new_tokens int, seed int, best_of int,
    cache_dtype str | None, logit_mask bool[V] | None)``; raises the kit's
    ArgumentError / ArgumentTypeError / SamplerError naming the keyword.
    """
    vocab = config.llm.vocab_size
    sampler = parse_sampler(sampler, vocab)
    max_new_tokens = check_int(
        max_new_tokens, "max_new_tokens", where, low=1, high=MAX_NEW_TOKENS_LIMIT,
        fix="it is the number of tokens to generate per prompt, e.g. 32",
    )  # fmt: skip
    seed = check_int(seed, "seed", where, fix="e.g. seed=0")
    if not -(1 << 63) <= seed < (1 << 63):
        raise ArgumentError(f"{where}: seed={seed} does not fit in 64 bits: use a smaller int")
    best_of = check_int(best_of, "best_of", where, low=1,
                        fix="best_of=n samples each prompt n times and keeps the likeliest")  # fmt: skip
    if best_of > 1 and sampler.name in DETERMINISTIC:
        raise ArgumentError(
            f"{where}: best_of={best_of} with sampler={str(sampler)!r}: {sampler.name} is "
            "deterministic, so every try gives the same answer; use best_of with temperature(t), "
            "nucleus(p) or top_k(k), or a wider beam(n)"
        )
    dtype = check_float_dtype(cache_dtype, "cache_dtype", where)
    mask = None if logit_mask is None else check_logit_mask(logit_mask, vocab, where)
    return sampler, max_new_tokens, seed, best_of, (None if dtype is None else dtype.name), mask


def check_logit_mask(logit_mask, vocab_size: int, where: str) -> np.ndarray:
    """bool[V] (or 0/1 integers) with at least one allowed token -> numpy bool[V]."""
    try:
        mask = np.asarray(logit_mask)
    except Exception:
        mask = np.asarray(None, object)
    if mask.dtype != np.bool_ and not (
        np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()
    ):
        raise ArgumentTypeError(
            f"{where}: logit_mask={short_repr(logit_mask)} must be a bool array of shape "
            f"[{vocab_size}] (True = the token may be generated)"
        )
    if mask.shape != (vocab_size,):
        raise ArgumentError(
            f"{where}: logit_mask has shape {mask.shape}, expected [{vocab_size}] (one entry per "
            f"vocabulary token); build it with np.zeros({vocab_size}, bool) and set allowed ids"
        )
    if not mask.any():
        raise ArgumentError(f"{where}: logit_mask allows no token at all: set some entries True")
    return mask.astype(bool)


def first_max(logits):
    """float[B, V] -> int32[B]: the index of each row's largest value, the first of equal
    ones, or of its first NaN: ``jnp.argmax``'s answer.

    As a max, then the smallest index that holds it: XLA:CPU runs ``argmax`` (one
    reduction of value-index pairs) element by element, these two reductions
    vectorized; once per generated token over the 257152-token vocabulary, that is
    1.5 ms per token of a 3B int4 model (``bench/decode_loop.py``).
    """
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN where the row holds one
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def sample(logits, rng, sampler: Sampler):
    """float32[B, V] logits -> int32[B] tokens (jit-friendly; ``sampler`` static)."""
    name, args = sampler.name, sampler.args
    if name == "greedy" or name == "beam":
        return first_max(logits)
    if name == "temperature":
        return jax.random.categorical(rng, logits / args[0]).astype(jnp.int32)
    if name == "nucleus":
        p, t = args[0], (args[1] if len(args) > 1 else 1.0)
        logits = logits / t
        ranked = jnp.sort(logits, axis=-1, descending=True)
        cum = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
        cutoff = jnp.take_along_axis(ranked, jnp.sum(cum < p, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < cutoff, -1.0e7, logits)
        return jax.random.categorical(rng, logits).astype(jnp.int32)
    if name == "top_k":
        k, t = int(args[0]), (args[1] if len(args) > 1 else 1.0)
        kth = jax.lax.top_k(logits, k)[0][:, -1:]
        logits = jnp.where(logits < kth, -1.0e7, logits / t)
        return jax.random.categorical(rng, logits).astype(jnp.int32)
    raise ValueError(f"unknown sampler {sampler}")


def _choose(logits, rng, sampler, logit_mask):
    """Sample with an optional allow-mask; the log-prob comes from the unmasked logits."""
    masked = logits if logit_mask is None else jnp.where(logit_mask, logits, -jnp.inf)
    tokens = sample(masked, rng, sampler)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)
    return tokens, logp[:, 0]


# --- the jitted pieces -------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _jitted(config: PaliGemmaConfig, cache_size: int, cache_dtype: str, form: type):
    """Compiled prefill and one-token step for one model config, cache size and
    cache class (``form``: ``model.cpu.cache_form`` of the run tree), and
    ``step_and_sample(sampler)``: the step and the sampler as one compiled call
    (``params, tok, cache, valid, pos, slot, rng, t, done, logit_mask -> tok,
    logp, done, cache, valid``), which spares the loop a second call per token."""
    module = PaliGemma(config)
    dtype = jnp.dtype(cache_dtype)

    def prefill(params, images, text, mask_input):
        return module.apply(
            {"params": params}, images, text, mask_input, cache_size, dtype, form,
            method=PaliGemma.prefill,
        )  # fmt: skip

    def step(params, tok, cache, valid, pos, slot):
        return module.apply(
            {"params": params}, tok, cache, valid, pos, slot, method=PaliGemma.decode_step
        )

    @functools.lru_cache(maxsize=16)
    def step_and_sample(sampler: Sampler):
        def step(params, tok, cache, valid, pos, slot, rng, t, done, logit_mask):
            logits, cache, valid = module.apply(
                {"params": params}, tok, cache, valid, pos, slot, method=PaliGemma.decode_step
            )
            tok, logp = _choose(logits, jax.random.fold_in(rng, t), sampler, logit_mask)
            return (*_finish(tok, logp, done), cache, valid)

        return count_traces(jax.jit(step, donate_argnums=(2,)), "step")

    return (
        count_traces(jax.jit(prefill), "prefill"),
        count_traces(jax.jit(step, donate_argnums=(2,)), "step"),
        step_and_sample,
    )


@functools.lru_cache(maxsize=64)
def _sampler_fn(sampler: Sampler):
    """Compiled: logits -> (token, its log-prob, finished rows); small and quick to build."""

    def choose(logits, rng, t, done, logit_mask):
        tok, logp = _choose(logits, jax.random.fold_in(rng, t), sampler, logit_mask)
        return _finish(tok, logp, done)

    return count_traces(jax.jit(choose), "sample")


@functools.lru_cache(maxsize=64)
def _constrained_fn(sampler: Sampler):
    """As ``_sampler_fn``, masking logits with a ``constrain`` automaton whose per-row
    state (int32[B, 2]) is advanced by the chosen token, all inside one compiled call."""

    def choose(logits, rng, t, done, tables, state):
        mask = constrain.allowed_tokens(tables, state, t, logits.shape[-1])
        tok, logp = _choose(logits, jax.random.fold_in(rng, t), sampler, mask)
        tok, logp, done = _finish(tok, logp, done)
        return tok, logp, done, constrain.advance(tables, state, tok)

    return count_traces(jax.jit(choose), "sample")


def _step_params(params):
    """What the one-token step reads: the language model's weights. Every call
    flattens its arguments (about a thousand arrays for a 3B model); the image
    encoder's, which the step never reads, would add a third more."""
    return {"llm": params["llm"]}


def _finish(tok, logp, done):
    """Rows already finished emit padding; a row is finished once it emits EOS."""
    tok = jnp.where(done, PAD_ID, tok)
    logp = jnp.where(done, 0.0, logp)
    return tok, logp, jnp.logical_or(done, tok == EOS_ID)


COMPILES = {"prefill": 0, "step": 0, "sample": 0, "beam": 0}


class _Counted:
    """A jitted function whose new shapes are counted in ``COMPILES``; its first call
    after ``compile_ahead`` waits for that compile instead of compiling again."""

    def __init__(self, jitted, name: str):
        self.jitted, self.name = jitted, name
        self.pending: concurrent.futures.Future | None = None
        # arguments' signature -> the same function from a stored program (program_cache)
        self.programs: dict = {}

    def __call__(self, *args):
        if self.pending is not None:
            _await(self)
        fn = self.programs.get(signature(args), self.jitted) if self.programs else self.jitted
        before = fn._cache_size()
        out = fn(*args)
        COMPILES[self.name] += fn._cache_size() - before
        return out


def signature(args) -> tuple:
    """The tree, shapes and dtypes of ``args`` (arrays or ``jax.ShapeDtypeStruct``)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


def count_traces(fn, name):
    """Wrap a jitted function so tracing it (i.e. compiling a new shape) is counted."""
    return _Counted(fn, name)


def compile_count() -> int:
    """How many generation functions have been compiled in this process."""
    return sum(COMPILES.values())


# --- compiling ahead ---------------------------------------------------------------------

_AHEAD_LOCK = threading.Lock()  # one compile-ahead thread at a time


def compile_ahead(config: PaliGemmaConfig, params, *, batch: int = 1, text_len: int = 1,
                  max_new_tokens: int = 64, sampler="greedy", cache_dtype=None,
                  step: bool = False) -> concurrent.futures.Future:  # fmt: skip
    """Compile on a background thread what ``iter_tokens`` runs first for these shapes.

    The prefill and the sampler (with ``step``, also the one-token step, which
    the second token needs) are traced, lowered and compiled (fetched from the persistent compilation cache when it holds them)
    for ``params`` (the run tree, or the same tree of ``jax.ShapeDtypeStruct``,
    e.g. ``model.cpu.abstract_layout`` while the weights load), one image of the
    model's resolution per row, ``batch`` rows and prompts of ``text_len`` tokens
    (both bucketed as ``iter_tokens`` does). A later call with those shapes finds
    them compiled: each function's first call waits for its compile instead of
    compiling again. An error here never reaches the caller of this function: that
    first call warns with it and compiles as usual. Returns a Future (result None)
    done once everything is compiled. (``pk.load`` leaves the step out: on a
    CPU with few cores it would take CPU time from the load and the first token.)
    The prefill runs as the program ``program_cache`` keeps for these shapes
    (stored by an earlier process, or exported and stored now), so a later
    process lowers a call of it instead of tracing the model.
    """
    sampler = parse_sampler(sampler, config.llm.vocab_size)
    bb, tt = bucket_batch(batch), bucket_length(text_len)
    cache_size = bucket_cache(config.vision.num_tokens, tt, max_new_tokens)
    dtype = jnp.dtype(cache_dtype or jnp.float32).name
    form = cache_form(params)
    prefill, _, step_and_sample = _jitted(config, cache_size, dtype, form)
    step_fn = step_and_sample(sampler)
    choose = _sampler_fn(sampler)
    fns = (prefill, choose, step_fn) if step else (prefill, choose)
    stages = [(fn, concurrent.futures.Future()) for fn in fns]
    for fn, future in stages:
        fn.pending = future
    done = concurrent.futures.Future()
    r = config.resolution
    inputs = (params, jax.ShapeDtypeStruct((bb, r, r, 3), jnp.float32),
              jax.ShapeDtypeStruct((bb, tt), jnp.int32), jax.ShapeDtypeStruct((bb, tt), bool))  # fmt: skip
    # not a daemon: a process that ends meanwhile waits for it rather than killing it mid-compile
    key = [repr(config), cache_size, dtype, f"{form.__module__}.{form.__qualname__}"]
    threading.Thread(target=_compile_stages, args=(stages, inputs, bb, done, key),
                     name="pali_kit compile ahead").start()  # fmt: skip
    return done


AHEAD_SWITCH_S = 5e-4  # the interpreter's switch interval while compiling ahead (default 5 ms)


def _compile_stages(stages, inputs, bb, done, key=None):
    """The thread of ``compile_ahead``: prefill, then sampler, then step, each
    traced from the previous one's output shapes.

    The prefill is the program ``program_cache`` holds for ``key`` and these
    shapes: stored by an earlier process (then lowered and compiled, or fetched,
    without tracing the model), else exported now and stored. Every process
    thus compiles the same program. With the program cache off it is traced.

    Tracing holds the GIL for seconds; the loading thread meanwhile needs it
    briefly between its reads, and would wait up to a switch interval each time,
    so the interval is shortened while this runs.
    """
    with _AHEAD_LOCK:
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, AHEAD_SWITCH_S))
        try:
            prefill, f_prefill = stages[0]
            traced = _stored_prefill(prefill, inputs, key)
            stored = traced is not None
            if not stored:  # the program cache is off (or failed: warned)
                traced = prefill.jitted.trace(*inputs)
                traced.lower().compile()
            f_prefill.set_result(None)
            logits, cache, valid, pos = out = traced.out_info
            # a stored program's results are committed to their device (an argument of
            # another signature to what they feed): so are the shapes traced from them
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if stored else None
            if stored:
                logits, cache, valid, pos = jax.tree.map(
                    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), out
                )
            # also the small eager operations of the loop's first steps (compiled once
            # per process: too quick for the persistent cache)
            rng, t = jax.random.key(0), jnp.int32(0)
            jax.device_put(np.zeros(bb, np.int32), device) + 0
            choose, f_choose = stages[1]
            traced = choose.jitted.trace(logits, rng, t, np.zeros(bb, bool), None)
            traced.lower().compile()
            f_choose.set_result(None)
            if len(stages) > 2:
                (step, f_step), (tok, _, done_rows) = stages[2], traced.out_info
                step.jitted.trace(_step_params(inputs[0]), tok, cache, valid, pos, t, rng, t,
                                  done_rows, None).lower().compile()  # fmt: skip
                f_step.set_result(None)
            done.set_result(None)
        except BaseException as e:  # handed to each function's first call, which warns
            for _, future in stages:
                if not future.done():
                    future.set_exception(e)
            done.set_exception(e)
        finally:
            sys.setswitchinterval(switch)


def _stored_prefill(prefill: _Counted, inputs, key):
    """The prefill from ``program_cache`` (stored, else exported and stored): a
    call of it traced, lowered and compiled, and registered with ``prefill`` for
    ``inputs``' signature; None where the program cache is off (or failed: warned)."""
    exported = None if key is None else program_cache.program("prefill", key, prefill.jitted,
                                                               inputs)  # fmt: skip
    if exported is None:
        return None
    try:
        fn = program_cache.callable_of(exported, "stored_prefill")
        traced = fn.trace(*inputs)
        traced.lower().compile()
    except Exception as e:  # noqa: BLE001 - trace the model instead
        warnings.warn(f"pali_kit: the stored prefill program failed ({type(e).__name__}: {e}); "
                      "tracing it again", program_cache.ProgramCacheWarning, stacklevel=2)  # fmt: skip
        return None
    prefill.programs[signature(inputs)] = fn
    return traced


def _await(fn: _Counted) -> None:
    """Wait for ``fn``'s compile ahead; if it failed, warn (the call then compiles)."""
    future = fn.pending
    error = future.exception()  # waits
    if fn.pending is future:
        fn.pending = None
    if error is not None:
        warnings.warn(
            f"pali_kit: compiling the {fn.name} function ahead failed ({type(error).__name__}: "
            f"{error}); it is compiled now instead",
            RuntimeWarning,
            stacklevel=3,
        )


# --- the loop ----------------------------------------------------------------------------


def pad_rows(x, b):
    """Pad axis 0 to ``b`` rows by repeating the last row."""
    x = np.asarray(x)
    if x.shape[0] == b:
        return x
    return np.concatenate([x, np.repeat(x[-1:], b - x.shape[0], axis=0)], axis=0)


def iter_tokens(
    config: PaliGemmaConfig,
    params,
    images,
    text,
    mask_input,
    *,
    max_new_tokens: int,
    sampler="greedy",
    seed: int = 0,
    cache_dtype=None,
    logit_mask=None,
    constraint=None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(tokens int32[B], logprobs float32[B])`` once per generated position.

    images: float[B, H, W, 3] in [-1, 1] (or [B, F, H, W, 3] frames);
    text: int32[B, T] right-padded prompts (all prefix); mask_input: bool[B, T].
    Stops early once every row has produced EOS. Rows that finished emit PAD (0).
    ``constraint``: a ``constrain.Constraint`` (one start state per row): only
    tokens its automaton allows are sampled; log-probs stay unmasked.
    """
    sampler, max_new_tokens, seed, _, cache_dtype, logit_mask = check_generate_args(
        config, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
        cache_dtype=cache_dtype, logit_mask=logit_mask, where="iter_tokens",
    )  # fmt: skip
    if sampler.name == "beam":
        raise SamplerError(
            f"sampler={str(sampler)!r}: beam search returns whole sequences, not a stream of "
            "tokens; use generate / generate_tokens for beam(n), or a sampler such as 'greedy'"
        )
    text, mask_input = np.asarray(text, np.int32), np.asarray(mask_input, bool)
    b, t = text.shape
    if b == 0:
        raise ArgumentError(
            "iter_tokens: text has 0 rows (an empty batch): give at least one prompt"
        )
    if np.any(mask_input.sum(axis=1) == 0):
        raise ArgumentError(
            "iter_tokens: a row of mask_input is all False: every prompt needs at least one real token"
        )
    bb, tt = bucket_batch(b), bucket_length(t)
    n_img = config.vision.num_tokens * (images.shape[1] if np.ndim(images) == 5 else 1)
    cache_size = bucket_cache(n_img, tt, max_new_tokens)
    cache_dtype = jnp.dtype(cache_dtype or jnp.float32).name
    prefill, step, step_and_sample = _jitted(config, cache_size, cache_dtype, cache_form(params))
    choose = _sampler_fn(sampler)

    text = np.pad(pad_rows(text, bb), ((0, 0), (0, tt - t)))
    mask_input = np.pad(pad_rows(mask_input, bb), ((0, 0), (0, tt - t)))
    images = pad_rows(images, bb)
    done = np.arange(bb) >= b  # dummy rows count as finished
    rng = jax.random.key(seed)
    mask = None if logit_mask is None else jnp.asarray(logit_mask, bool)
    if constraint is not None:
        choose = _constrained_fn(sampler)
        tables, cstate = (
            constraint.tables(max_new_tokens),
            constraint.initial_state(pad_to=bb, batch=b),
        )

    logits, cache, valid, pos = prefill(params, images, text, mask_input)
    slot, tok, llm = n_img + tt, None, _step_params(params)
    if constraint is None:  # then the step samples too: one compiled call per token
        step_and_choose = step_and_sample(sampler)
    for i in range(max_new_tokens):
        t, now = jnp.int32(i), jnp.int32(slot + i - 1)
        if i == 0 and constraint is None:
            tok, logp, done = choose(logits, rng, t, done, mask)
        elif constraint is None:
            tok, logp, done, cache, valid = step_and_choose(
                llm, tok, cache, valid, pos + (i - 1), now, rng, t, done, mask
            )
        else:
            if i > 0:
                logits, cache, valid = step(llm, tok, cache, valid, pos + (i - 1), now)
            tok, logp, done, cstate = choose(logits, rng, t, done, tables, cstate)
        yield np.asarray(tok)[:b], np.asarray(logp)[:b]
        if bool(np.all(np.asarray(done))):
            return


def generate_tokens(
    config: PaliGemmaConfig,
    params,
    images,
    text,
    mask_input,
    *,
    max_new_tokens: int,
    sampler="greedy",
    seed: int = 0,
    cache_dtype=None,
    logit_mask=None,
    best_of: int = 1,
    constraint=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate up to ``max_new_tokens`` per row.

    Returns ``(tokens int32[B, max_new_tokens], logprobs float32[B, max_new_tokens])``;
    positions after a row's EOS (and after an early stop) hold PAD (0) with log-prob 0.
    ``best_of=n`` samples every row n times and keeps the most likely sequence
    (sum of log-probs up to and including the first EOS), as big_vision does;
    it is refused with the deterministic samplers (greedy, beam). ``logit_mask``
    (bool[V], True = allowed) restricts every sampler, beam search included;
    log-probs are those of the unmasked model. ``seed`` is used by the sampling
    samplers only (greedy and beam are deterministic). Every keyword is checked
    by ``check_generate_args``.
    """
    sampler, max_new_tokens, seed, best_of, cache_dtype, logit_mask = check_generate_args(
        config, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, best_of=best_of,
        cache_dtype=cache_dtype, logit_mask=logit_mask, where="generate_tokens",
    )  # fmt: skip
    if sampler.name == "beam":
        return beam_search(
            config, params, images, text, mask_input, beam_size=int(sampler.args[0]),
            max_new_tokens=max_new_tokens, cache_dtype=cache_dtype, logit_mask=logit_mask,
            constraint=constraint,
        )  # fmt: skip
    if best_of > 1:
        rep = lambda x: np.repeat(np.asarray(x), best_of, axis=0)
        toks, logps = generate_tokens(
            config, params, rep(images), rep(text), rep(mask_input),
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
            cache_dtype=cache_dtype, logit_mask=logit_mask,
            constraint=None if constraint is None else constraint.repeat(best_of),
        )  # fmt: skip
        scores = sequence_scores(toks, logps).reshape(-1, best_of)
        pick = np.arange(scores.shape[0]) * best_of + np.argmax(scores, axis=1)
        return toks[pick], logps[pick]
    b = np.shape(text)[0]
    tokens = np.zeros((b, max_new_tokens), np.int32)
    logprobs = np.zeros((b, max_new_tokens), np.float32)
    steps = iter_tokens(
        config, params, images, text, mask_input, max_new_tokens=max_new_tokens,
        sampler=sampler, seed=seed, cache_dtype=cache_dtype, logit_mask=logit_mask,
        constraint=constraint,
    )  # fmt: skip
    for i, (tok, logp) in enumerate(steps):
        tokens[:, i], logprobs[:, i] = tok, logp
    return tokens, logprobs


def sequence_scores(tokens, logprobs) -> np.ndarray:
    """Sum of log-probs up to and including each row's first EOS: float32[B]."""
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    before_eos = np.cumsum(tokens == EOS_ID, axis=1) - (tokens == EOS_ID) == 0
    return np.sum(np.where(before_eos, logprobs, 0.0), axis=1)


# --- beam search -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _beam_jitted(config: PaliGemmaConfig, cache_size: int, cache_dtype: str, width: int,
                 form: type):  # fmt: skip
    """Prefill/step that return each beam's top ``width`` log-probs (not all V of them).

    ``mask`` (bool[V], the user's logit_mask, all True by default) and a
    constraint (``tables`` and the beams' states int32[B*n, 2], else None) remove
    disallowed tokens from the candidates (they come back as -inf; the log-probs
    kept are the unmasked model's); a beam's automaton state follows its parent
    like its cache.
    """
    module = PaliGemma(config)
    dtype = jnp.dtype(cache_dtype)

    def top(logits, mask, t, tables, cstate):
        logp = jnp.where(mask, jax.nn.log_softmax(logits, axis=-1), -jnp.inf)
        if tables is not None:
            allowed = constrain.allowed_tokens(tables, cstate, t, logits.shape[-1])
            logp = jnp.where(allowed, logp, -jnp.inf)
        return jax.lax.top_k(logp, width)

    def prefill(params, images, text, mask_input, mask, tables=None, cstate=None):
        logits, cache, valid, pos = module.apply(
            {"params": params}, images, text, mask_input, cache_size, dtype, form,
            method=PaliGemma.prefill,
        )  # fmt: skip
        return top(logits, mask, jnp.int32(0), tables, cstate), cache, valid, pos

    def step(params, tok, cache, valid, pos, slot, parents, mask, tables=None, cstate=None,
             t=None):  # fmt: skip
        # Reorder the cache so each beam continues from its parent, then extend by one token.
        cache = cache.take(parents)
        valid, pos = jnp.take(valid, parents, axis=0), jnp.take(pos, parents, axis=0)
        logits, cache, valid = module.apply(
            {"params": params}, tok, cache, valid, pos, slot, method=PaliGemma.decode_step
        )
        if tables is not None:
            cstate = constrain.advance(tables, constrain.reorder(cstate, parents), tok)
        return top(logits, mask, t, tables, cstate), cache, valid, pos + 1, cstate

    return (
        count_traces(jax.jit(prefill), "beam"),
        count_traces(jax.jit(step, donate_argnums=(2,)), "beam"),
    )


def beam_search(
    config, params, images, text, mask_input, *, beam_size: int, max_new_tokens: int,
    cache_dtype=None, logit_mask=None, constraint=None,
):  # fmt: skip
    """Standard beam search on summed log-probs (no length penalty).

    Each step ranks every (beam, next token) candidate. Candidates ending in
    EOS that rank among the top ``beam_size`` become finished hypotheses (the
    best one per row is kept); the best ``beam_size`` non-EOS candidates stay
    live. The search stops once no live beam scores above the best finished
    one (scores only fall), or at ``max_new_tokens``. With ``beam_size=1``
    this is exactly greedy decoding.

    (big_vision's ``beam_decode`` also treats every live beam as finished at
    every step, which favours short answers and makes beam(1) differ from
    greedy; the kit uses the standard rule.)

    ``logit_mask`` (bool[V]) restricts every step to the allowed tokens (a
    constrained search); ``constraint`` (a ``constrain.Constraint``) expands only
    the tokens its automaton allows. The log-probs returned are the unmasked model's.

    Returns ``(tokens int32[B, max_new_tokens], logprobs float32[B, max_new_tokens])``.
    """
    text, mask_input = np.asarray(text, np.int32), np.asarray(mask_input, bool)
    b, t = text.shape
    n = beam_size
    tt = bucket_length(t)
    n_img = config.vision.num_tokens * (images.shape[1] if np.ndim(images) == 5 else 1)
    cache_size = bucket_cache(n_img, tt, max_new_tokens)
    cache_dt = jnp.dtype(cache_dtype or jnp.float32).name
    width = min(2 * n, config.llm.vocab_size)  # candidates kept per beam and step
    prefill, step = _beam_jitted(config, cache_size, cache_dt, width, cache_form(params))
    # Always a mask (all True by default): one compiled search serves masked and free calls.
    v = config.llm.vocab_size
    mask = jnp.ones(v, bool) if logit_mask is None else jnp.asarray(logit_mask, bool)

    # Every row is repeated n times; beam j of row i lives in row i * n + j.
    rep = lambda x: np.repeat(np.asarray(x), n, axis=0)
    text = np.pad(rep(text), ((0, 0), (0, tt - t)))
    mask_input = np.pad(rep(mask_input), ((0, 0), (0, tt - t)))
    extra = ()
    if constraint is not None:
        tables = constraint.tables(max_new_tokens)
        cstate = constraint.initial_state(np.repeat(np.arange(b), n), batch=b)
        extra = (tables, cstate)
    (top_lp, top_tok), cache, valid, pos = prefill(
        params, rep(images), text, mask_input, mask, *extra
    )

    seqs = np.zeros((b, n, max_new_tokens), np.int32)
    seq_lp = np.zeros((b, n, max_new_tokens), np.float32)
    live = np.full((b, n), -np.inf)
    live[:, 0] = 0.0  # at the start the n copies are one beam
    best = np.zeros((b, max_new_tokens), np.int32)
    best_lp = np.zeros((b, max_new_tokens), np.float32)
    best_score = np.full((b,), -np.inf)

    for i in range(max_new_tokens):
        lp = np.asarray(top_lp, np.float64).reshape(b, n, width)
        tok = np.asarray(top_tok).reshape(b, n, width)
        cand = (live[:, :, None] + lp).reshape(b, -1)
        order = np.argsort(-cand, axis=1, kind="stable")
        new_live = np.full((b, n), -np.inf)
        parent = np.zeros((b, n), np.int64)
        new_tok = np.zeros((b, n), np.int32)
        new_lp = np.zeros((b, n), np.float32)
        for r in range(b):
            k = 0
            for rank, c in enumerate(order[r]):
                if k == n or not np.isfinite(cand[r, c]):
                    break
                j, w = divmod(int(c), width)
                if tok[r, j, w] != EOS_ID:  # stays live
                    new_live[r, k], parent[r, k] = cand[r, c], j
                    new_tok[r, k], new_lp[r, k] = tok[r, j, w], lp[r, j, w]
                    k += 1
                elif rank < n and cand[r, c] > best_score[r]:  # a finished hypothesis
                    best_score[r] = cand[r, c]
                    best[r], best_lp[r] = seqs[r, j], seq_lp[r, j]
                    best[r, i], best_lp[r, i] = EOS_ID, lp[r, j, w]
        seqs = np.take_along_axis(seqs, parent[:, :, None], axis=1)
        seq_lp = np.take_along_axis(seq_lp, parent[:, :, None], axis=1)
        seqs[:, :, i], seq_lp[:, :, i] = new_tok, new_lp
        live = new_live
        if i + 1 == max_new_tokens or np.all(best_score >= live.max(axis=1)):
            break
        parents = (np.arange(b)[:, None] * n + parent).reshape(-1)
        (top_lp, top_tok), cache, valid, pos, cstate = step(
            params, jnp.asarray(new_tok.reshape(-1)), cache, valid, pos,
            jnp.int32(n_img + tt + i), jnp.asarray(parents, jnp.int32), mask,
            *(extra and (tables, cstate, jnp.int32(i + 1))),
        )  # fmt: skip
        extra = extra and (tables, cstate)
    # Rows that never finished return their best live beam.
    open_rows = live.max(axis=1) > best_score
    j = np.argmax(live, axis=1)
    best[open_rows], best_lp[open_rows] = (
        seqs[open_rows, j[open_rows]],
        seq_lp[open_rows, j[open_rows]],
    )
    return best, best_lp
