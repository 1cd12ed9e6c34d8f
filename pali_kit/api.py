"""The friendly handle: ``pk.load(...)`` returns a :class:`Model`.

    import pali_kit as pk
    model = pk.load("demo")                       # the embedded demo model, offline
    [out] = model.generate("data/images/shapes_0.png", "caption en")
    out.text, out.tokens, out.logprobs

    for piece in model.stream(image, "describe en"):   # text as it is produced
        print(piece, end="")

A Model holds ``config`` (frozen dataclass), ``params`` (the official nested
tree) and ``tokenizer``; all math lives in ``pali_kit.model`` and
``pali_kit.decode`` as pure functions of those.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints, decode, quant
from . import weights_cache as _weights_cache
from .assets import asset_dir
from .configs import (
    CHECKPOINTS,
    PaliGemmaConfig,
    checkpoint_info,
    paligemma_config,
    registry_semantics,
)
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    CheckpointError,
    MissingFileError,
    NoTokenizerError,
    PromptTooLongError,
    check_bool,
    check_float_dtype,
    check_int,
    check_keywords,
    short_repr,
)
from .images import preprocess
from .model import PaliGemma, accel, count_params, inference_params, init_params, param_shapes
from .model.cpu import IN_PLACE_LEAVES, abstract_layout, limit_heap_arenas, official_params
from .tokenizer import Tokenizer, find_tokenizer


@dataclass
class Generation:
    """One generated answer."""

    prompt: str
    text: str  # decoded up to the first EOS; <loc>/<seg> tokens kept as text
    tokens: np.ndarray = field(repr=False)  # int32[n] up to and including EOS
    logprobs: np.ndarray = field(repr=False)  # float32[n]

    @property
    def score(self) -> float:
        """Sum of the token log-probabilities."""
        return float(np.sum(self.logprobs))


@functools.lru_cache(maxsize=16)
def _embed_fn(config):
    return jax.jit(lambda p, x: PaliGemma(config).apply({"params": p}, x, method="embed_image"))


@functools.lru_cache(maxsize=16)
def _logits_fn(config):
    return jax.jit(lambda p, *a: PaliGemma(config).apply({"params": p}, *a))


class Model:
    """A loaded PaliGemma: config + params + tokenizer, with inference methods."""

    def __init__(self, params, config: PaliGemmaConfig, tokenizer: Tokenizer | None = None,
                 name: str | None = None, text_len: int | None = None):  # fmt: skip
        self.params = params  # the official stacked tree (a property: see below)
        self.config = config
        self.tokenizer = tokenizer
        self.name = name or f"{config.family} ({config.llm.variant})"
        self.text_len = text_len  # the prompt budget the checkpoint was trained with, if known

    @property
    def params(self):
        """The weights: the official big_vision tree, layers stacked.

        With half-precision weights on CPU, a model that owns its arrays (from
        ``pk.load`` or ``astype``) keeps the LLM matrices only in the CPU
        inference layout (see ``run_params``); this tree is then rebuilt from it
        on each access (a transient copy of those matrices: keep it only as long
        as needed, e.g. for saving or training). ``pk.load`` reads a bfloat16 or
        float16 .npz straight into that layout; otherwise taking this tree before
        the first inference keeps the arrays as they are (the layout then copies).
        """
        if self._run is not None and self._run_replaced:
            if accel.on_accelerators(self._run):
                return accel.official(self._run, self._params)
            return official_params(self._run, self._params)
        self._owns_params = False  # the caller now holds these arrays: never write over them
        return self._params

    @params.setter
    def params(self, value):
        self._params = value
        self._run = None
        self._run_replaced = False
        self._owns_params = False  # a caller's tree: never written over
        self._run_shapes = None  # the run tree's shapes its first prefill was compiled for
        self._compiled_ahead = None  # that compile's Future (pk.load)

    @property
    def run_params(self):
        """The same weights as handed to compiled inference code: on CPU the CPU
        layout (``pali_kit.model.cpu``: per-layer views of the same memory; for
        half-precision weights (out, in) blocks, written over the official arrays'
        memory when the model owns them); on one GPU/TPU one array per layer
        (``pali_kit.model.accel``: the stacks are split once, and freed when the
        model owns them); otherwise the official tree."""
        if self._run is None:
            on_accelerator = accel.on_accelerators(self._params)
            self._run = inference_params(self._params, in_place=self._owns_params)
            self._check_compiled_ahead()
            if not self._owns_params:
                skeleton = None
            elif on_accelerator:  # the stacks were freed once split
                skeleton = accel.skeleton(self._params)
            else:
                skeleton = _without_replaced(self._params, self._run)
            if skeleton is not None:  # the official arrays are gone or hold the blocks
                self._params, self._run_replaced = skeleton, True
        return self._run

    def _check_compiled_ahead(self) -> None:
        """Once the run tree exists: warn if it is not what ``pk.load`` compiled ahead for."""
        if self._run_shapes is not None:
            _check_run_shapes(self._run, self._run_shapes)
            self._run_shapes = None

    # --- facts -------------------------------------------------------------------------
    @property
    def dtype(self):
        """The float dtype of the weights (for a quantized model: the dtype its QArrays stand for)."""
        return _leaves(self._params)[0].dtype

    @property
    def quantization(self) -> str | None:
        """The quantization scheme ("int8", "int4") of the large matrices, or None."""
        return quant.scheme_of(self._params)

    def quantize(self, scheme: str = "int8") -> Model:
        """A copy with every large matrix quantized ("int8" per channel, "int4" in groups of 64).

        ``model.params`` then holds ``pali_kit.quant.QArray`` leaves; see ``pali_kit.quant``.
        """
        if quant.check_scheme(scheme) is None:
            raise ValueError("model.quantize(None): pass 'int8' or 'int4'")
        if self.quantization is not None:
            raise ValueError(
                f"this model is already quantized ({self.quantization}): load it again "
                f"with pk.load(..., quantize={scheme!r}) to change the scheme"
            )
        params = quant.quantize_params(self.params, scheme)
        return Model(params, self.config, self.tokenizer, self.name, self.text_len)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def num_params(self) -> int:
        if self._run_replaced:  # without rebuilding the official tree
            return count_params(param_shapes(self.config))
        return int(sum(np.prod(a.shape) for a in _leaves(self._params)))

    def summary(self) -> str:
        dtype = jnp.dtype(self.dtype).name
        if self.quantization:
            size = quant.tree_nbytes(self.params)
            size = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
            dtype = f"{self.quantization} + {dtype} ({size})"
        return (f"{self.name} | {self.num_params():,} params | {dtype} "
                f"| {self.resolution} px | {self.config.vision.num_tokens} image tokens")  # fmt: skip

    def __repr__(self):
        return f"<pali_kit.Model {self.summary()}>"

    def astype(self, dtype) -> Model:
        """A copy with every parameter cast (e.g. to bfloat16 for faster CPU inference)."""
        dt = _check_weight_dtype(dtype, "Model.astype", allow_none=False)

        def cast(a):  # a QArray keeps its integers and now stands for ``dt``
            if isinstance(a, quant.QArray):
                return quant.QArray(*a.children(), a.scheme, a.in_axes, a.in_shape, dt)
            return a.astype(dt)

        params = jax.tree.map(cast, self.params, is_leaf=quant.is_quantized)
        return _owning(Model(params, self.config, self.tokenizer, self.name, self.text_len))

    # --- numerics ---------------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        """Any image input -> float32[B, R, R, 3] in [-1, 1] at this model's resolution.

        The same as ``pk.preprocess(images, model.resolution)``, with the kit's one
        rule for float arrays (``pk.images.float_range``): values in [-1, 1] with
        a negative value are model input (so this function's output can be passed
        back in), otherwise floats are an image in [0, 1]; other values raise.
        """
        return preprocess(images, self.resolution)

    def embed_image(self, images) -> jax.Array:
        """Images -> image tokens float32[B, N, W] (not scaled), the LLM's prefix."""
        return _embed_fn(self.config)(self.run_params, self.preprocess(images))

    def logits(self, images, text, mask_ar, mask_input=None) -> jax.Array:
        """Text logits float32[B, T, V] of one full prefix-LM forward pass.

        images: any image input (see ``preprocess``), B images, e.g. float[B, R, R, 3]
        in [-1, 1]; text: int[B, T] token ids in [0, V); mask_ar: int or bool [B, T]
        (0 = prefix, full attention; 1 = causal); mask_input: bool[B, T] real tokens
        (default: all True).
        """
        where = "Model.logits"
        pixels = self.preprocess(images)
        text = _check_tokens(text, "text", self.config.llm.vocab_size, where)
        mask_ar = _check_mask(mask_ar, "mask_ar", text.shape, where)
        mask_input = (
            np.ones(text.shape, bool)
            if mask_input is None
            else _check_mask(mask_input, "mask_input", text.shape, where)
        )
        _check_batch(pixels, text.shape[0], where)
        return _logits_fn(self.config)(
            self.run_params, pixels, jnp.asarray(text), jnp.asarray(mask_ar),
            jnp.asarray(mask_input, bool),
        )  # fmt: skip

    def generate_tokens(self, images, text, mask_input, *, max_new_tokens: int,
                        sampler="greedy", seed: int = 0, cache_dtype=None, logit_mask=None,
                        best_of: int = 1, constraint=None, **kw):  # fmt: skip
        """Token-level generation: (tokens int32[B, N], logprobs float32[B, N]), N = max_new_tokens.

        images: B images (any input ``preprocess`` takes); text: int[B, T]
        right-padded prompt token ids in [0, V); mask_input: bool[B, T], True on
        real tokens, at least one per row; every prompt token is prefix. Tokens
        after EOS are padding (0). The keywords are those of :meth:`generate`
        (sampler strings listed there) except ``text_len``, plus ``constraint``
        (a ``pk.constrain.Constraint`` with one start state per row).
        """
        where = "Model.generate_tokens"
        check_keywords(where, kw, (_GENERATE_KEYWORDS - {"text_len"}) | {"constraint"})
        decode.check_generate_args(
            self.config, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
            best_of=best_of, cache_dtype=cache_dtype, logit_mask=logit_mask, where=where,
        )  # fmt: skip
        pixels = self.preprocess(images)
        text = _check_tokens(text, "text", self.config.llm.vocab_size, where)
        mask_input = _check_mask(mask_input, "mask_input", text.shape, where, need_one=True)
        _check_batch(pixels, text.shape[0], where)
        return decode.generate_tokens(
            self.config, self.run_params, pixels, text, mask_input,
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, cache_dtype=cache_dtype,
            logit_mask=logit_mask, best_of=best_of, constraint=constraint,
        )  # fmt: skip

    # --- text in, text out ---------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise NoTokenizerError(
                "this model has no tokenizer: pass tokenizer='path/to/paligemma_tokenizer.model' "
                "to pk.load, or set model.tokenizer = pk.Tokenizer(path)"
            )
        return self.tokenizer

    def _encode(self, images, prompts, text_len, where):
        """-> pixels float32[B, R, R, 3], prompts list[str] (B), {text, mask_input} [B, T]."""
        tok = self._need_tokenizer()
        prompts = _check_prompts(prompts, where)
        if text_len is not None:
            text_len = check_int(text_len, "text_len", where, low=1,
                                 fix="the prompt budget in tokens, or None for the model's")  # fmt: skip
        else:
            text_len = self.text_len
        pixels = self.preprocess(images)
        if pixels.shape[0] == 1 and len(prompts) > 1:
            pixels = np.repeat(np.asarray(pixels), len(prompts), axis=0)
        elif len(prompts) == 1 and pixels.shape[0] > 1:
            prompts = prompts * pixels.shape[0]
        if pixels.shape[0] != len(prompts):
            raise ArgumentError(
                f"{where}: {pixels.shape[0]} images but {len(prompts)} prompts: pass one "
                "image per prompt, one image for all prompts, or one prompt for all images"
            )
        enc = tok.encode_prompts(prompts, text_len=None, bucket=None)
        lengths = enc["mask_input"].sum(axis=1)
        if text_len is not None:
            _check_prompt_lengths(lengths, text_len, self.text_len, where)
            pad = ((0, 0), (0, text_len - enc["text"].shape[1]))
            enc = {"text": np.pad(enc["text"], pad), "mask_input": np.pad(enc["mask_input"], pad)}
        return pixels, prompts, enc

    def generate(self, images, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                 sampler="greedy", seed: int = 0, text_len: int | None = None,
                 cache_dtype=None, logit_mask=None, best_of: int = 1,
                 **kw) -> list[Generation]:  # fmt: skip
        """Answer prompts about images; one :class:`Generation` per prompt.

        images: one image or a list (paths, bytes, PIL, arrays; see ``pk.preprocess``
          and its float rule); one image with several prompts (or one prompt with
          several images) is broadcast.
        prompts: a string or a list of strings, e.g. ``"caption en"``, ``"detect cat"``.
        max_new_tokens: int in [1, 65536], the most tokens generated per prompt.
        sampler: ``"greedy"`` (default) | ``"temperature(t)"`` (t > 0) |
          ``"nucleus(p)"`` / ``"nucleus(p, t)"`` (0 < p <= 1) | ``"top_k(k)"`` /
          ``"top_k(k, t)"`` (1 <= k <= vocabulary) | ``"beam(n)"`` (1 <= n <=
          vocabulary); see ``pali_kit.decode.parse_sampler``.
        seed: int, the random key of the sampling samplers (greedy and beam are
          deterministic and do not use it).
        text_len: int, the prompt budget in tokens (default: the checkpoint's, e.g.
          32 for the demo). A longer prompt raises ``PromptTooLongError``; prompts
          are never cut.
        cache_dtype: the KV cache's float dtype (float32 default, bfloat16, float16).
        logit_mask: bool[V], True where a token may be generated; honoured by every
          sampler, beam search included. Log-probs are the unmasked model's.
        best_of: int >= 1; sample every prompt n times and keep the likeliest
          answer (sampling samplers only).

        Any other keyword, or a value outside these ranges, raises one of the kit's
        errors (``pk.ArgumentError``, ``pk.ArgumentTypeError``, ``pk.SamplerError``)
        naming it.
        """
        where = "Model.generate"
        check_keywords(where, kw, _GENERATE_KEYWORDS)
        decode.check_generate_args(
            self.config, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
            best_of=best_of, cache_dtype=cache_dtype, logit_mask=logit_mask, where=where,
        )  # fmt: skip
        pixels, prompts, enc = self._encode(images, prompts, text_len, where)
        tokens, logprobs = decode.generate_tokens(
            self.config, self.run_params, pixels, enc["text"], enc["mask_input"],
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, cache_dtype=cache_dtype,
            logit_mask=logit_mask, best_of=best_of,
        )  # fmt: skip
        return [self._result(p, t, lp) for p, t, lp in zip(prompts, tokens, logprobs)]

    def _result(self, prompt, tokens, logprobs) -> Generation:
        n = _length_with_eos(tokens)
        text = self.tokenizer.decode(tokens[:n].tolist())
        return Generation(prompt, text, tokens[:n].copy(), logprobs[:n].copy())

    def stream(self, image, prompt: str, *, max_new_tokens: int = 64, sampler="greedy",
               seed: int = 0, text_len: int | None = None, cache_dtype=None, logit_mask=None,
               **kw) -> Iterator[str]:  # fmt: skip
        """Yield the answer's text in pieces as tokens are produced (one image, one prompt).

        The keywords are those of :meth:`generate`, except ``best_of`` and
        ``beam(n)`` (they need whole answers: use generate). Arguments are checked
        when ``stream`` is called, before the first piece.
        """
        where = "Model.stream"
        check_keywords(where, kw, _GENERATE_KEYWORDS - {"best_of"})
        sampler, *_ = decode.check_generate_args(
            self.config, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
            cache_dtype=cache_dtype, logit_mask=logit_mask, where=where,
        )  # fmt: skip
        if sampler.name == "beam":
            raise decode.SamplerError(
                f"{where}: sampler={str(sampler)!r}: beam search ranks whole answers, so it "
                "cannot stream; use model.generate(..., sampler='beam(n)')"
            )
        if not isinstance(prompt, str):
            raise ArgumentTypeError(
                f"{where}: prompt={short_repr(prompt)} must be one string; for several prompts "
                "use model.generate(image, [prompt, ...])"
            )
        pixels, _, enc = self._encode(image, [prompt], text_len, where)
        if pixels.shape[0] != 1:
            raise ArgumentError(
                f"{where}: got {pixels.shape[0]} images; stream answers about one image: pass "
                "one, or use model.generate(images, prompt) for several"
            )
        return self._stream(pixels, enc, max_new_tokens, sampler, seed, cache_dtype, logit_mask)

    def _stream(self, pixels, enc, max_new_tokens, sampler, seed, cache_dtype, logit_mask):
        steps = decode.iter_tokens(
            self.config, self.run_params, pixels, enc["text"], enc["mask_input"],
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, cache_dtype=cache_dtype,
            logit_mask=logit_mask,
        )  # fmt: skip
        tokens: list[int] = []
        shown = ""
        for tok, _ in steps:
            t = int(tok[0])
            if t in (decode.EOS_ID, decode.PAD_ID):
                break
            tokens.append(t)
            text = self.tokenizer.decode(tokens)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if text.startswith(shown):
                piece, shown = text[len(shown) :], text
                if piece:
                    yield piece
        text = self.tokenizer.decode(tokens)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]

    # --- detection and segmentation -------------------------------------------------------------
    def detect(self, images, labels, *, sampler="greedy", seed: int = 0,
               max_objects: int | None = None, constrained: bool = True,
               keep_duplicates: bool = False, **kw) -> list[list]:  # fmt: skip
        """Find ``labels`` in ``images``: one list of objects per image (always a list of lists).

        images: one image or a list (paths, bytes, PIL, arrays); labels: one list
        of names for every image, or one list per image. Each object (a
        ``pk.detection.Detection``) has ``.label`` (a requested one), ``.box``
        (x0, y0, x1, y1 in pixels of the original image) and ``.score`` in [0, 1]
        (the model's probability of this object, docs/detection_scores.md).
        ``constrained=True`` decodes only answers that parse with requested
        labels (any sampler, beam included); ``False`` parses the raw answer.
        ``max_objects`` caps objects per image; same-label boxes with IoU > 0.7
        are dropped after decoding (the higher score stays) unless
        ``keep_duplicates``. Keywords: ``max_new_tokens``, ``window``.
        """
        from . import tasks

        return tasks.run(self, images, labels, task="detect", sampler=sampler, seed=seed,
                         max_objects=max_objects, constrained=constrained,
                         keep_duplicates=keep_duplicates, **kw)  # fmt: skip

    def segment(self, images, labels, *, vae=None, sampler="greedy", seed: int = 0,
                max_objects: int | None = None, constrained: bool = True,
                keep_duplicates: bool = False, **kw) -> list[list]:  # fmt: skip
        """As ``detect``, and each object has ``.mask``: bool [H, W] at the original image size.

        vae: the mask VQ-VAE: a path to ``vae-oid.npz``, a ``pk.load_vae(...)``
        result or "demo"; the demo model finds its own (None).
        """
        from . import tasks

        return tasks.run(self, images, labels, task="segment", vae=vae, sampler=sampler,
                         seed=seed, max_objects=max_objects, constrained=constrained,
                         keep_duplicates=keep_duplicates, **kw)  # fmt: skip


