"""Which weights train, and in which dtype: trainable masks, split/merge, casting.

- ``trainable_mask(params, "attention")`` -> (bool tree, one-line summary).
  Presets: ``"attention"`` (``llm/layers/attn/.*``, the colab), ``"llm"``,
  ``"img"``, ``"all"``; or a regex over the ``/``-joined key (full match), or
  a predicate ``(key, shape) -> bool``.
- ``split_params(params, mask)`` -> (trainable, frozen), two nested dicts
  holding only their own leaves; ``merge_params`` puts them back together.
- Dtypes: trainable weights float32 (or bfloat16, ``trainable_dtype``: updated in
  float32 and rounded back stochastically, see ``step.stochastic_round``); frozen
  ones float16 on GPUs without bfloat16 (T4, V100, P100), bfloat16 on TPUs and
  newer GPUs, float32 on CPU (``default_frozen_dtype``). The model's matmuls cast
  activations to each weight's dtype and accumulate in float32. ``cast_params``
  applies this to a tree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoints, quant
from ..devices import NO_BF16_GPUS as NO_BF16_GPUS  # noqa: F401  (re-exported by pk.train)
from ..devices import device_dtype

Params = dict[str, Any]


# ============================================================================ trainable subsets

TRAINABLE = {
    "attention": r"llm/layers/attn/.*",  # the reference colab: q, kv and output projections
    "llm": r"llm/.*",
    "img": r"img/.*",
    "all": r".*",
    "none": r"(?!)",
}


def leaf_key(path) -> str:
    """A tree path (``jax.tree_util`` keys) -> the ``/``-joined checkpoint key
    (``llm/layers/attn/q_einsum/w``): how ``trainable`` patterns and checkpoint names see a leaf."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
    return "/".join(parts)


def trainable_mask(params: Params, trainable="attention") -> tuple[Params, str]:
    """Which weights to train: a bool tree like ``params`` and a one-line summary.

    Args:
      params: the nested parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      trainable: a preset (``"attention"``, ``"llm"``, ``"img"``, ``"all"``), a
        regex that must match the whole ``/``-joined key (``"llm/layers/mlp/.*"``),
        a predicate ``(key, shape) -> bool``, or a bool tree (returned as is).
    Returns:
      ``(mask, summary)``; e.g. summary ``"368,050,176 of 3,032,094,960
      parameters trainable (12.1 %), 3 of 34 arrays: llm/layers/attn/.*"``.
    """
    if isinstance(trainable, Mapping):
        mask, what = trainable, "a given mask"
    else:
        predicate, what = _predicate(trainable)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, x: bool(predicate(leaf_key(path), tuple(x.shape))), params,
            is_leaf=quant.is_quantized,  # a QArray is one weight
        )  # fmt: skip
    flags = jax.tree.leaves(mask)
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized)]
    if len(flags) != len(sizes):
        raise ValueError("the trainable mask does not have the parameters' tree structure")
    n_train = sum(s for s, f in zip(sizes, flags) if f)
    if not any(flags) and trainable != "none":
        raise ValueError(
            f"trainable={trainable!r} matches no parameter. Keys look like "
            "'llm/layers/attn/q_einsum/w' and a regex must match a whole key "
            "(end it with '.*'); presets: " + ", ".join(TRAINABLE)
        )
    total = sum(sizes)
    summary = (
        f"{n_train:,} of {total:,} parameters trainable ({100 * n_train / max(total, 1):.1f} %), "
        f"{sum(flags)} of {len(flags)} arrays: {what}"
    )
    return mask, summary


def _predicate(trainable) -> tuple[Callable[[str, tuple], bool], str]:
    if callable(trainable):
        return trainable, getattr(trainable, "__name__", "a predicate")
    if not isinstance(trainable, str):
        raise TypeError(
            f"trainable must be a preset name, a regex, a predicate or a bool tree, "
            f"got {type(trainable).__name__}"
        )
    pattern = TRAINABLE.get(trainable, trainable)
    if pattern.startswith("/"):
        raise ValueError(f"trainable={trainable!r}: keys never start with '/' (llm/..., img/...)")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"trainable={trainable!r} is neither a preset nor a valid regex: {e}"
        ) from None
    return (lambda key, shape: regex.fullmatch(key) is not None), pattern


