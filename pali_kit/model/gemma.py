"""Gemma 1 and Gemma 2 decoders, parameter-for-parameter big_vision's ``gemma.py``.

    tokens int32[B, T] -> table[tokens] * sqrt(W)            float[B, T, W]
    (PaliGemma puts the image tokens in front, unscaled)
      -> depth x Block -> final RMSNorm -> h @ table.T        float[B, T, V]

Block (Gemma 1)::   h = x + Attn(RMSNorm(x));        out = h + MLP(RMSNorm(h))
Block (Gemma 2)::   h = x + RMSNorm(Attn(RMSNorm(x))); out = h + RMSNorm(MLP(RMSNorm(h)))

Parameter tree (no biases; layers stacked on a leading axis)::

    embedder/input_embedding               (V, W)     also the output projection
    layers/pre_attention_norm/scale        (L, W)
    layers/attn/q_einsum/w                 (L, Nh, W, H)
    layers/attn/kv_einsum/w                (L, 2, K, W, H)   [:, 0] keys, [:, 1] values
    layers/attn/attn_vec_einsum/w          (L, Nh, H, W)
    layers/post_attention_norm/scale       (L, W)     Gemma 2 only
    layers/pre_ffw_norm/scale              (L, W)
    layers/mlp/gating_einsum               (L, 2, W, F)  [:, 0] gate (GELU), [:, 1] up
    layers/mlp/linear                      (L, F, W)
    layers/post_ffw_norm/scale             (L, W)     Gemma 2 only
    final_norm/scale                       (W,)

Attention takes an explicit boolean mask ``bool[B, T, S]`` (query t may see
key s) and explicit RoPE positions ``int32[B, T]``, so the same code serves the
full prefix-LM forward, the prefill of a KV cache and one-token decode steps.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..configs import GemmaConfig
from .common import (
    activation_precision,
    init_stacked,
    layer_slice,
    mm,
    run_stack,
    stacked_param,
    weight,
)

# big_vision masks attention logits with this value (not -inf: a row with no
# visible key, e.g. a padding query, stays finite).
BIG_NEG = -2.3819763e38


class LayerCache(NamedTuple):
    """One layer's keys and values: k, v float[B, S, K, H] (S = cache slots).

    The Attention only calls ``write`` and ``read``: a cache stored in another
    order (``model.cpu.HeadMajorCache``) hands it layers with those two methods.
    """

    k: jax.Array
    v: jax.Array

    def write(self, k, v, slot) -> LayerCache:
        """Keys and values float[B, T, K, H] written at slots ``slot .. slot+T-1``."""
        start = (0, slot, 0, 0)
        update = jax.lax.dynamic_update_slice
        return LayerCache(
            update(self.k, k.astype(self.k.dtype), start),
            update(self.v, v.astype(self.v.dtype), start),
        )

    def read(self):
        """All slots: (keys, values) float32[B, S, K, H]."""
        return self.k.astype(jnp.float32), self.v.astype(jnp.float32)


class KVCache(NamedTuple):
    """Keys and values of every layer, written in place as decoding advances.

    k, v: tuples of L arrays float[B, S, K, H] (S = cache slots: prompt slots,
    then one per new token). One array per layer, so writing a layer's new
    entries never copies the other layers' entries. The model reads and writes
    it through ``layer(i)`` (a LayerCache) and ``of_layers``; another storage
    order is another class with those methods, ``zeros`` and ``take``.
    """

    k: tuple
    v: tuple

    @classmethod
    def zeros(cls, config: GemmaConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, size, config.num_kv_heads, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.depth))
        return cls(zeros(), zeros())

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i])

    def of_layers(self, layers) -> KVCache:
        """This cache with every layer replaced by ``layers`` (LayerCaches, in order)."""
        return KVCache(tuple(layer.k for layer in layers), tuple(layer.v for layer in layers))

    def take(self, rows) -> KVCache:
        """Reorder/select batch rows (beam search): every array indexed by ``rows``."""
        return KVCache(*jax.tree.map(lambda a: jnp.take(a, rows, axis=0), (self.k, self.v)))


def apply_rope(x, positions, base: float = 10_000.0):
    """Rotary embedding over all H dims, split-halves convention.

    x: float[B, T, N, H]; positions: int32[B, T].
    """
    h = x.shape[-1]
    fraction = 2 * jnp.arange(0, h // 2) / h
    timescale = base**fraction
    angles = positions[..., None] / timescale[None, None, :]  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softcap(x, cap: float):
    """cap * tanh(x / cap); cap == 0 disables."""
    return cap * jnp.tanh(x / cap) if cap else x


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + scale); ``scale`` starts at zero (identity)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * (1 + scale.astype(jnp.float32))


class Einsum(nn.Module):
    """A weight ``w`` of a given shape (big_vision names attention weights ``.../w``)."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self):
        fan_in = self.shape[-2] if len(self.shape) >= 2 else self.shape[-1]
        return weight(self, "w", nn.initializers.normal(fan_in**-0.5), self.shape)