# --- argument checks (the public methods call these first) -----------------------------------

_GENERATE_KEYWORDS = frozenset(
    {"max_new_tokens", "sampler", "seed", "text_len", "cache_dtype", "logit_mask", "best_of"}
)


def _check_prompts(prompts, where: str) -> list[str]:
    """A string or a non-empty sequence of strings -> list[str]."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ArgumentTypeError(
                    f"{where}: prompts[{i}]={short_repr(p)} is a {type(p).__name__}, not a string"
                )
        return list(prompts)
    if isinstance(prompts, (list, tuple)):
        raise ArgumentError(f"{where}: prompts=[] is empty: pass a string or a list of strings")
    raise ArgumentTypeError(
        f"{where}: prompts={short_repr(prompts)} must be a string or a list of strings, "
        f"not a {type(prompts).__name__}"
    )


def _check_prompt_lengths(lengths, text_len: int, trained: int | None, where: str) -> None:
    """Prompts are never cut: one longer than ``text_len`` tokens is an error."""
    long = np.flatnonzero(np.asarray(lengths) > text_len)
    if long.size == 0:
        return
    i, n = int(long[0]), int(lengths[long[0]])
    note = f" (the length this model was trained with is {trained})" if trained else ""
    raise PromptTooLongError(
        f"{where}: prompts[{i}] is {n} tokens (BOS + prompt + '\\n') but text_len={text_len}"
        f"{note}; prompts are never cut: shorten it, or pass text_len={n} or more to allow "
        "longer prompts (beyond the trained length answers may get worse)"
    )


def _check_tokens(text, name: str, vocab: int, where: str) -> np.ndarray:
    """int[B, T] token ids in [0, vocab), B, T >= 1 -> numpy int32."""
    try:
        ids = np.asarray(text)
    except Exception:
        ids = np.asarray(None, object)
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ArgumentTypeError(
            f"{where}: {name}={short_repr(text)} must be an int array [B, T] of token ids "
            "(e.g. model.tokenizer.encode_prompts(prompts)['text'])"
        )
    if ids.ndim != 2 or 0 in ids.shape:
        raise ArgumentError(
            f"{where}: {name} has shape {ids.shape}, expected [B, T] with B, T >= 1 "
            "(one row of token ids per prompt; add a batch axis with text[None])"
        )
    if ids.min() < 0 or ids.max() >= vocab:
        raise ArgumentError(
            f"{where}: {name} holds token ids in [{ids.min()}, {ids.max()}], but this model's "
            f"vocabulary is [0, {vocab}): encode with this model's tokenizer"
        )
    return ids.astype(np.int32)


def _check_mask(mask, name: str, shape, where: str, need_one: bool = False) -> np.ndarray:
    """bool or 0/1 int [B, T] of ``shape`` -> numpy (same dtype kind)."""
    try:
        m = np.asarray(mask)
    except Exception:
        m = np.asarray(None, object)
    if not (
        m.dtype == np.bool_ or (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all())
    ):
        raise ArgumentTypeError(
            f"{where}: {name}={short_repr(mask)} must be a bool (or 0/1 int) array of shape {shape}"
        )
    if m.shape != tuple(shape):
        raise ArgumentError(
            f"{where}: {name} has shape {m.shape} but text has shape {tuple(shape)}: they "
            "must match (one entry per token)"
        )
    if need_one and not m.any(axis=1).all():
        row = int(np.flatnonzero(~m.any(axis=1))[0])
        raise ArgumentError(
            f"{where}: {name}[{row}] is all False: every prompt needs at least one real token"
        )
    return m


def _check_batch(pixels, b: int, where: str) -> None:
    if pixels.shape[0] != b:
        raise ArgumentError(
            f"{where}: {pixels.shape[0]} images but {b} rows of text: pass one image per row"
        )


def _check_load_args(source, dtype, verbose, where: str = "pk.load"):
    """-> dtype as checkpoints.as_dtype gives it."""
    if not isinstance(source, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{where}: source={short_repr(source)} must be 'demo', a checkpoint name (see "
            "pk.CHECKPOINTS), a .npz path or a transformers folder, not a "
            f"{type(source).__name__}"
        )
    check_bool(verbose, "verbose", where)
    return _check_weight_dtype(dtype, where)


def _check_weight_dtype(dtype, where: str, allow_none: bool = True):
    """float32 / bfloat16 / float16 (names, aliases such as "bf16", dtypes) -> numpy dtype."""
    if isinstance(dtype, str):
        try:
            return checkpoints.as_dtype(dtype)
        except ValueError:
            raise ArgumentError(
                f"{where}: dtype={dtype!r} is not a weight dtype: use float32, bfloat16 or "
                "float16" + (" (or None to keep the stored one)" if allow_none else "")
            ) from None
    if dtype is None and not allow_none:
        raise ArgumentTypeError(f"{where}: dtype=None: use float32, bfloat16 or float16")
    return check_float_dtype(dtype, "dtype", where)


def _with_overrides(config: PaliGemmaConfig, overrides: dict, where: str) -> PaliGemmaConfig:
    """config.replace(**overrides), each value checked against the field's type."""
    if not overrides:
        return config
    try:
        new = config.replace(**overrides)
    except TypeError as e:
        raise ArgumentTypeError(f"{where}: {e}") from None
    for part in ("vision", "llm"):
        old_part, new_part = getattr(config, part), getattr(new, part)
        for f in dataclasses.fields(old_part):
            old, value = getattr(old_part, f.name), getattr(new_part, f.name)
            if value is old or value == old:
                continue
            kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
            want = kinds.get(type(old))
            bad = want and (
                not isinstance(value, want) or (bool not in want and isinstance(value, bool))
            )
            if bad or (isinstance(value, (int, float)) and not isinstance(value, bool)
                       and not np.isfinite(value)):  # fmt: skip
                raise ArgumentTypeError(
                    f"{where}: override {f.name}={short_repr(value)} must be a finite "
                    f"{type(old).__name__}, like the current value {old!r}"
                )
    return new


