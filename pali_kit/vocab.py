"""The ``<loc>`` / ``<seg>`` vocabulary: the 1152 tokens that end PaliGemma's vocabulary.

    id              piece          meaning
    V - 1152 + i    <loc{i:04d}>   a coordinate bin,            i in [0, 1024)
    V - 128 + j     <seg{j:03d}>   a code of the mask VQ-VAE,   j in [0, 128)

A box is written as four ``<loc>`` tokens **y first**: ``ymin, xmin, ymax,
xmax``; a mask as 16 ``<seg>`` tokens after them. This module owns the numbers
and the bin convention; ``tokenizer`` (normalised boxes, token ids) and
``detection`` (pixel boxes ``(x0, y0, x1, y1)``, parsing) build on it.

Bins: a coordinate ``v`` given as a fraction of the side becomes
``b = clip(round(v * scale), 0, 1023)`` (Python's round, half to even like
big_vision's ``tf.round``) and a bin decodes to ``v = b / scale``. ``scale`` is
1024 (Google's demo parser, the default) or 1023 (big_vision's RefCOCO
pipeline and segmentation evaluator); the two differ by less than 0.1 % of the
side. With 1024, encoding picks the nearest value the decoder can produce, so a
round trip moves a coordinate by at most 1/2048 of the side (1/1024 for
``v > 1023.5/1024``): at most 0.11 px at 224 px (0.22 px on the far edge), and
integer pixel boxes come back exactly after rounding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NUM_LOC = 1024  # <loc0000>..<loc1023>: coordinates in 1/1024 steps
NUM_SEG = 128  # <seg000>..<seg127>: codebook entries of the mask VQ-VAE
SEG_TOKENS_PER_MASK = 16  # a mask is 16 <seg> tokens (a 4x4 grid of codes)

LOC_RE = re.compile(r"<loc(\d{4})>")
SEG_RE = re.compile(r"<seg(\d{3})>")


def to_bin(v: float, scale: float = NUM_LOC) -> int:
    """A coordinate as a fraction of the side -> its bin ``clip(round(v * scale), 0, 1023)``."""
    return int(min(max(round(v * scale), 0), NUM_LOC - 1))


def from_bin(b: int, scale: float = NUM_LOC) -> float:
    """A bin -> the coordinate it stands for, as a fraction of the side: ``b / scale``."""
    return b / scale


def loc_text(bins: Iterable[int]) -> str:
    """Bins -> ``"<locBBBB>..."`` (for a box: ymin, xmin, ymax, xmax)."""
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg_text(codes: Iterable[int]) -> str:
    """VQ-VAE codes -> ``"<segNNN>..."``."""
    return "".join(f"<seg{c:03d}>" for c in codes)


def pieces() -> list[str]:
    """The 1152 pieces in vocabulary order: ``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg127>``."""
    return [f"<loc{i:04d}>" for i in range(NUM_LOC)] + [f"<seg{j:03d}>" for j in range(NUM_SEG)]