class Attention(nn.Module):
    config: GemmaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, slot=None):
        """One attention layer.

        x: float[B, T, W]; positions: int32[B, T]; mask: bool[B, T, S].
        Without a cache S == T. With ``cache``, this layer's LayerCache, the new
        keys/values are written at slots ``slot .. slot+T-1`` and attention reads
        all S slots. Returns (float[B, T, W], cache).
        """
        cfg = self.config
        w_q = Einsum((cfg.num_heads, cfg.width, cfg.head_dim), name="q_einsum")()
        w_kv = Einsum((2, cfg.num_kv_heads, cfg.width, cfg.head_dim), name="kv_einsum")()
        w_o = Einsum((cfg.num_heads, cfg.head_dim, cfg.width), name="attn_vec_einsum")()

        q = mm("btd,ndh->btnh", x, w_q, cfg.compute_dtype)  # [B, T, Nh, H]
        k, v = mm("btd,ckdh->cbtkh", x, w_kv, cfg.compute_dtype)  # [B, T, K, H] each
        q = apply_rope(q, positions, cfg.rope_base) * cfg.query_scale
        k = apply_rope(k, positions, cfg.rope_base)

        if cache is not None:
            cache = cache.write(k, v, slot)
            k, v = cache.read()  # [B, S, K, H] each

        b, t = x.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads  # query heads per kv head
        q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
        exact = activation_precision(cfg.compute_dtype)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=exact)
        logits = softcap(logits, cfg.attn_logits_softcap)
        logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=exact).reshape(
            b, t, cfg.num_heads, -1
        )
        return mm("btnh,nhd->btd", out, w_o, cfg.compute_dtype), cache


class FeedForward(nn.Module):
    """GeGLU MLP: (gelu(x @ G0) * (x @ G1)) @ linear."""

    config: GemmaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.normal(cfg.width**-0.5)
        w_gating = weight(self, "gating_einsum", init, (2, cfg.width, cfg.mlp_dim))
        w_linear = weight(
            self, "linear", nn.initializers.normal(cfg.mlp_dim**-0.5), (cfg.mlp_dim, cfg.width)
        )
        gate, up = mm("btd,cdf->cbtf", x, w_gating, cfg.compute_dtype)  # [B, T, F] each
        return mm("btf,fd->btd", nn.gelu(gate, approximate=True) * up, w_linear, cfg.compute_dtype)


class Block(nn.Module):
    config: GemmaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, slot=None):
        cfg = self.config
        y = RMSNorm(cfg.norm_eps, name="pre_attention_norm")(x)
        y, cache = Attention(cfg, name="attn")(y, positions, mask, cache, slot)
        if cfg.post_norms:
            y = RMSNorm(cfg.norm_eps, name="post_attention_norm")(y)
        x = x + y
        y = RMSNorm(cfg.norm_eps, name="pre_ffw_norm")(x)
        y = FeedForward(cfg, name="mlp")(y)
        if cfg.post_norms:
            y = RMSNorm(cfg.norm_eps, name="post_ffw_norm")(y)
        return x + y, cache


class Gemma(nn.Module):
    """The decoder. Methods: ``embed`` tokens, run ``layers``, ``logits``."""

    config: GemmaConfig

    def setup(self):
        cfg = self.config
        self.embedder = Embedder(cfg.vocab_size, cfg.width, cfg.compute_dtype)
        block = Block(cfg, parent=None)  # a detached template, applied per layer
        ex_x = jnp.zeros((1, 1, cfg.width), jnp.float32)
        ex_pos, ex_mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool)
        self.layers = stacked_param(
            self, "layers", lambda rng: init_stacked(block, rng, cfg.depth, ex_x, ex_pos, ex_mask)
        )
        self.final_norm = RMSNorm(cfg.norm_eps)

    def embed(self, tokens):
        """int32[B, T] -> float32[B, T, W]: table rows times sqrt(W)."""
        return self.embedder.encode(tokens)

    def __call__(self, x, positions, mask, cache=None, slot=None, *, scan=False, remat=False):
        """Run every layer, then the final norm.

        x: float[B, T, W] embeddings; positions: int32[B, T]; mask: bool[B, T, S].
        cache: a KVCache to write at ``slot`` (decoding; layers unrolled) or None.
        Returns (pre_logits float32[B, T, W], updated cache or None).
        """
        block = Block(self.config, parent=None)

        def apply_layer(params, x, i):
            return block.apply({"params": params}, x, positions, mask)[0]

        if cache is None:
            x = run_stack(apply_layer, self.layers, x, scan=scan, remat=remat)
            return self.final_norm(x), None

        new = []
        for i in range(len(cache.k)):
            params = layer_slice(self.layers, i)
            x, layer = block.apply({"params": params}, x, positions, mask, cache.layer(i), slot)
            new.append(layer)
        return self.final_norm(x), cache.of_layers(new)

    def logits(self, pre_logits):
        """float[..., W] -> float32[..., V]: tied output projection + optional final softcap."""
        return softcap(self.embedder.decode(pre_logits), self.config.final_logits_softcap)


class Embedder(nn.Module):
    """The token table (V, W): input embedding, and (tied) the output projection."""

    vocab_size: int
    width: int
    compute_dtype: str | None = None

    def setup(self):
        init = nn.initializers.normal(self.width**-0.5)
        self.input_embedding = weight(self, "input_embedding", init, (self.vocab_size, self.width))

    def encode(self, tokens):
        """int32[...] -> float32[..., W]: table rows times sqrt(W), in float32."""
        return self.input_embedding[(tokens,)].astype(jnp.float32) * float(np.sqrt(self.width))

    def decode(self, x):
        """float[..., W] -> float32[..., V]."""
        return mm("...d,vd->...v", x, self.input_embedding, self.compute_dtype)