def _check_overrides_fit(params, config, overrides: dict, where: str, what: str) -> None:
    """Overrides may change what the weights' shapes do not decide, nothing else."""
    if not overrides:
        return
    try:
        checkpoints.check_params(params, config, what)
    except CheckpointError as e:
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise CheckpointError(
            f"{where} with {given}: the overrides do not fit the weights: {e}. Overrides may only "
            "change what the weights' shapes do not fix (e.g. final_logits_softcap); remove them"
        ) from None


def _leaves(params):
    """Parameter leaves, a QArray counting as one leaf."""
    return jax.tree.leaves(params, is_leaf=quant.is_quantized)


def _owning(model: Model) -> Model:
    """Mark a model whose arrays nobody else holds (made by pk.load / astype): its CPU
    layout may then reuse their memory instead of copying (see Model.run_params)."""
    model._owns_params = True
    return model


def _without_replaced(official, run):
    """``official`` with the LLM matrices that ``run`` holds as (out, in) blocks set
    to None (in place: their memory now holds the blocks), or None if there are none."""
    linear = run["llm"]["layers"]["mlp"]["linear"]
    if not (isinstance(linear, tuple) and getattr(linear[0], "transposed", False)):
        return None
    llm = dict(official["llm"])
    layers = llm["layers"] = dict(llm["layers"])
    for path in IN_PLACE_LEAVES:
        node = layers
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[path[-1]] = None
    return {**official, "llm": llm}


