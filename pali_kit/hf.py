"""Hugging Face (transformers) PaliGemma folders <-> the big_vision parameter tree.

    params, config = load_hf("paligemma2-3b-pt-224/")   # config.json + *.safetensors
    export_hf(model, "my-export/")                       # transformers can load the folder

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
``q_to_hf``, ...), and ``_rules`` is the one table that says which HF names
feed which big_vision key. Reading needs no torch: safetensors files are opened
with the numpy backend, and the stacked ``[L, ...]`` arrays are filled layer by
layer so host memory stays near one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .checkpoints import CheckpointError, as_dtype, check_params, flatten, infer_config, unflatten
from .configs import GEMMA_VARIANTS, VOCAB_SIZE, GemmaConfig, PaliGemmaConfig, VisionConfig

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
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


def _rules(config: PaliGemmaConfig) -> list[Rule]:
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


def _layered(rule: Rule) -> bool:
    return "{i}" in rule.hf[0]


def _depth(rule: Rule, config: PaliGemmaConfig) -> int:
    return config.vision.depth if rule.kit.startswith("img/") else config.llm.depth


@functools.lru_cache(maxsize=8)
def _kit_shapes(config: PaliGemmaConfig) -> dict[str, jax.ShapeDtypeStruct]:
    from .model import param_shapes

    return flatten(param_shapes(config))


def _hf_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name (short form, per layer) -> its shape under ``config``."""
    kit = _kit_shapes(config)
    out = {}
    for rule in _rules(config):
        if rule.kit == "llm/embedder/input_embedding":
            out[rule.hf[0]] = (hf_rows(config.llm.vocab_size), config.llm.width)
            continue
        one = kit[rule.kit]
        if _layered(rule):
            one = jax.ShapeDtypeStruct(one.shape[1:], one.dtype)
        hf = jax.eval_shape(lambda a, r=rule: r.to_hf(a, config), one)
        for i in range(_depth(rule, config) if _layered(rule) else 1):
            for name, s in zip(rule.hf, hf):
                out[name.format(i=i)] = tuple(s.shape)
    return out


