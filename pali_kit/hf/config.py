"""config.json <-> PaliGemmaConfig: what transformers calls each size, and its defaults."""

from __future__ import annotations

import dataclasses
import math
import re

from ..checkpoints import CheckpointError
from ..configs import GEMMA_VARIANTS, VOCAB_SIZE, GemmaConfig, PaliGemmaConfig, VisionConfig
from .files import Tensor
from .mapping import hf_rows


def _first(d: dict, *names, default=None):
    """The value of the first of ``names`` that ``d`` holds and is not None, else ``default``."""
    for name in names:
        if d.get(name) is not None:
            return d[name]
    return default


def config_from_hf(hf: dict, tensors: dict[str, Tensor], where: str) -> PaliGemmaConfig:
    """A transformers PaliGemma config.json (as a dict) -> PaliGemmaConfig.

    Sizes the file states are taken as stated (and checked against the tensors
    later); sizes it omits come from the tensor shapes. Softcaps: ``null`` or
    absent final softcap -> 0.0 (off); the attention softcap is transformers'
    default (50 for Gemma 2) when absent and 0.0 when ``null``.
    """
    if hf.get("model_type", "paligemma") != "paligemma":
        raise CheckpointError(f"{where}: model_type is {hf['model_type']!r}, not 'paligemma'")
    text, vis = hf.get("text_config") or {}, hf.get("vision_config") or {}
    shape = {name: t.shape for name, t in tensors.items()}

    def need(name):
        if name not in shape:
            raise CheckpointError(f"{where}: no tensor {name}: is this a PaliGemma folder?")
        return shape[name]

    model_type = text.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2"):
        raise CheckpointError(
            f"{where}: text_config.model_type is {model_type!r}; pali_kit reads PaliGemma 1 "
            "(gemma) and PaliGemma 2 (gemma2)"
        )
    gemma2 = model_type == "gemma2"
    rows, width = need("text.embed_tokens.weight")
    image_token = _first(hf, "image_token_index", "image_token_id")
    vocab = min(image_token, rows) if image_token is not None else min(VOCAB_SIZE, rows)
    head_dim = _first(text, "head_dim", default=256)
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: rope_type {rope['rope_type']!r} is not supported")
    llm = dict(
        width=_first(text, "hidden_size", default=width),
        depth=_first(text, "num_hidden_layers", default=_count_layers(shape, "text.layers.")),
        mlp_dim=_first(text, "intermediate_size", default=need("text.layers.0.mlp.gate_proj.weight")[0]),
        num_heads=_first(text, "num_attention_heads", default=need("text.layers.0.self_attn.q_proj.weight")[0] // head_dim),
        num_kv_heads=_first(text, "num_key_value_heads", default=need("text.layers.0.self_attn.k_proj.weight")[0] // head_dim),
        head_dim=head_dim,
        vocab_size=vocab,
        norm_eps=float(_first(text, "rms_norm_eps", default=1e-6)),
        rope_base=float(_first(text, "rope_theta", default=rope.get("rope_theta", 10_000.0))),
        post_norms=gemma2,
        final_logits_softcap=float(_first(text, "final_logit_softcapping", default=0.0)),
    )  # fmt: skip
    if gemma2:
        attn_cap = text.get("attn_logit_softcapping", 50.0)
        llm["attn_logits_softcap"] = float(attn_cap or 0.0)
        llm["query_pre_attn_norm"] = _query_norm(text.get("query_pre_attn_scalar", 256), llm, where)
    try:
        llm = named_variant(GemmaConfig(variant="custom", **llm))
    except ValueError as e:  # e.g. heads not a multiple of kv heads
        raise CheckpointError(f"{where}/config.json: text_config is inconsistent: {e}") from None

    tokens = need("vision.embeddings.position_embedding.weight")[0]
    patch_shape = need("vision.embeddings.patch_embedding.weight")
    patch = _first(vis, "patch_size", default=patch_shape[-1])
    vision = VisionConfig(  # no checks in __post_init__: the tensor shapes check it
        width=_first(vis, "hidden_size", default=patch_shape[0]),
        depth=_first(
            vis, "num_hidden_layers", default=_count_layers(shape, "vision.encoder.layers.")
        ),
        mlp_dim=_first(
            vis, "intermediate_size", default=need("vision.encoder.layers.0.mlp.fc1.weight")[0]
        ),
        num_heads=_first(vis, "num_attention_heads", default=16),
        patch_size=patch,
        image_size=_first(vis, "image_size", default=math.isqrt(tokens) * patch),
    )
    return PaliGemmaConfig(vision=vision, llm=llm)


def _count_layers(shape: dict, prefix: str) -> int:
    found = {int(m.group(1)) for n in shape if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
    return max(found) + 1 if found else 0


def _query_norm(scalar, llm: dict, where: str) -> str:
    if scalar == llm["head_dim"]:
        return "rsqrt_head_dim"
    if scalar == llm["width"] // llm["num_heads"]:
        return "rsqrt_emb_per_head"
    raise CheckpointError(
        f"{where}: query_pre_attn_scalar={scalar} is neither head_dim ({llm['head_dim']}) nor "
        f"hidden_size / num_attention_heads ({llm['width'] // llm['num_heads']})"
    )


def named_variant(llm: GemmaConfig) -> GemmaConfig:
    """Give a known architecture its big_vision name (gemma_2b, gemma2_9b, ...)."""
    arch = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "post_norms",
            "query_pre_attn_norm")  # fmt: skip
    for name, known in GEMMA_VARIANTS.items():
        if all(getattr(known, f) == getattr(llm, f) for f in arch):
            return dataclasses.replace(llm, variant=name)
    return llm


def summary(config: PaliGemmaConfig) -> str:
    """The sizes of ``config`` in transformers' words, for error messages."""
    c, v = config.llm, config.vision
    return (
        f"text: hidden {c.width}, layers {c.depth}, heads {c.num_heads}, kv heads "
        f"{c.num_kv_heads}, head_dim {c.head_dim}, mlp {c.mlp_dim}; vision: hidden {v.width}, "
        f"layers {v.depth}, mlp {v.mlp_dim}, patch {v.patch_size}, image {v.image_size}"
    )


def hf_config(config: PaliGemmaConfig, dtype: str = "float32") -> dict:
    """The config.json transformers needs for ``config`` (as the Hub repos write it).

    Disabled softcaps are written as null: transformers applies a softcap
    whenever the value is not None, and a cap of 0.0 would zero the logits.
    """
    c, v = config.llm, config.vision
    rows = hf_rows(c.vocab_size)
    special = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    text = {
        "model_type": "gemma2" if c.post_norms else "gemma",
        "hidden_size": c.width,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": rows,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base,  # transformers 4.x
        "rope_parameters": {"rope_theta": c.rope_base, "rope_type": "default"},  # 5.x
        "max_position_embeddings": 8192,
        "num_image_tokens": v.num_tokens,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "final_logit_softcapping": c.final_logits_softcap or None,
        "torch_dtype": dtype,
        **special,
    }
    if c.post_norms:
        per_head = (
            c.width // c.num_heads if c.query_pre_attn_norm == "rsqrt_emb_per_head" else c.head_dim
        )
        text.update(
            query_pre_attn_scalar=per_head,
            attn_logit_softcapping=c.attn_logits_softcap or None,
            sliding_window=4096,  # as the Hub's PaliGemma 2 repos; see docs/differences.md
        )
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.depth,
        "num_attention_heads": v.num_heads,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_image_tokens": v.num_tokens,
        "num_channels": 3,
        "projection_dim": c.width,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
        "torch_dtype": dtype,
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": c.vocab_size,
        "vocab_size": rows,
        "hidden_size": c.width,
        "projection_dim": c.width,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        **special,
    }