def _check_run_shapes(run, shapes) -> None:
    """Warn if the run tree is not what its first generation was compiled for ahead."""
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), run)
    same = jax.tree.structure(like) == jax.tree.structure(shapes) and (
        jax.tree.leaves(like) == jax.tree.leaves(shapes)
    )
    if not same:
        warnings.warn(
            "pali_kit: the weights' inference layout differs from the one predicted from the "
            "checkpoint (pali_kit.model.cpu.abstract_layout), so the first generation is "
            "compiled again; this is a bug in pali_kit, please report it",
            RuntimeWarning,
            stacklevel=3,
        )


def _length_with_eos(tokens) -> int:
    hits = np.flatnonzero(np.asarray(tokens) == decode.EOS_ID)
    if hits.size:
        return int(hits[0]) + 1
    nonpad = np.flatnonzero(np.asarray(tokens) != decode.PAD_ID)
    return int(nonpad[-1]) + 1 if nonpad.size else 0


# --- loading -------------------------------------------------------------------------------

_CACHE_ENABLED = False
CACHE_MIN_COMPILE_S = 0.1  # compiles at least this long are kept in the persistent cache


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Turn on JAX's persistent compilation cache (opt out with PALI_KIT_COMPILATION_CACHE=0)."""
    global _CACHE_ENABLED
    if _CACHE_ENABLED or os.environ.get("PALI_KIT_COMPILATION_CACHE", "1") == "0":
        return
    if jax.config.jax_compilation_cache_dir is None:
        default = (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pali_kit" / "jax"
        )
        jax.config.update("jax_compilation_cache_dir", str(path or default))
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        # Generation also compiles a sampler (~0.7 s at a 257k vocabulary) and small
        # helpers; below JAX's default of 1 s they would be compiled again in every process.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    _CACHE_ENABLED = True


