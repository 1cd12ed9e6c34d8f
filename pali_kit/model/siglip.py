"""SigLIP So400m/14 image encoder, parameter-for-parameter big_vision's ``vit.py``.

    image float[B, 224, 224, 3] in [-1, 1]
      -> 14x14 patches, linear embedding            float[B, 256, 1152]
      -> + learned position embedding
      -> 27 pre-LayerNorm transformer blocks (no mask: every patch sees every patch)
      -> final LayerNorm -> ``head`` (1152 -> LLM width)   float[B, 256, W]

Parameter tree (layers stacked on a leading axis, as in the official files)::

    embedding/{kernel (14, 14, 3, 1152), bias}
    pos_embedding (1, 256, 1152)
    Transformer/encoderblock/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                              LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}   (27, ...)
    Transformer/encoder_norm/{scale, bias}
    head/{kernel (1152, W), bias (W,)}
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..configs import VisionConfig
from .common import activation_precision, init_stacked, mm, run_stack, stacked_param, weight

_dense_init = nn.initializers.lecun_normal()


class Dense(nn.Module):
    """y = x @ kernel + bias, with ``kernel`` shaped ``(in, *out)`` as in the checkpoint."""

    features: tuple[int, ...]
    contract: int = 1  # how many trailing input axes the kernel contracts
    compute_dtype: str | None = None

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.contract :]
        kernel = weight(self, "kernel", _dense_init, (*in_shape, *self.features))
        bias = self.param("bias", nn.initializers.zeros, self.features)
        ins, outs = "ijk"[: self.contract], "pqr"[: len(self.features)]
        y = mm(f"...{ins},{ins}{outs}->...{outs}", x, kernel, self.compute_dtype)
        return y + bias.astype(jnp.float32)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias, epsilon 1e-6 (flax's default numerics)."""

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,)).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,)).astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        # E[x^2] - E[x]^2, as flax.linen.LayerNorm computes it by default.
        var = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


class Attention(nn.Module):
    """Multi-head self-attention with biases: q, k, v ``(D, heads, head_dim)``, out ``(heads, head_dim, D)``."""

    num_heads: int
    compute_dtype: str | None = None

    @nn.compact
    def __call__(self, x):  # float[B, N, D] -> float[B, N, D]
        d = x.shape[-1]
        hd = d // self.num_heads
        dense = functools.partial(Dense, (self.num_heads, hd), compute_dtype=self.compute_dtype)
        q, k, v = dense(name="query")(x), dense(name="key")(x), dense(name="value")(x)
        q = q / jnp.sqrt(hd).astype(q.dtype)
        exact = activation_precision(self.compute_dtype)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k, precision=exact)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bnqk,bknh->bqnh", probs, v, precision=exact)
        return Dense((d,), contract=2, compute_dtype=self.compute_dtype, name="out")(out)


class MlpBlock(nn.Module):
    mlp_dim: int
    compute_dtype: str | None = None

    @nn.compact
    def __call__(self, x):  # float[B, N, D] -> float[B, N, D]
        cd = self.compute_dtype
        h = nn.gelu(Dense((self.mlp_dim,), compute_dtype=cd, name="Dense_0")(x), approximate=True)
        return Dense((x.shape[-1],), compute_dtype=cd, name="Dense_1")(h)


class Encoder1DBlock(nn.Module):
    """One pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        y = LayerNorm(name="LayerNorm_0")(x)
        attn = Attention(cfg.num_heads, cfg.compute_dtype, name="MultiHeadDotProductAttention_0")
        x = x + attn(y)
        y = LayerNorm(name="LayerNorm_1")(x)
        return x + MlpBlock(cfg.mlp_dim, cfg.compute_dtype, name="MlpBlock_0")(y)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> linear embedding (the stride-p VALID conv)."""

    width: int
    patch: int
    compute_dtype: str | None = None

    @nn.compact
    def __call__(self, images):  # float[B, H, W, 3] -> float[B, H/p * W/p, width]
        p = self.patch
        kernel = weight(self, "kernel", _dense_init, (p, p, images.shape[-1], self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        b, h, w, c = images.shape
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p, p, c)  # row-major over the grid
        y = mm("bnijc,ijcd->bnd", patches, kernel, self.compute_dtype)
        return y + bias.astype(jnp.float32)


class Transformer(nn.Module):
    config: VisionConfig

    def setup(self):
        cfg = self.config
        block = Encoder1DBlock(cfg, parent=None)  # a detached template, applied per layer
        example = jnp.zeros((1, 1, cfg.width), jnp.float32)
        self.encoderblock = stacked_param(
            self, "encoderblock", lambda rng: init_stacked(block, rng, cfg.depth, example)
        )
        self.encoder_norm = LayerNorm()

    def __call__(self, x, *, scan: bool = False, remat: bool = False):
        block = Encoder1DBlock(self.config, parent=None)

        def apply_layer(params, x, i):
            return block.apply({"params": params}, x)

        x = run_stack(apply_layer, self.encoderblock, x, scan=scan, remat=remat)
        return self.encoder_norm(x)


class SigLIP(nn.Module):
    """Image encoder + projection head to the LLM width (``out_width``)."""

    config: VisionConfig
    out_width: int

    @nn.compact
    def __call__(self, images, *, scan: bool = False, remat: bool = False):
        """float[B, H, W, 3] in [-1, 1] -> image tokens float32[B, N, out_width]."""
        cfg = self.config
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, this model takes "
                f"{cfg.image_size}x{cfg.image_size}: use pk.preprocess(images, {cfg.image_size})"
            )
        embed = PatchEmbed(cfg.width, cfg.patch_size, cfg.compute_dtype, name="embedding")
        x = embed(images.astype(jnp.float32))
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, cfg.num_tokens, cfg.width)
        )
        x = x + pos.astype(jnp.float32)
        x = Transformer(cfg, name="Transformer")(x, scan=scan, remat=remat)
        return Dense((self.out_width,), compute_dtype=cfg.compute_dtype, name="head")(x)
