"""export_hf: the big_vision tree -> a folder transformers loads.

Every HF tensor is computed when its turn comes and written straight to the
file (``files.write_safetensors``), so an export needs about one tensor of
memory beyond the params themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from ..checkpoints import check_params, flatten, infer_config
from ..configs import PaliGemmaConfig
from .config import hf_config
from .files import Pending, write_json, write_safetensors
from .mapping import Rule, depth, export_name, hf_shapes, layered, rules

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


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
    write_json(folder / "config.json", hf_config(config, _dtype_name(flat)))
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


def _export_layout(flat: dict, config: PaliGemmaConfig) -> Iterator[Pending]:
    """Every HF tensor in file order, with a function that computes it."""
    shapes = hf_shapes(config)
    for rule in rules(config):
        kit = flat[rule.kit]
        for i in range(depth(rule, config) if layered(rule) else 1):
            take = _once(rule, kit, i if layered(rule) else None, config)
            for j, name in enumerate(rule.hf):
                short = name.format(i=i)
                make = lambda t=take, j=j: t(j)  # noqa: E731
                yield Pending(export_name(short), shapes[short], np.dtype(kit.dtype), make)


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


def _split(layout: list[Pending], max_bytes: int) -> list[list[Pending]]:
    shards, current, size = [], [], 0
    for t in layout:
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    return shards + [current]


def _write_shards(folder: Path, shards: list[list[Pending]]) -> list[str]:
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard)
        for t in shard:
            weight_map[t.name] = name
            total += t.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / "model.safetensors.index.json", index)
    return [*names, "model.safetensors.index.json"]


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