DEMO_FILE = "demo_model.npz"


def resolve_checkpoint(source, where: str | None = None):
    """A checkpoint name or a path -> ``(path, CheckpointInfo or None)``.

    A name from ``pk.CHECKPOINTS`` (or any ``paligemma-``/``paligemma2-`` name that
    is not a file here) is downloaded through ``pali_kit.hub`` and comes with its
    registry entry; anything else must be an existing file or folder.
    ``where`` prefixes the error (e.g. ``"--model"``).
    """
    if (
        isinstance(source, str)
        and not Path(source).exists()
        and (source in CHECKPOINTS or source.startswith(("paligemma-", "paligemma2-")))
    ):
        from . import hub

        info = checkpoint_info(source)
        return Path(hub.download(info)), info
    path = Path(source)
    if not path.exists():
        raise MissingFileError(
            f"{where + ' ' if where else ''}{source}: no such file or folder, and not a checkpoint "
            "name (see pk.CHECKPOINTS for names such as 'paligemma2-3b-pt-224')"
        )
    return path, None


def _demo(dtype, overrides, quantize=None):
    path = asset_dir() / DEMO_FILE
    tok = Tokenizer.demo()
    if path.exists():
        params = checkpoints.load_params(path, dtype, quantize=quantize)
        config = _with_overrides(checkpoints.infer_config(params, str(path)), overrides, "pk.load")
        _check_overrides_fit(params, config, overrides, "pk.load('demo')", str(path))
        return _owning(Model(params, config, tok, name="pali_kit demo", text_len=32))
    warnings.warn(
        f"{path} does not exist yet: using a small RANDOM model with the demo tokenizer "
        "(its answers are noise)",
        stacklevel=3,
    )
    config = _with_overrides(demo_config(), overrides, "pk.load")
    params = init_params(config, 0, dtype)
    params = quant.quantize_params(params, quantize) if quantize else params
    return _owning(Model(params, config, tok, name="random demo-size model", text_len=32))


