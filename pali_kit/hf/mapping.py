"""Which transformers tensor feeds which big_vision key, and how its axes move.

A transformers folder holds the same numbers as the official ``.npz``, cut and
named differently (spec section 11):

- one tensor per layer (``layers.{i}.``) instead of arrays stacked ``[L, ...]``;
- ``nn.Linear`` weights are ``(out, in)``; big_vision kernels are ``(in, out)``
  and split attention projections per head ``(heads, ..., head_dim)``;
- Gemma 1's ``post_attention_layernorm`` is the norm *before the MLP*
  (big_vision ``pre_ffw_norm``); Gemma 2 has four norms with matching names;
- the embedding has extra rows: ``<image>`` (id 257152) and padding up to a
  multiple of 64 (257216 rows). The kit keeps the first ``image_token_index``.

Every tensor family has a pair of small functions below (``q_to_kit`` /
``q_to_hf``, ...), and ``rules`` is the one table that says which HF names
feed which big_vision key. HF names are used in a short form
(``text.layers.0.mlp.gate_proj.weight``): ``short_name`` / ``export_name``
convert from and to the names stored in files.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from ..checkpoints import flatten
from ..configs import PaliGemmaConfig

ROW_MULTIPLE = 64  # transformers pads the embedding to a multiple of 64 rows

# --- names ------------------------------------------------------------------------

# Every layout transformers has written, old (4.x Hub files) and new (>= 4.52
# in memory, 5.x), mapped to a short family prefix. First match wins.
PREFIXES = (
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)
# What export_hf writes: the layout of the Hub's PaliGemma repos, which both
# transformers 4.x and 5.x load.
EXPORT_PREFIXES = {
    "text.": "language_model.model.",
    "vision.": "vision_tower.vision_model.",
    "projector.": "multi_modal_projector.",
}
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old files carry

GEMMA1_NORMS = {  # big_vision norm -> HF norm, per layer
    "pre_attention_norm": "input_layernorm",
    "pre_ffw_norm": "post_attention_layernorm",  # sic: HF Gemma 1's pre-MLP norm
}
GEMMA2_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def short_name(hf_key: str) -> str | None:
    """``language_model.model.norm.weight`` -> ``text.norm.weight`` (None: not PaliGemma)."""
    for prefix, short in PREFIXES:
        if hf_key.startswith(prefix):
            return short + hf_key[len(prefix) :]
    return None


def export_name(short: str) -> str:
    for short_prefix, prefix in EXPORT_PREFIXES.items():
        if short.startswith(short_prefix):
            return prefix + short[len(short_prefix) :]
    raise ValueError(short)


# --- one function pair per tensor family -------------------------------------------
# to_kit(*hf_arrays, config) -> one layer of the kit array; to_hf(kit_array, config)
# -> tuple of HF arrays. to_hf uses only array methods, so jax.eval_shape can run
# it on shapes (that is how the expected HF shapes are computed).


def copy_to_kit(w, c):
    return w


def copy_to_hf(a, c):
    return (a,)


def dense_to_kit(w, c):
    """nn.Linear (out, in) -> kernel (in, out)."""
    return w.T


def dense_to_hf(kernel, c):
    return (kernel.T,)


def patch_to_kit(w, c):
    """Conv2d weight (D, 3, p, p) -> HWIO kernel (p, p, 3, D)."""
    return w.transpose(2, 3, 1, 0)


def patch_to_hf(kernel, c):
    return (kernel.transpose(3, 2, 0, 1),)


def posemb_to_kit(w, c):
    """(P, D) -> (1, P, D)."""
    return w[None]


def posemb_to_hf(a, c):
    return (a[0],)


def vit_qkv_to_kit(w, c):
    """SigLIP q/k/v_proj (n*h, D) -> kernel (D, n, h)."""
    return w.T.reshape(w.shape[1], c.vision.num_heads, -1)


def vit_qkv_to_hf(kernel, c):
    return (kernel.reshape(kernel.shape[0], -1).T,)


def vit_qkv_bias_to_kit(b, c):
    """(n*h,) -> (n, h)."""
    return b.reshape(c.vision.num_heads, -1)


def vit_qkv_bias_to_hf(b, c):
    return (b.reshape(-1),)


def vit_out_to_kit(w, c):
    """SigLIP out_proj (D, n*h) -> kernel (n, h, D)."""
    return w.T.reshape(c.vision.num_heads, -1, w.shape[0])


def vit_out_to_hf(kernel, c):
    return (kernel.reshape(-1, kernel.shape[-1]).T,)


def q_to_kit(w, c):
    """q_proj (Nh*H, W) -> q_einsum (Nh, W, H)."""
    return w.reshape(c.llm.num_heads, -1, w.shape[1]).transpose(0, 2, 1)


def q_to_hf(q, c):
    return (q.transpose(0, 2, 1).reshape(-1, q.shape[1]),)


def kv_to_kit(k, v, c):
    """k_proj, v_proj (K*H, W) each -> kv_einsum (2, K, W, H); [0] keys, [1] values."""
    heads = c.llm.num_kv_heads
    return np.stack([w.reshape(heads, -1, w.shape[1]).transpose(0, 2, 1) for w in (k, v)])


def kv_to_hf(kv, c):
    return tuple(kv[j].transpose(0, 2, 1).reshape(-1, kv.shape[2]) for j in (0, 1))


def o_to_kit(w, c):
    """o_proj (W, Nh*H) -> attn_vec_einsum (Nh, H, W)."""
    return w.T.reshape(c.llm.num_heads, -1, w.shape[0])


def o_to_hf(o, c):
    return (o.reshape(-1, o.shape[-1]).T,)


def gating_to_kit(gate, up, c):
    """gate_proj, up_proj (F, W) each -> gating_einsum (2, W, F); [0] gate (GELU), [1] up."""
    return np.stack([gate.T, up.T])


def gating_to_hf(g, c):
    return (g[0].T, g[1].T)


def embed_to_kit(w, c):
    """(R, W) HF rows -> (V, W): drop <image> and the padding rows."""
    return w[: c.llm.vocab_size]


def embed_to_hf(table, c):
    """(V, W) -> (R, W), R = V + 1 rounded up to 64; new rows = the mean row.

    The mean keeps the extra rows inert and deterministic (transformers'
    converters draw them from a Gaussian fitted to the table instead). Row V
    is ``<image>``, which transformers replaces by image features anyway.
    """
    extra = hf_rows(table.shape[0]) - table.shape[0]
    mean = table.astype(np.float32).mean(axis=0, keepdims=True).astype(table.dtype)
    return (np.concatenate([table, np.repeat(mean, extra, axis=0)]),)


def hf_rows(vocab: int) -> int:
    """transformers' embedding rows for a kit vocabulary: 257152 -> 257216."""
    return -(-(vocab + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


class Rule(NamedTuple):
    """One big_vision key and the HF tensors it is made of (``{i}`` = layer)."""

    kit: str
    hf: tuple[str, ...]
    to_kit: Callable
    to_hf: Callable


def rules(config: PaliGemmaConfig) -> list[Rule]:
    """The mapping table: big_vision key <- HF tensor(s), per family."""
    enc, vl = "img/Transformer/encoderblock", "vision.encoder.layers.{i}"
    att = f"{enc}/MultiHeadDotProductAttention_0"
    rules = [
        Rule("img/embedding/kernel", ("vision.embeddings.patch_embedding.weight",), patch_to_kit, patch_to_hf),
        Rule("img/embedding/bias", ("vision.embeddings.patch_embedding.bias",), copy_to_kit, copy_to_hf),
        Rule("img/pos_embedding", ("vision.embeddings.position_embedding.weight",), posemb_to_kit, posemb_to_hf),
        Rule(f"{enc}/LayerNorm_0/scale", (f"{vl}.layer_norm1.weight",), copy_to_kit, copy_to_hf),
        Rule(f"{enc}/LayerNorm_0/bias", (f"{vl}.layer_norm1.bias",), copy_to_kit, copy_to_hf),
        Rule(f"{att}/query/kernel", (f"{vl}.self_attn.q_proj.weight",), vit_qkv_to_kit, vit_qkv_to_hf),
        Rule(f"{att}/query/bias", (f"{vl}.self_attn.q_proj.bias",), vit_qkv_bias_to_kit, vit_qkv_bias_to_hf),
        Rule(f"{att}/key/kernel", (f"{vl}.self_attn.k_proj.weight",), vit_qkv_to_kit, vit_qkv_to_hf),
        Rule(f"{att}/key/bias", (f"{vl}.self_attn.k_proj.bias",), vit_qkv_bias_to_kit, vit_qkv_bias_to_hf),
        Rule(f"{att}/value/kernel", (f"{vl}.self_attn.v_proj.weight",), vit_qkv_to_kit, vit_qkv_to_hf),
        Rule(f"{att}/value/bias", (f"{vl}.self_attn.v_proj.bias",), vit_qkv_bias_to_kit, vit_qkv_bias_to_hf),
        Rule(f"{att}/out/kernel", (f"{vl}.self_attn.out_proj.weight",), vit_out_to_kit, vit_out_to_hf),
        Rule(f"{att}/out/bias", (f"{vl}.self_attn.out_proj.bias",), copy_to_kit, copy_to_hf),
        Rule(f"{enc}/LayerNorm_1/scale", (f"{vl}.layer_norm2.weight",), copy_to_kit, copy_to_hf),
        Rule(f"{enc}/LayerNorm_1/bias", (f"{vl}.layer_norm2.bias",), copy_to_kit, copy_to_hf),
        Rule(f"{enc}/MlpBlock_0/Dense_0/kernel", (f"{vl}.mlp.fc1.weight",), dense_to_kit, dense_to_hf),
        Rule(f"{enc}/MlpBlock_0/Dense_0/bias", (f"{vl}.mlp.fc1.bias",), copy_to_kit, copy_to_hf),
        Rule(f"{enc}/MlpBlock_0/Dense_1/kernel", (f"{vl}.mlp.fc2.weight",), dense_to_kit, dense_to_hf),
        Rule(f"{enc}/MlpBlock_0/Dense_1/bias", (f"{vl}.mlp.fc2.bias",), copy_to_kit, copy_to_hf),
        Rule("img/Transformer/encoder_norm/scale", ("vision.post_layernorm.weight",), copy_to_kit, copy_to_hf),
        Rule("img/Transformer/encoder_norm/bias", ("vision.post_layernorm.bias",), copy_to_kit, copy_to_hf),
        Rule("img/head/kernel", ("projector.linear.weight",), dense_to_kit, dense_to_hf),
        Rule("img/head/bias", ("projector.linear.bias",), copy_to_kit, copy_to_hf),
        # --- the language model
        Rule("llm/embedder/input_embedding", ("text.embed_tokens.weight",), embed_to_kit, embed_to_hf),
        Rule("llm/final_norm/scale", ("text.norm.weight",), copy_to_kit, copy_to_hf),
    ]  # fmt: skip
    tl = "text.layers.{i}"
    rules += [
        Rule("llm/layers/attn/q_einsum/w", (f"{tl}.self_attn.q_proj.weight",), q_to_kit, q_to_hf),
        Rule("llm/layers/attn/kv_einsum/w", (f"{tl}.self_attn.k_proj.weight", f"{tl}.self_attn.v_proj.weight"), kv_to_kit, kv_to_hf),
        Rule("llm/layers/attn/attn_vec_einsum/w", (f"{tl}.self_attn.o_proj.weight",), o_to_kit, o_to_hf),
        Rule("llm/layers/mlp/gating_einsum", (f"{tl}.mlp.gate_proj.weight", f"{tl}.mlp.up_proj.weight"), gating_to_kit, gating_to_hf),
        Rule("llm/layers/mlp/linear", (f"{tl}.mlp.down_proj.weight",), dense_to_kit, dense_to_hf),
    ]  # fmt: skip
    norms = GEMMA2_NORMS if config.llm.post_norms else GEMMA1_NORMS
    for kit, hf in norms.items():
        rules.append(
            Rule(f"llm/layers/{kit}/scale", (f"{tl}.{hf}.weight",), copy_to_kit, copy_to_hf)
        )
    return rules


def layered(rule: Rule) -> bool:
    """True for a per-layer rule (its HF names hold ``{i}``; the kit array is ``[L, ...]``)."""
    return "{i}" in rule.hf[0]


def depth(rule: Rule, config: PaliGemmaConfig) -> int:
    """L, the number of layers a per-layer rule's kit array stacks."""
    return config.vision.depth if rule.kit.startswith("img/") else config.llm.depth


@functools.lru_cache(maxsize=8)
def _kit_shapes(config: PaliGemmaConfig) -> dict[str, jax.ShapeDtypeStruct]:
    from ..model import param_shapes

    return flatten(param_shapes(config))


def hf_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name (short form, per layer) -> its shape under ``config``."""
    kit = _kit_shapes(config)
    out = {}
    for rule in rules(config):
        if rule.kit == "llm/embedder/input_embedding":
            out[rule.hf[0]] = (hf_rows(config.llm.vocab_size), config.llm.width)
            continue
        one = kit[rule.kit]
        if layered(rule):
            one = jax.ShapeDtypeStruct(one.shape[1:], one.dtype)
        hf = jax.eval_shape(lambda a, r=rule: r.to_hf(a, config), one)
        for i in range(depth(rule, config) if layered(rule) else 1):
            for name, s in zip(rule.hf, hf):
                out[name.format(i=i)] = tuple(s.shape)
    return out
