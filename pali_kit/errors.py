"""The kit's own exceptions, and the small checks that raise them at the public boundary.

Every mistake a user can make with a public call ends in one of these, raised
by the kit's code, with a message that names the argument, its value, what is
allowed and what to do. They subclass the built-in types, so existing
``except ValueError`` / ``except TypeError`` / ``except FileNotFoundError``
clauses keep working::

    PaliKitError                                   every error below
    ├── ArgumentError             (ValueError)     an argument's value is not allowed
    │   ├── SamplerError                           a sampler spec: "top_k(5000)", "beam(0)"
    │   ├── PromptTooLongError                     a prompt longer than text_len (never cut)
    │   ├── UnknownNameError      (also KeyError)  an unknown checkpoint name, with suggestions
    │   └── ImageError                             an input that cannot be read as an image
    ├── ArgumentTypeError         (TypeError)      an argument of the wrong type or name
    ├── CheckpointError           (ValueError)     a checkpoint unusable as it is
    ├── MissingFileError          (FileNotFoundError)
    ├── ExportFolderError         (FileExistsError) export-hf would overwrite other files
    └── NoTokenizerError          (RuntimeError)    a model loaded without a tokenizer

``pk.images.ImageError`` and ``pk.CheckpointError`` are the same classes as
here. Two more live beside their code and are PaliKitErrors too:
``pali_kit.data.DataError`` (a ValueError: bad dataset lines) and
``pali_kit.hub.KaggleAuthError`` (a RuntimeError: no credentials, licence).

The catalogue of bad inputs and what the user sees is ``docs/errors.md``.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

import numpy as np

__all__ = [
    "PaliKitError",
    "ArgumentError",
    "ArgumentTypeError",
    "SamplerError",
    "PromptTooLongError",
    "UnknownNameError",
    "ImageError",
    "CheckpointError",
    "MissingFileError",
    "ExportFolderError",
    "NoTokenizerError",
]


class PaliKitError(Exception):
    """Base of every error the kit raises on purpose; the message says what to do."""


class ArgumentError(PaliKitError, ValueError):
    """An argument's value is not allowed (the message names it and what is allowed)."""


class ArgumentTypeError(PaliKitError, TypeError):
    """An argument of the wrong type, or a keyword the call does not take."""


class SamplerError(ArgumentError):
    """A sampler spec that cannot be used: unknown name, wrong arguments, out of range."""


class PromptTooLongError(ArgumentError):
    """A prompt with more tokens than ``text_len``; prompts are never cut silently."""


class UnknownNameError(ArgumentError, KeyError):
    """An unknown name (a checkpoint, ...); also a KeyError, for older ``except`` clauses."""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class ImageError(ArgumentError):
    """An input that pali_kit cannot read as an image; the message says what to do."""


class CheckpointError(PaliKitError, ValueError):
    """A checkpoint that cannot be used as it is; the message says why and what to do."""


class MissingFileError(PaliKitError, FileNotFoundError):
    """A file or folder that does not exist."""


class ExportFolderError(PaliKitError, FileExistsError):
    """An export target that holds other files (or is a file); nothing was written."""


class NoTokenizerError(PaliKitError, RuntimeError):
    """Text in or out, but the model has no tokenizer; the message says how to add one."""


# --- checks used at the top of public calls ----------------------------------------------


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'a' or 'b'?)', or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=2 * n, cutoff=0.6)
    if not close:
        return ""
    close = sorted(close, key=lambda c: _edit_distance(str(name), c))[:n]  # stable: ties keep order
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), for ranking suggestions."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def check_keywords(where: str, kw: dict, allowed: Iterable[str]) -> None:
    """Refuse keywords a public call does not take, naming the call and its keywords."""
    allowed = sorted(allowed)
    for name in kw:
        raise ArgumentTypeError(
            f"{where}() got an unexpected keyword {name}={short_repr(kw[name])}{did_you_mean(name, allowed)}; "
            f"it takes: {', '.join(allowed)}"
        )


def check_int(value, name: str, where: str, *, low: int | None = None,
              high: int | None = None, fix: str = "") -> int:  # fmt: skip
    """A Python or numpy integer (not bool, not float) in [low, high] -> int."""
    allowed = _int_range(low, high)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(
            f"{where}: {name}={short_repr(value)} ({type(value).__name__}) must be an int"
            + (f" {allowed}" if allowed else "")
            + (f"; {fix}" if fix else "")
        )
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ArgumentError(
            f"{where}: {name}={value} is out of range: it must be an int {allowed}"
            + (f"; {fix}" if fix else "")
        )
    return value


def positive_int(value, name: str) -> int:
    """A Python or numpy integer >= 1 (not bool) -> int; else ArgumentError (a ValueError)
    ``"<name> must be a positive int, got <value>"``. For sizes such as ``batch_size``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_bool(value, name: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(
            f"{where}: {name}={short_repr(value)} must be True or False, not a {type(value).__name__}"
        )
    return bool(value)


def check_float_dtype(value, name: str, where: str, *, allow_none: bool = True):
    """A floating dtype (name, numpy or jax dtype) -> numpy dtype; None stays None."""
    import jax.numpy as jnp

    if value is None and allow_none:
        return None
    allowed = "float32, bfloat16 or float16"
    try:
        dtype = jnp.dtype(value)
    except Exception:
        raise ArgumentError(
            f"{where}: {name}={short_repr(value)} is not a dtype; use {allowed}"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
        raise ArgumentError(
            f"{where}: {name}={short_repr(value)} ({dtype.name}) is not a float dtype: "
            f"values would be rounded to integers; use {allowed}"
        )
    return dtype


def _int_range(low, high) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def short_repr(value, limit: int = 60) -> str:
    """repr(value), shortened: arrays by shape and dtype, long text cut."""
    if not isinstance(value, type) and hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<{type(value).__name__} shape {tuple(value.shape)} {value.dtype}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
