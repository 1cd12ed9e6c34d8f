"""Command-line arguments shared by ``pali-kit``'s subcommands (cli.py and cli_train.py).

``add_weight_args`` adds ``--dtype`` and ``--quantize``, the weights a subcommand loads;
``weight_dtype`` is the argparse type that checks ``--dtype`` (and ``--frozen-dtype``).
"""

from __future__ import annotations

import argparse

SCHEMES = ("int8", "int4")


def add_weight_args(p: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--quantize``: the weights a subcommand loads (see docs/quantization.md)."""
    p.add_argument("--dtype", type=weight_dtype, default=None, metavar="DTYPE",
                   help="cast the weights: float32 | bfloat16 | float16 (default: as stored)")  # fmt: skip
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="weight-only quantization of the large matrices: int8 (per channel) "
                        "or int4 (groups of 64); the float dtype they stand for is --dtype's")  # fmt: skip


def weight_dtype(text: str) -> str:
    from . import checkpoints

    if text in SCHEMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a quantization scheme, not a float dtype: pass --quantize {text}"
        )
    try:
        return checkpoints.as_dtype(text).name
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a weight dtype: use float32, bfloat16 or float16"
        ) from None


weight_dtype.__name__ = "dtype"  # argparse names the type in its messages
