"""Hugging Face (transformers) PaliGemma folders <-> the big_vision parameter tree.

    params, config = load_hf("paligemma2-3b-pt-224/")   # config.json + *.safetensors
    export_hf(model, "my-export/")                       # transformers can load the folder

One concern per module:

- ``mapping``: which HF tensor feeds which big_vision key and how its axes move
  (one ``*_to_kit`` / ``*_to_hf`` function pair per tensor family, the
  ``rules`` table, HF names and shapes);
- ``config``: ``config.json`` <-> ``PaliGemmaConfig``;
- ``files``: the safetensors files (read through the ``safetensors`` library,
  written one tensor at a time, atomically);
- ``load`` / ``export``: ``load_hf`` and ``export_hf``, which put them together.

The names below are re-exported so that ``pali_kit.hf.load_hf`` and friends
keep working.
"""

from __future__ import annotations

from .config import config_from_hf, hf_config, named_variant
from .export import SHARD_BYTES, export_hf
from .files import SAFETENSORS_DTYPES, SafetensorsFolder, Tensor, read_header
from .load import load_hf
from .mapping import (
    EXPORT_PREFIXES,
    GEMMA1_NORMS,
    GEMMA2_NORMS,
    PREFIXES,
    ROW_MULTIPLE,
    Rule,
    copy_to_hf,
    copy_to_kit,
    dense_to_hf,
    dense_to_kit,
    embed_to_hf,
    embed_to_kit,
    export_name,
    gating_to_hf,
    gating_to_kit,
    hf_rows,
    hf_shapes,
    kv_to_hf,
    kv_to_kit,
    o_to_hf,
    o_to_kit,
    patch_to_hf,
    patch_to_kit,
    posemb_to_hf,
    posemb_to_kit,
    q_to_hf,
    q_to_kit,
    rules,
    short_name,
    vit_out_to_hf,
    vit_out_to_kit,
    vit_qkv_bias_to_hf,
    vit_qkv_bias_to_kit,
    vit_qkv_to_hf,
    vit_qkv_to_kit,
)

__all__ = [
    "EXPORT_PREFIXES", "GEMMA1_NORMS", "GEMMA2_NORMS", "PREFIXES", "ROW_MULTIPLE",
    "SAFETENSORS_DTYPES", "SHARD_BYTES", "Rule", "SafetensorsFolder", "Tensor", "config_from_hf",
    "copy_to_hf", "copy_to_kit", "dense_to_hf", "dense_to_kit", "embed_to_hf", "embed_to_kit",
    "export_hf", "export_name", "gating_to_hf", "gating_to_kit", "hf_config", "hf_rows",
    "hf_shapes", "kv_to_hf", "kv_to_kit", "load_hf", "named_variant", "o_to_hf", "o_to_kit",
    "patch_to_hf", "patch_to_kit", "posemb_to_hf", "posemb_to_kit", "q_to_hf", "q_to_kit",
    "read_header", "rules", "short_name", "vit_out_to_hf", "vit_out_to_kit",
    "vit_qkv_bias_to_hf", "vit_qkv_bias_to_kit", "vit_qkv_to_hf", "vit_qkv_to_kit",
]  # fmt: skip
