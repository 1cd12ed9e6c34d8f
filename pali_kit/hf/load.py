"""load_hf: a transformers PaliGemma folder -> (params, config) in the big_vision tree.

The stacked ``[L, ...]`` arrays are filled layer by layer straight from the
files into page-aligned memory that JAX adopts without a copy, so host memory
peaks near one copy of the weights (bench/load_hf.py),
plus the file pages the safetensors library maps (clean pages the OS can drop).
Reading needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from ..checkpoints import CheckpointError, as_dtype, check_params, infer_config, unflatten
from ..configs import PaliGemmaConfig
from ..model.common import aligned_empty, to_device
from .config import config_from_hf, summary
from .files import SafetensorsFolder
from .mapping import Rule, depth, hf_shapes, layered, rules


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
        todo = list(rules(config))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if progress or (progress is None and size > 2e8):
            from tqdm.auto import tqdm

            todo = tqdm(todo, desc=f"loading {folder.name}", unit="array", leave=False)
        flat = {rule.kit: _load_rule(tensors, rule, config, dtype) for rule in todo}
        _check_head(tensors, config)
    finally:
        tensors.close()
    params = unflatten(flat)
    _check_config(params, config, str(folder))
    return params, config


def _load_rule(tensors: SafetensorsFolder, rule: Rule, config, dtype) -> jax.Array:
    """Build one big_vision array; a stacked one is filled layer by layer.

    The array is written into page-aligned memory that JAX adopts without a
    copy (as the .npz reader does), so memory peaks near one copy of the weights
    plus one layer, not two copies of the largest stack.
    """
    if not layered(rule):
        parts = [tensors.read(name) for name in rule.hf]
        value = rule.to_kit(*parts, config)
        out = aligned_empty(np.shape(value), dtype or parts[0].dtype)
        out[...] = value
        return to_device(out)
    out = None
    for i in range(depth(rule, config)):
        parts = [tensors.read(name.format(i=i)) for name in rule.hf]
        layer = rule.to_kit(*parts, config)
        if out is None:
            out = aligned_empty((depth(rule, config), *layer.shape), dtype or parts[0].dtype)
        out[i] = layer
        del parts, layer
    return to_device(out)


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


def _check_shapes(folder: SafetensorsFolder, config: PaliGemmaConfig, where: str) -> None:
    """Every tensor the config needs is there with the right shape, and no other."""
    want = hf_shapes(config)
    have = folder.tensors
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(
                f"{where}: missing tensor {name} (config.json: {summary(config)}). "
                "Is the folder complete and is config.json the one of these weights?"
            )
        t = have[name]
        ok = t.shape == shape
        if name == "text.embed_tokens.weight":  # any number of extra rows is fine
            ok = t.shape[1] == shape[1] and t.shape[0] >= config.llm.vocab_size
        if not ok:
            raise CheckpointError(
                f"{t.file.name}: {t.key} has shape {t.shape}, but config.json ({summary(config)}) "
                f"implies {shape}. The config and the weights disagree: fix config.json."
            )
    extra = sorted(set(have) - set(want) - {"lm_head.weight"})
    if extra:
        t = have[extra[0]]
        raise CheckpointError(
            f"{t.file.name}: unexpected tensor {t.key}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f"; config.json describes {summary(config)}"
        )
