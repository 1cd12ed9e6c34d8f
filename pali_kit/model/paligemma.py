"""PaliGemma: SigLIP image tokens in front of Gemma text tokens, one prefix-LM.

    images float[B, H, W, 3] -> img -> zimg float[B, N, W]      (not scaled)
    text   int32[B, T]       -> llm.embed -> float[B, T, W]      (times sqrt(W))
    x = [zimg, text]                                             float[B, N+T, W]
    attention: image + prompt form one bidirectional block, the answer is causal

The prefix-LM mask comes from ``mask_ar`` (big_vision's cumsum rule): token i
may see token j iff ``cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]`` and both are
real tokens (``mask_input``). For example::

    tokens   [img img BOS cap \\n | a  cat EOS]
    mask_ar  [ 0   0   0   0   0  | 1   1   1 ]
    cumsum   [ 0   0   0   0   0  | 1   2   3 ]

The first five tokens see each other (all have cumsum 0); "a" sees them and
itself; "cat" sees everything up to itself; and so on. Image tokens always get
``mask_ar = 0``.

The parameter tree is ``{"img": ..., "llm": ...}``, exactly the official ``.npz``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..configs import PaliGemmaConfig, resolve_config
from .gemma import Gemma, KVCache
from .siglip import SigLIP


def make_attn_mask(input_mask, mask_ar):
    """bool[B, S] real tokens, int[B, S] mask_ar -> bool[B, S, S] (query, key)."""
    cumsum = jnp.cumsum(mask_ar, axis=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = jnp.logical_and(input_mask[:, None, :], input_mask[:, :, None])
    return jnp.logical_and(causal, valid)


def positions_from_mask(input_mask):
    """0-based positions that count real tokens only: int32[B, S]."""
    return jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1


class PaliGemma(nn.Module):
    """The Flax module. Use ``init``/``apply`` with ``method=`` one of the methods below."""

    config: PaliGemmaConfig
    scan: bool = False  # lax.scan over layers (training) instead of an unrolled loop
    remat: bool = False  # recompute layer activations in the backward pass

    def setup(self):
        self.img = SigLIP(self.config.vision, self.config.llm.width)
        self.llm = Gemma(self.config.llm)

    def embed_image(self, images):
        """float[B, H, W, 3] -> float32[B, N, W]; video float[B, F, H, W, 3] -> [B, F*N, W]."""
        if images.ndim == 5:
            b, f = images.shape[:2]
            z = self.img(images.reshape(b * f, *images.shape[2:]), scan=self.scan, remat=self.remat)
            return z.reshape(b, f * z.shape[1], z.shape[2])
        return self.img(images, scan=self.scan, remat=self.remat)

    def embed_text(self, tokens):
        return self.llm.embed(tokens)

    def __call__(self, images, text, mask_ar, mask_input=None):
        """One full prefix-LM forward -> text logits float32[B, T, V].

        images: float[B, H, W, 3]; text: int32[B, T]; mask_ar: int[B, T];
        mask_input: bool[B, T] real tokens (default: all real).
        """
        zimg = self.embed_image(images)
        x = jnp.concatenate([zimg, self.embed_text(text)], axis=1)
        input_mask, full_ar = _with_image_masks(zimg.shape[1], text, mask_ar, mask_input)
        mask = make_attn_mask(input_mask, full_ar)
        pre_logits, _ = self.llm(
            x, positions_from_mask(input_mask), mask, scan=self.scan, remat=self.remat
        )
        return self.llm.logits(pre_logits[:, zimg.shape[1] :])

    def prefill(self, images, text, mask_input, cache_size: int, cache_dtype=jnp.float32,
                cache_form=KVCache):  # fmt: skip
        """Encode image + prompt into a fresh KV cache.

        images: float[B, H, W, 3]; text: int32[B, T] right-padded prompts, all
        prefix (full attention); mask_input: bool[B, T]. The cache has
        ``cache_size >= N + T`` slots; prompt token j sits in slot N + j.
        ``cache_form``: KVCache, or a class with its interface that stores another
        order (``model.cpu.HeadMajorCache``).

        Returns (logits of each row's last real token float32[B, V], cache,
        valid bool[B, cache_size] slots that hold real tokens, next position int32[B]).
        """
        zimg = self.embed_image(images)
        x = jnp.concatenate([zimg, self.embed_text(text)], axis=1)
        b, s = x.shape[:2]
        input_mask, _ = _with_image_masks(zimg.shape[1], text, jnp.zeros_like(text), mask_input)
        valid = jnp.zeros((b, cache_size), bool).at[:, :s].set(input_mask)
        mask = jnp.logical_and(input_mask[:, :, None], valid[:, None, :])
        cache = cache_form.zeros(self.config.llm, b, cache_size, cache_dtype)
        positions = positions_from_mask(input_mask)
        pre_logits, cache = self.llm(x, positions, mask, cache, 0)
        last = jnp.sum(input_mask, axis=1) - 1  # index of each row's last real token
        h = jnp.take_along_axis(pre_logits, last[:, None, None], axis=1)[:, 0]
        return self.llm.logits(h), cache, valid, last + 1

    def decode_step(self, tokens, cache: KVCache, valid, positions, slot):
        """Feed one new token per row.

        tokens: int32[B]; cache: KVCache; valid: bool[B, S]; positions: int32[B]
        (RoPE position of this token); slot: int32[] cache slot to write.
        Returns (logits float32[B, V], cache, valid).
        """
        valid = valid.at[:, slot].set(True)
        x = self.embed_text(tokens[:, None])
        mask = valid[:, None, :]
        pre_logits, cache = self.llm(x, positions[:, None], mask, cache, slot)
        return self.llm.logits(pre_logits[:, 0]), cache, valid


def _with_image_masks(n_img, text, mask_ar, mask_input):
    """Prepend the image tokens' masks: input_mask True, mask_ar 0."""
    b = text.shape[0]
    if mask_input is None:
        mask_input = jnp.ones(text.shape, bool)
    input_mask = jnp.concatenate([jnp.ones((b, n_img), bool), mask_input.astype(bool)], axis=1)
    full_ar = jnp.concatenate([jnp.zeros((b, n_img), jnp.int32), mask_ar.astype(jnp.int32)], axis=1)
    return input_mask, full_ar


def init_params(config, rng=0, dtype=None):
    """Random parameters of a config (or registry name) in the official tree layout.

    rng: an int seed or a JAX key. Int seeds use the "rbg" generator, which
    compiles several times faster on CPU than the default threefry.
    """
    config = resolve_config(config)
    rng = jax.random.key(rng, impl="rbg") if isinstance(rng, int) else rng
    res = config.vision.image_size
    images = jnp.zeros((1, res, res, 3), jnp.float32)
    text = jnp.zeros((1, 1), jnp.int32)
    # scan=True traces one layer instead of all of them; the tree is the same.
    module = PaliGemma(config, scan=True)

    @jax.jit
    def init(rng):
        params = module.init(rng, images, text, jnp.zeros((1, 1), jnp.int32))["params"]
        return params if dtype is None else jax.tree.map(lambda a: a.astype(dtype), params)

    return init(rng)


def param_shapes(name_or_config, dtype=jnp.float32):
    """Nested dict of ``jax.ShapeDtypeStruct`` for a config or registry name; allocates nothing."""
    shapes = _init_shapes(resolve_config(name_or_config))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


@functools.lru_cache(maxsize=16)
def _init_shapes(config: PaliGemmaConfig):
    """The official tree's shapes (tracing the initialiser: ~0.3 s at 3B, so kept)."""
    return jax.eval_shape(lambda: init_params(config))


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
