"""The Flax model: SigLIP image encoder, Gemma 1/2 decoder, and PaliGemma around them."""

from .cpu import cpu_layout, inference_params
from .gemma import Gemma, KVCache
from .paligemma import (
    PaliGemma,
    count_params,
    init_params,
    make_attn_mask,
    param_shapes,
    positions_from_mask,
)
from .siglip import SigLIP

__all__ = [
    "Gemma", "KVCache", "PaliGemma", "SigLIP", "count_params", "cpu_layout", "inference_params",
    "init_params",
    "make_attn_mask", "param_shapes", "positions_from_mask",
]  # fmt: skip
