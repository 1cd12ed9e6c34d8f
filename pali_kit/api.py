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

import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints, decode, quant
from .configs import CHECKPOINTS, PaliGemmaConfig, checkpoint_info, paligemma_config
from .images import preprocess
from .model import PaliGemma, count_params, inference_params, init_params, param_shapes
from .model.cpu import IN_PLACE_LEAVES, official_params
from .tokenizer import Tokenizer, data_dir


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
        as needed, e.g. for saving or training). Taking this tree before the
        first inference keeps the arrays as they are (the layout then copies).
        """
        if self._run is not None and self._run_replaced:
            return official_params(self._run, self._params)
        self._owns_params = False  # the caller now holds these arrays: never write over them
        return self._params

    @params.setter
    def params(self, value):
        self._params = value
        self._run = None
        self._run_replaced = False
        self._owns_params = False  # a caller's tree: never written over

    @property
    def run_params(self):
        """The same weights as handed to compiled inference code: on CPU the CPU
        layout (``pali_kit.model.cpu``: per-layer views of the same memory; for
        half-precision weights (out, in) blocks, written over the official arrays'
        memory when the model owns them), elsewhere the official tree."""
        if self._run is None:
            self._run = inference_params(self._params, in_place=self._owns_params)
            skeleton = _without_replaced(self._params, self._run) if self._owns_params else None
            if skeleton is not None:  # the official arrays' memory now holds the blocks
                self._params, self._run_replaced = skeleton, True
        return self._run

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
        dt = checkpoints.as_dtype(dtype)

        def cast(a):  # a QArray keeps its integers and now stands for ``dt``
            if isinstance(a, quant.QArray):
                return quant.QArray(*a.children(), a.scheme, a.in_axes, a.in_shape, dt)
            return a.astype(dt)

        params = jax.tree.map(cast, self.params, is_leaf=quant.is_quantized)
        return _owning(Model(params, self.config, self.tokenizer, self.name, self.text_len))

    # --- numerics ---------------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        """Any image input -> float32[B, R, R, 3] in [-1, 1] at this model's resolution."""
        if isinstance(images, (np.ndarray, jax.Array)) and images.dtype != np.uint8:
            shape = images.shape
            res = self.resolution
            if images.ndim in (4, 5) and shape[-3:] == (res, res, 3):
                return images  # already model input
        return preprocess(images, self.resolution)

    def embed_image(self, images) -> jax.Array:
        """Images -> image tokens float32[B, N, W] (not scaled), the LLM's prefix."""
        return _embed_fn(self.config)(self.run_params, self.preprocess(images))

    def logits(self, images, text, mask_ar, mask_input=None) -> jax.Array:
        """Text logits float32[B, T, V] of one full prefix-LM forward pass.

        images: float[B, R, R, 3] in [-1, 1]; text: int32[B, T]; mask_ar: int[B, T]
        (0 = prefix, full attention; 1 = causal); mask_input: bool[B, T] real tokens.
        """
        text = jnp.asarray(text, jnp.int32)
        mask_input = jnp.ones(text.shape, bool) if mask_input is None else jnp.asarray(mask_input)
        return _logits_fn(self.config)(
            self.run_params, self.preprocess(images), text, jnp.asarray(mask_ar), mask_input
        )

    def generate_tokens(self, images, text, mask_input, *, max_new_tokens: int,
                        sampler="greedy", seed: int = 0, **kw):  # fmt: skip
        """Token-level generation: (tokens int32[B, max_new_tokens], logprobs float32[B, ...]).

        text: int32[B, T] right-padded prompts; mask_input: bool[B, T]; every
        prompt token is prefix. Tokens after EOS are padding (0).
        Keywords: ``cache_dtype``, ``logit_mask`` (bool[V] allowed tokens), ``best_of``.
        """
        return decode.generate_tokens(
            self.config, self.run_params, self.preprocess(images), text, mask_input,
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, **kw,
        )  # fmt: skip

    # --- text in, text out ---------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError(
                "this model has no tokenizer: pass tokenizer='path/to/paligemma_tokenizer.model' "
                "to pk.load, or set model.tokenizer = pk.Tokenizer(path)"
            )
        return self.tokenizer

    def _encode(self, images, prompts, text_len):
        tok = self._need_tokenizer()
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        pixels = self.preprocess(images)
        if pixels.shape[0] == 1 and len(prompts) > 1:
            pixels = np.repeat(np.asarray(pixels), len(prompts), axis=0)
        elif len(prompts) == 1 and pixels.shape[0] > 1:
            prompts = prompts * pixels.shape[0]
        if pixels.shape[0] != len(prompts):
            raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
        enc = tok.encode_prompts(prompts, text_len=text_len, bucket=None)
        return pixels, prompts, enc

    def generate(self, images, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                 sampler="greedy", seed: int = 0, text_len: int | None = None,
                 **kw) -> list[Generation]:  # fmt: skip
        """Answer prompts about images; one :class:`Generation` per prompt.

        images: one image or a list (paths, bytes, PIL, arrays; see pk.preprocess);
        one image with several prompts (or one prompt with several images) is broadcast.
        """
        pixels, prompts, enc = self._encode(images, prompts, text_len or self.text_len)
        tokens, logprobs = decode.generate_tokens(
            self.config, self.run_params, pixels, enc["text"], enc["mask_input"],
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, **kw,
        )  # fmt: skip
        return [self._result(p, t, lp) for p, t, lp in zip(prompts, tokens, logprobs)]

    def _result(self, prompt, tokens, logprobs) -> Generation:
        n = _length_with_eos(tokens)
        text = self.tokenizer.decode(tokens[:n].tolist())
        return Generation(prompt, text, tokens[:n].copy(), logprobs[:n].copy())

    def stream(self, image, prompt: str, *, max_new_tokens: int = 64, sampler="greedy",
               seed: int = 0, **kw) -> Iterator[str]:  # fmt: skip
        """Yield the answer's text in pieces as tokens are produced (one image, one prompt)."""
        pixels, _, enc = self._encode(image, [prompt], self.text_len)
        steps = decode.iter_tokens(
            self.config, self.run_params, pixels, enc["text"], enc["mask_input"],
            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, **kw,
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


def _length_with_eos(tokens) -> int:
    hits = np.flatnonzero(np.asarray(tokens) == decode.EOS_ID)
    if hits.size:
        return int(hits[0]) + 1
    nonpad = np.flatnonzero(np.asarray(tokens) != decode.PAD_ID)
    return int(nonpad[-1]) + 1 if nonpad.size else 0


# --- loading -------------------------------------------------------------------------------

_CACHE_ENABLED = False


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
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    _CACHE_ENABLED = True


DEMO_FILE = "demo_model.npz"


def _find_tokenizer(folder: Path, vocab: int) -> Tokenizer | None:
    for name in ("paligemma_tokenizer.model", "tokenizer.model"):
        if (folder / name).exists():
            return Tokenizer(folder / name)
    demo = data_dir() / "tokenizer.model"
    if demo.exists() and vocab == Tokenizer(demo).vocab_size:
        return Tokenizer(demo)
    return None


def _demo(dtype, overrides, quantize=None):
    path = data_dir() / DEMO_FILE
    tok = Tokenizer.demo()
    if path.exists():
        params = checkpoints.load_params(path, dtype, quantize=quantize)
        config = checkpoints.infer_config(params, str(path)).replace(**overrides)
        return _owning(Model(params, config, tok, name="pali_kit demo", text_len=32))
    warnings.warn(
        f"{path} does not exist yet: using a small RANDOM model with the demo tokenizer "
        "(its answers are noise)",
        stacklevel=3,
    )
    config = demo_config().replace(**overrides)
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
         **overrides) -> Model:  # fmt: skip
    """Load a PaliGemma from anywhere.

    source: ``"demo"`` (the embedded model, offline) | a name from ``pk.CHECKPOINTS``
    (downloaded with kagglehub) | a big_vision ``.npz`` | a transformers folder.
    dtype: cast the weights while loading (``"bfloat16"``, ``"float32"``, ...).
    quantize: ``"int8"`` | ``"int4"``: weight-only quantization of every large matrix
      (``pali_kit.quant``), done while a ``.npz`` streams in, so memory peaks near the
      quantized size (a transformers folder is loaded, then quantized).
    tokenizer: a path or Tokenizer; by default one found beside the checkpoint.
    overrides: config fields by their big_vision names, e.g. ``final_logits_softcap=0.0``.
    """
    quant.check_scheme(quantize)
    enable_compilation_cache()
    text_len = None
    if source == "demo":
        model = _demo(dtype, overrides, quantize)
    else:
        name = None
        if (
            isinstance(source, str)
            and not Path(source).exists()
            and (source in CHECKPOINTS or source.startswith(("paligemma-", "paligemma2-")))
        ):
            info = checkpoint_info(source)
            from . import hub

            name, text_len = info.name, info.text_len
            path = Path(hub.download(info))
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(
                    f"{source}: no such file or folder, and not a checkpoint name "
                    "(see pk.CHECKPOINTS for names such as 'paligemma2-3b-pt-224')"
                )
        if path.is_dir():
            from . import hf

            params, config = hf.load_hf(path, dtype)
            config = config.replace(**overrides) if overrides else config
            params = quant.quantize_params(params, quantize) if quantize else params
        else:
            params = checkpoints.load_params(path, dtype, quantize=quantize)
            config = checkpoints.infer_config(params, str(path))
            if name is not None:
                config = _registry_semantics(config, checkpoint_info(name).config)
            config = config.replace(**overrides) if overrides else config
            checkpoints.check_params(params, config, str(path))
        tok = _as_tokenizer(tokenizer) or _find_tokenizer(path.parent if path.is_file() else path,
                                                          config.llm.vocab_size)  # fmt: skip
        model = _owning(Model(params, config, tok, name=name or path.name, text_len=text_len))
    if verbose:
        print(f"pali_kit: {model.summary()}")
    return model


def _registry_semantics(inferred: PaliGemmaConfig, registered: PaliGemmaConfig):
    """Shapes say the architecture; the registry adds what shapes can't (query scale, softcaps)."""
    llm = inferred.llm
    return inferred.replace(
        query_pre_attn_norm=registered.llm.query_pre_attn_norm,
        attn_logits_softcap=registered.llm.attn_logits_softcap,
        final_logits_softcap=registered.llm.final_logits_softcap,
        llm_variant=registered.llm.variant if llm.variant == "custom" else llm.variant,
    )


def _as_tokenizer(tokenizer):
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    return Tokenizer(tokenizer)


def save(model: Model, path) -> Path:
    """Write the model's weights as an official-layout .npz (dtype kept, atomic)."""
    if model.quantization:
        raise ValueError(
            f"this model is quantized ({model.quantization}); the official .npz layout has no "
            "integer weights. Save the float model, and pass quantize= when loading it"
        )
    return checkpoints.save_params(model.params, path)