def demo_config(vocab_size: int = 2176) -> PaliGemmaConfig:
    """The demo model's architecture: a tiny PaliGemma 2 (64 px, patch 8 -> 64 image tokens)."""
    return paligemma_config("gemma2_2b", 224).replace(
        img_width=128, img_depth=2, img_mlp_dim=512, img_num_heads=4, patch_size=8,
        image_size=64, llm_width=128, llm_depth=3, llm_mlp_dim=512, llm_num_heads=4,
        num_kv_heads=2, llm_head_dim=32, vocab_size=vocab_size,
    )  # fmt: skip


def load(source, *, dtype=None, quantize=None, tokenizer=None, verbose: bool = True,
         weights_cache=None, **overrides) -> Model:  # fmt: skip
    """Load a PaliGemma from anywhere.

    source: ``"demo"`` (the embedded model, offline) | a name from ``pk.CHECKPOINTS``
    (downloaded with kagglehub) | a big_vision ``.npz`` | a transformers folder.
    dtype: cast the weights while loading (``"bfloat16"``, ``"float32"``, ...).
    quantize: ``"int8"`` | ``"int4"``: weight-only quantization of every large matrix
      (``pali_kit.quant``), done while a ``.npz`` streams in, so memory peaks near the
      quantized size (a transformers folder is loaded, then quantized).
    tokenizer: a path or Tokenizer; by default one found beside the checkpoint.
    weights_cache: keep a copy of the weights in the CPU inference layout on disk, so
      that later processes map it (page cache, no new memory) instead of reading the
      ``.npz`` (``pali_kit.weights_cache``); it costs a second copy of the weights on
      disk (5.85 GB for a 3B bfloat16 checkpoint), written by the first load on a
      background thread (the process waits for it before exiting). True: in
      ``$XDG_CACHE_HOME/pali_kit/weights`` (``~/.cache/pali_kit/weights``); a path:
      in that folder; False: off; None (default): the ``PALI_KIT_WEIGHTS_CACHE``
      variable decides (``0``: off, ``1``: the default folder, else a folder); unset,
      the default folder, written only where it takes at most half the free disk.
      Used on CPU where the ``.npz`` is read straight into the CPU layout (an
      uncompressed bfloat16/float16 ``.npz``, no cast to another dtype) and for
      ``quantize`` (the quantized arrays: later loads neither read nor quantize);
      ignored elsewhere (``"demo"``, transformers folders, GPU/TPU).
    overrides: config fields by their big_vision names, e.g. ``final_logits_softcap=0.0``.

    On CPU, while a large float ``.npz`` is read, a background thread compiles (or
    fetches from the persistent compilation cache) what a first ``generate`` with
    one image and one prompt needs, for the weights' shapes read from the file's
    headers (``decode.compile_ahead``); that first call then waits for it. The
    prefill's program is kept beside the compilation cache (``pali_kit.program_cache``;
    ``PALI_KIT_PROGRAM_CACHE=0`` turns it off), so later processes do not trace it.

    The first call also caps glibc's malloc at two heap arenas for the whole process
    (``model.cpu.limit_heap_arenas``: memory one thread's compile frees then serves
    the next; it keeps the bf16 peak of load + generate near the weights' size).
    Set ``MALLOC_ARENA_MAX`` before starting Python to choose otherwise.
    """
    dtype = _check_load_args(source, dtype, verbose)
    quant.check_scheme(quantize)
    cache_dir = _weights_cache.resolve_dir(weights_cache)
    write_cache = functools.partial(_weights_cache.write_in_background, verbose=verbose,
                                    automatic=_weights_cache.is_automatic(weights_cache))  # fmt: skip
    limit_heap_arenas()  # first: before the backend's, the load's and the compiles' threads allocate
    enable_compilation_cache()
    if source == "demo":
        model = _demo(dtype, overrides, quantize)
    else:
        path, info = resolve_checkpoint(source)
        name, text_len = (info.name, info.text_len) if info is not None else (None, None)
        loaded = ahead = None
        if path.is_dir():
            from . import hf

            params, config = hf.load_hf(path, dtype)
            config = _with_overrides(config, overrides, "pk.load")
            _check_overrides_fit(params, config, overrides, f"pk.load({str(source)!r})",
                                 str(path))  # fmt: skip
            params = quant.quantize_params(params, quantize) if quantize else params
        else:
            header = checkpoints.checkpoint_keys(path)  # shapes and dtypes, before the weights
            config = checkpoints.infer_config({k: s for k, (s, _) in header.items()}, str(path))
            if name is not None:
                config = registry_semantics(config, checkpoint_info(name).config)
            config = _with_overrides(config, overrides, "pk.load")
            ahead = _compile_while_loading(path, header, dtype, quantize, config, text_len)
            # on CPU, half precision: straight into the inference layout (Model.run_params)
            loaded = (None if quantize
                      else checkpoints.load_cpu_inference(path, dtype, cache=cache_dir,
                                                          write_cache=write_cache))  # fmt: skip
            if loaded is None and quantize:  # through the weights cache too
                params = checkpoints.load_quantized(path, dtype, quantize, cache=cache_dir,
                                                    write_cache=write_cache)  # fmt: skip
            elif loaded is None:
                params = checkpoints.load_params(path, dtype)
            else:
                params = loaded[0]
            _check_overrides_fit(params, config, overrides, f"pk.load({str(source)!r})",
                                 str(path))  # fmt: skip
            checkpoints.check_params(params, config, str(path))
        tok = _as_tokenizer(tokenizer) or find_tokenizer(path.parent if path.is_file() else path,
                                                          config.llm.vocab_size)  # fmt: skip
        model = _owning(Model(params, config, tok, name=name or path.name, text_len=text_len))
        model._run_shapes, model._compiled_ahead = ahead or (None, None)
        if loaded:  # params: the official tree less the matrices the run tree holds as blocks
            model._run, model._run_replaced = loaded[1], True
            model._check_compiled_ahead()
    if verbose:  # a status line: on stderr, so that printed answers can be redirected cleanly
        print(f"pali_kit: {model.summary()}", file=sys.stderr)
    return model