# --- safetensors without torch ------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_header(path) -> dict:
    """The JSON header of a .safetensors file: name -> {dtype, shape, data_offsets}.

    Format: 8-byte little-endian header length N, N bytes of JSON, then the raw
    data; ``data_offsets`` count from the end of the header.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is empty or truncated: download it again")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: download it again"
            ) from None
    header.pop("__metadata__", None)
    for info in header.values():
        info["_start"] = 8 + n + info["data_offsets"][0]
    return header


def read_raw(path, info: dict) -> np.ndarray:
    """One tensor straight from the bytes (any safetensors version, bf16 included)."""
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    count = math.prod(info["shape"])
    a = np.fromfile(path, dtype=np.uint8, count=count * dtype.itemsize, offset=info["_start"])
    if a.size != count * dtype.itemsize:
        raise CheckpointError(f"{path} is truncated: download it again")
    return a.view(dtype).reshape(info["shape"])


class Tensor(NamedTuple):
    file: Path
    key: str  # the name stored in the file
    shape: tuple[int, ...]
    dtype: np.dtype
    info: dict


class SafetensorsFolder:
    """Every tensor of a transformers folder by short name (``text.norm.weight``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tensors: dict[str, Tensor] = {}
        self._open: dict[Path, object] = {}
        for file in _weight_files(folder):
            for key, info in read_header(file).items():
                self._add(file, key, info)

    def _add(self, file: Path, key: str, info: dict):
        if IGNORED.search(key):
            return
        short = short_name(key)
        if short is None:
            raise CheckpointError(
                f"{file.name}: unexpected tensor {key}; a PaliGemma folder has only "
                "language_model / vision_tower / multi_modal_projector / lm_head weights"
            )
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{file.name}: {key} has dtype {info['dtype']}; expected F32, BF16 or F16"
            )
        if short in self.tensors:
            raise CheckpointError(
                f"{file.name}: {key} and {self.tensors[short].key} are the same weight "
                "in two naming layouts; keep one"
            )
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        self.tensors[short] = Tensor(file, key, tuple(info["shape"]), dtype, info)

    def read(self, short: str) -> np.ndarray:
        """The whole tensor; bf16 comes back as ml_dtypes.bfloat16."""
        t = self.tensors[short]
        try:
            return self._handle(t.file).get_tensor(t.key)
        except (TypeError, ValueError):  # an old safetensors whose numpy backend lacks bf16
            return read_raw(t.file, t.info)

    def read_rows(self, short: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor, without reading the rest."""
        t = self.tensors[short]
        try:
            return self._handle(t.file).get_slice(t.key)[start:stop]
        except (TypeError, ValueError):
            return read_raw(t.file, t.info)[start:stop]

    def _handle(self, file: Path):
        if file not in self._open:
            from safetensors import safe_open

            self._open[file] = safe_open(str(file), framework="numpy")
        return self._open[file]

    def close(self):
        self._open.clear()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: the index lists {missing[0]}, which is not in the folder "
                "(an incomplete download?)"
            )
        return files
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        hint = (
            f" It has {found[0]}: pali_kit reads safetensors only (never pickles); "
            "re-save with save_pretrained(..., safe_serialization=True)."
            if found
            else ""
        )
        raise CheckpointError(f"{folder} has no model.safetensors or safetensors index.{hint}")
    return files


# --- config.json -> PaliGemmaConfig --------------------------------------------------


def _first(d: dict, *names, default=None):
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
        llm = _named_variant(GemmaConfig(variant="custom", **llm))
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


def _named_variant(llm: GemmaConfig) -> GemmaConfig:
    """Give a known architecture its big_vision name (gemma_2b, gemma2_9b, ...)."""
    arch = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "post_norms",
            "query_pre_attn_norm")  # fmt: skip
    for name, known in GEMMA_VARIANTS.items():
        if all(getattr(known, f) == getattr(llm, f) for f in arch):
            return dataclasses.replace(llm, variant=name)
    return llm


def _summary(config: PaliGemmaConfig) -> str:
    c, v = config.llm, config.vision
    return (
        f"text: hidden {c.width}, layers {c.depth}, heads {c.num_heads}, kv heads "
        f"{c.num_kv_heads}, head_dim {c.head_dim}, mlp {c.mlp_dim}; vision: hidden {v.width}, "
        f"layers {v.depth}, mlp {v.mlp_dim}, patch {v.patch_size}, image {v.image_size}"
    )


def _check_shapes(folder: SafetensorsFolder, config: PaliGemmaConfig, where: str) -> None:
    """Every tensor the config needs is there with the right shape, and no other."""
    want = _hf_shapes(config)
    have = folder.tensors
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(
                f"{where}: missing tensor {name} (config.json: {_summary(config)}). "
                "Is the folder complete and is config.json the one of these weights?"
            )
        t = have[name]
        ok = t.shape == shape
        if name == "text.embed_tokens.weight":  # any number of extra rows is fine
            ok = t.shape[1] == shape[1] and t.shape[0] >= config.llm.vocab_size
        if not ok:
            raise CheckpointError(
                f"{t.file.name}: {t.key} has shape {t.shape}, but config.json ({_summary(config)}) "
                f"implies {shape}. The config and the weights disagree: fix config.json."
            )
    extra = sorted(set(have) - set(want) - {"lm_head.weight"})
    if extra:
        t = have[extra[0]]
        raise CheckpointError(
            f"{t.file.name}: unexpected tensor {t.key}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f"; config.json describes {_summary(config)}"
        )


# --- loading ---------------------------------------------------------------------------


def load_hf(folder, dtype=None, progress: bool | None = None) -> tuple[dict, PaliGemmaConfig]:
    """Read a transformers PaliGemma 1 or 2 folder into the big_vision tree.

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` (or shards listed
        in ``model.safetensors.index.json``).
      dtype: cast floating weights to this dtype (None keeps the stored one).
      progress: show a progress bar over the arrays (default: for folders whose
        safetensors files exceed 200 MB).

    Returns:
      (params, config): params is the nested dict of jax arrays that
      ``PaliGemma(config)`` takes, exactly the tree of the official ``.npz``.
    """
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(
            f"{folder} is a file; load_hf reads a transformers folder (config.json + "
            "model.safetensors). For a big_vision .npz use checkpoints.load_params."
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"{folder} has no config.json: a transformers folder has config.json next to "
            "model.safetensors (download the whole repo, not just the weights)"
        )
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    dtype = as_dtype(dtype)
    tensors = SafetensorsFolder(folder)
    try:
        config = config_from_hf(hf_config, tensors.tensors, str(folder))
        _check_shapes(tensors, config, str(folder))
        rules = list(_rules(config))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if progress or (progress is None and size > 2e8):
            from tqdm.auto import tqdm

            rules = tqdm(rules, desc=f"loading {folder.name}", unit="array", leave=False)
        flat = {rule.kit: _load_rule(tensors, rule, config, dtype) for rule in rules}
        _check_head(tensors, config)
    finally:
        tensors.close()
    params = unflatten(flat)
    _check_config(params, config, str(folder))
    return params, config


def _load_rule(tensors: SafetensorsFolder, rule: Rule, config, dtype) -> jax.Array:
    """Build one big_vision array; a stacked one is filled layer by layer."""
    if not _layered(rule):
        parts = [tensors.read(name) for name in rule.hf]
        out = np.asarray(rule.to_kit(*parts, config), dtype or parts[0].dtype)
        return jnp.asarray(out)
    out = None
    for i in range(_depth(rule, config)):
        parts = [tensors.read(name.format(i=i)) for name in rule.hf]
        layer = rule.to_kit(*parts, config)
        if out is None:
            out = np.empty((_depth(rule, config), *layer.shape), dtype or parts[0].dtype)
        out[i] = layer
        del parts, layer
    array = jnp.asarray(out)
    del out
    return array


def _check_head(tensors: SafetensorsFolder, config: PaliGemmaConfig) -> None:
    """The kit ties the output layer to the embedding: lm_head must be absent or equal."""
    if "lm_head.weight" not in tensors.tensors:
        return
    t = tensors.tensors["lm_head.weight"]
    v, width = config.llm.vocab_size, config.llm.width
    same = t.shape[0] >= v and t.shape[1:] == (width,)
    for start in range(0, v, 8192):  # a block of rows at a time: no second full table
        if not same:
            break
        stop = min(start + 8192, v)
        head = tensors.read_rows("lm_head.weight", start, stop)
        same = np.array_equal(head, tensors.read_rows("text.embed_tokens.weight", start, stop))
    if not same:
        raise CheckpointError(
            f"{t.file.name}: {t.key} differs from the embedding. PaliGemma ties the output "
            "layer to the input embedding and so does pali_kit; an untied head cannot be loaded."
        )


def _check_config(params: dict, config: PaliGemmaConfig, where: str) -> None:
    """The safety net: the shapes give back the same architecture, and every key is there."""
    check_params(params, config, where)
    shaped = infer_config(params, where)
    fields = {
        "text hidden_size": (shaped.llm.width, config.llm.width),
        "text num_hidden_layers": (shaped.llm.depth, config.llm.depth),
        "text intermediate_size": (shaped.llm.mlp_dim, config.llm.mlp_dim),
        "text num_key_value_heads": (shaped.llm.num_kv_heads, config.llm.num_kv_heads),
        "vision hidden_size": (shaped.vision.width, config.vision.width),
        "vision image_size": (shaped.vision.image_size, config.vision.image_size),
        "vision patch_size": (shaped.vision.patch_size, config.vision.patch_size),
    }
    for name, (from_shapes, stated) in fields.items():
        if from_shapes != stated:
            raise CheckpointError(
                f"{where}: config.json {name}={stated}, the weights say {from_shapes}"
            )


# --- export ----------------------------------------------------------------------------


def export_hf(params_or_model, folder, config: PaliGemmaConfig | None = None, *,
              max_shard_bytes: int = SHARD_BYTES) -> Path:  # fmt: skip
    """Write a folder that ``PaliGemmaForConditionalGeneration.from_pretrained`` loads.

    Args:
      params_or_model: the big_vision tree (nested dict), or any object with
        ``.params`` and ``.config`` (a loaded pali_kit model).
      folder: created if needed. Files are written under temporary names and
        renamed into place, so an interrupted export never leaves a half-written
        ``model.safetensors`` or ``config.json``.
      config: the model's config (default: the object's, else inferred from shapes).
      max_shard_bytes: weights above this size are split into
        ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.

    The embedding gets transformers' extra rows (see ``embed_to_hf``); weights
    keep their dtype. Returns the folder.
    """
    params = getattr(params_or_model, "params", params_or_model)
    config = config or getattr(params_or_model, "config", None) or infer_config(params)
    check_params(params, config, "the params to export")
    _check_exportable(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    layout = list(_export_layout(flat, config))
    shards = _split(layout, max_shard_bytes)
    written = _write_shards(folder, shards)
    _write_json(folder / "config.json", hf_config(config, _dtype_name(flat)))
    _remove_stale(folder, written)
    return folder


def _check_exportable(config: PaliGemmaConfig) -> None:
    c = config.llm
    if not c.post_norms and c.attn_logits_softcap:
        raise ValueError(
            "transformers' Gemma 1 has no attention softcap; set attn_logits_softcap=0"
        )
    if not c.post_norms and c.query_scale != c.head_dim**-0.5:
        raise ValueError("transformers' Gemma 1 scales queries by head_dim ** -0.5 only")


class _Out(NamedTuple):
    name: str  # the name written to the file
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]  # computes the array when its turn comes


def _export_layout(flat: dict, config: PaliGemmaConfig) -> Iterator[_Out]:
    """Every HF tensor in file order, with a function that computes it."""
    for rule in _rules(config):
        kit = flat[rule.kit]
        dtype = np.dtype(kit.dtype)
        one = jax.ShapeDtypeStruct(kit.shape[1:] if _layered(rule) else kit.shape, kit.dtype)
        if rule.kit == "llm/embedder/input_embedding":
            shapes = [(hf_rows(config.llm.vocab_size), config.llm.width)]
        else:
            shapes = [
                tuple(s.shape) for s in jax.eval_shape(lambda a, r=rule: r.to_hf(a, config), one)
            ]
        for i in range(_depth(rule, config) if _layered(rule) else 1):
            take = _once(rule, kit, i if _layered(rule) else None, config)
            for j, (name, shape) in enumerate(zip(rule.hf, shapes)):
                yield _Out(export_name(name.format(i=i)), shape, dtype, lambda t=take, j=j: t(j))


def _once(rule: Rule, kit, layer: int | None, config) -> Callable[[int], np.ndarray]:
    """``take(j)``: the j-th HF tensor of one layer's to_hf, computed once (k and v
    come from one kv_einsum slice) and forgotten as soon as it has been taken."""
    outs: dict[int, np.ndarray] = {}

    def take(j: int) -> np.ndarray:
        if not outs:
            a = np.asarray(jax.device_get(kit if layer is None else kit[layer]))
            outs.update(enumerate(rule.to_hf(a, config)))
        return outs.pop(j)

    return take


def _split(layout: list[_Out], max_bytes: int) -> list[list[_Out]]:
    shards, current, size = [], [], 0
    for t in layout:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    return shards + [current]


def _write_shards(folder: Path, shards: list[list[_Out]]) -> list[str]:
    if len(shards) == 1:
        _write_safetensors(folder / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        _write_safetensors(folder / name, shard)
        for t in shard:
            weight_map[t.name] = name
            total += math.prod(t.shape) * t.dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / "model.safetensors.index.json", index)
    return [*names, "model.safetensors.index.json"]


def _write_safetensors(path: Path, tensors: list[_Out]) -> None:
    """Stream tensors into a .safetensors file: header first, then each array's bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with _atomic(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            array = np.ascontiguousarray(t.make(), dtype=t.dtype)
            if array.shape != t.shape:
                raise AssertionError(f"{t.name}: made {array.shape}, header says {t.shape}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array


class _atomic:
    """Open ``path`` for writing under a temporary name; rename it into place on success."""

    def __init__(self, path: Path, mode: str = "wb"):
        self.path, self.mode = path, mode
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def __enter__(self):
        self.f = open(self.tmp, self.mode)
        return self.f

    def __exit__(self, exc_type, exc, tb):
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()


def _write_json(path: Path, data: dict) -> None:
    with _atomic(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _remove_stale(folder: Path, written: list[str]) -> None:
    """Drop weights of an earlier export that the new one replaces (other files stay)."""
    stale = [folder / "model.safetensors", folder / "model.safetensors.index.json",
             *folder.glob("model-*-of-*.safetensors")]  # fmt: skip
    for path in stale:
        if path.name not in written and path.exists():
            path.unlink()


def _dtype_name(flat: dict) -> str:
    """The dtype config.json announces: the embedding's (the bulk of the weights)."""
    return np.dtype(flat["llm/embedder/input_embedding"].dtype).name


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