def split_params(params: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts holding only their own leaves."""
    flat, flags = checkpoints.flatten(params), checkpoints.flatten(mask)
    trainable = {k: v for k, v in flat.items() if flags[k]}
    frozen = {k: v for k, v in flat.items() if not flags[k]}
    return checkpoints.unflatten(trainable), checkpoints.unflatten(frozen)


def merge_params(*trees: Params) -> Params:
    """The union of nested dicts with disjoint leaves (the inverse of ``split_params``)."""
    flat = {}
    for tree in trees:
        flat.update(checkpoints.flatten(tree))
    return checkpoints.unflatten(flat)


# ============================================================================ dtypes


def default_frozen_dtype(device=None, *, cpu="float32") -> np.dtype:
    """The dtype for frozen weights on a device (default: the first JAX device).

    T4 / V100 / P100 (no bfloat16): float16. TPUs, A100, H100, L4, ...: bfloat16.
    CPU: ``cpu`` (float32 by default; "bfloat16" halves memory and is faster
    on CPUs with AVX-512 BF16).
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return checkpoints.as_dtype(cpu)
    return checkpoints.as_dtype(device_dtype(device))  # the kit's one rule per accelerator


TRAINABLE_DTYPES = ("float32", "bfloat16")


def check_trainable_dtype(trainable_dtype) -> np.dtype:
    """``trainable_dtype`` (None: float32) as a numpy dtype, or a ValueError saying what is allowed.

    float16 is refused: its range ends at 6e-8 (subnormals) and 65504, so the
    small weight gradients of a long fine-tune flush to zero unless the loss is
    scaled; bfloat16 has float32's range, and GPUs without bfloat16 arithmetic
    (T4) store it and compute in float32.
    """
    if trainable_dtype is None:
        return np.dtype(np.float32)
    try:
        dtype = checkpoints.as_dtype(trainable_dtype)
    except (ValueError, TypeError):
        dtype = None
    if dtype is None or dtype.name not in TRAINABLE_DTYPES:
        why = " (float16 gradients underflow below 6e-8)" if dtype == np.float16 else ""
        raise ValueError(
            f"trainable_dtype={trainable_dtype!r}{why}: use 'float32' (default) or 'bfloat16' "
            "(half the memory of the trainable weights and their gradients; updates are "
            "rounded stochastically)"
        )
    return dtype


def training_dtype(trainable: bool, frozen_dtype, current, trainable_dtype=np.float32) -> np.dtype:
    """The dtype a leaf of dtype ``current`` trains in: ``trainable_dtype`` (float32 by
    default) when trainable, else ``frozen_dtype``; integer leaves keep ``current``.
    The rule of ``cast_params``."""
    if not jnp.issubdtype(current, jnp.floating):
        return np.dtype(current)
    return np.dtype(trainable_dtype) if trainable else np.dtype(frozen_dtype)


def cast_params(params: Params, mask: Params, frozen_dtype=None, trainable_dtype=None) -> Params:
    """Trainable leaves to ``trainable_dtype`` (float32 or bfloat16; default float32), frozen
    ones to ``frozen_dtype`` (default: the device's).

    Quantized weights (``pali_kit.quant.QArray``) stay quantized when frozen and
    are dequantized to ``trainable_dtype`` when trainable.
    """
    frozen_dtype = checkpoints.as_dtype(frozen_dtype) or default_frozen_dtype()
    trainable_dtype = check_trainable_dtype(trainable_dtype)

    def cast(x, t):
        if isinstance(x, quant.QArray):
            return quant.dequantize(x, trainable_dtype) if t else x
        return x.astype(training_dtype(t, frozen_dtype, x.dtype, trainable_dtype))

    return jax.tree.map(cast, params, mask, is_leaf=quant.is_quantized)