COMPILE_AHEAD_MIN_BYTES = 1 << 27  # a checkpoint this big loads long enough to compile meanwhile


def _compile_while_loading(path, header, dtype, quantize, config, text_len):
    """Start compiling the first generation (``decode.compile_ahead``) for the CPU
    layout of the weights about to be read, on a background thread: a prompt in
    the model's prompt bucket, one image, greedy. Only for float weights on CPU
    and a checkpoint of at least ``COMPILE_AHEAD_MIN_BYTES``. Returns the run
    tree's shapes it compiles for (``Model.run_params`` checks them) and the
    Future of that compile, or None."""
    if (quantize is not None or jax.default_backend() != "cpu"
            or Path(path).stat().st_size < COMPILE_AHEAD_MIN_BYTES):  # fmt: skip
        return None

    def as_loaded(stored):  # as load_params casts, and as JAX then holds it
        cast = dtype if dtype is not None and checkpoints.is_float(stored) else stored
        return jax.dtypes.canonicalize_dtype(cast)

    official = checkpoints.unflatten({
        key: jax.ShapeDtypeStruct(shape, as_loaded(stored))
        for key, (shape, stored) in header.items() if key.startswith(("img/", "llm/"))
    })  # fmt: skip
    shapes = abstract_layout(official)
    # checking the loaded weights (checkpoints.check_params) traces these: meanwhile too
    threading.Thread(target=param_shapes, args=(config,)).start()
    return shapes, decode.compile_ahead(config, shapes, text_len=text_len or 1)


def _as_tokenizer(tokenizer):
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"pk.load: tokenizer={short_repr(tokenizer)} must be a path to a SentencePiece "
            "tokenizer.model or a pk.Tokenizer"
        )
    if not Path(tokenizer).is_file():
        raise MissingFileError(
            f"pk.load: tokenizer={str(tokenizer)!r}: no such file; pass the path of "
            "paligemma_tokenizer.model (or leave it out to use the one beside the checkpoint)"
        )
    return Tokenizer(tokenizer)


def save(model: Model, path) -> Path:
    """Write the model's weights as an official-layout .npz (dtype kept, atomic)."""
    if model.quantization:
        raise ValueError(
            f"this model is quantized ({model.quantization}); the official .npz layout has no "
            "integer weights. Save the float model, and pass quantize= when loading it"
        )
    return checkpoints.save_params(model.params, path)
