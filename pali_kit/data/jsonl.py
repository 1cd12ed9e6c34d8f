"""jsonl datasets in the reference format: ``JsonlDataset``, bad lines reported as ``LineError``.

    {"image": "images/0001.png", "prefix": "caption en", "suffix": "a red circle"}

Images are read lazily when a batch is built; an unreadable image raises
``DataError`` naming the jsonl file and line. ``JsonlDataset.validate()``
opens every image up front.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import images as pimages
from .examples import DataError, Dataset, Example

ON_ERROR = ("raise", "warn", "skip")


@dataclasses.dataclass(frozen=True)
class LineError:
    """One bad line of a jsonl file: ``str()`` gives ``"train.jsonl:12: what is wrong"``."""

    path: str
    line: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def _report(errors: Sequence[LineError], what: str, on_error: str, max_listed: int) -> None:
    """Raise one DataError listing the bad lines, or warn, or stay quiet (on_error)."""
    if not errors or on_error == "skip":
        return
    listed = "\n".join(f"  {e}" for e in errors[:max_listed])
    more = len(errors) - max_listed
    listed += f"\n  ... and {more} more" if more > 0 else ""
    if on_error == "raise":
        raise DataError(
            f"{len(errors)} bad line(s) in {what}:\n{listed}\n"
            "Fix them, or pass on_error='skip' (or 'warn') to leave them out."
        )
    warnings.warn(f"skipped {len(errors)} bad line(s) in {what}:\n{listed}", stacklevel=3)


# ============================================================================ jsonl


class _BadLine(Exception):
    """Internal: what is wrong with one line."""


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), "number")


class JsonlDataset(Dataset):
    """A jsonl file in the reference format, one example per line.

        {"image": "images/0001.png", "prefix": "caption en", "suffix": "a red circle"}

    Args:
      path: the ``.jsonl`` file (UTF-8). Blank lines are ignored.
      prefix: a fixed prompt for every line (the reference colab's "caption en");
        the lines then need no ``prefix`` key, and one they have is replaced
        (it stays in ``meta``).
      image_dir: where relative image paths start; default the jsonl's folder.
        Absolute paths are used as they are.
      on_error: what to do with bad lines (invalid JSON, not an object, a
        missing key, a non-string or empty value): ``"raise"`` one DataError
        listing them (default), ``"warn"`` and leave them out, or ``"skip"``
        them quietly. ``errors`` keeps them either way.
      max_listed: at most this many bad lines are listed in a message.

    Keys other than image/prefix/suffix are kept in ``Example.meta``. Images
    are read when a batch is built; ``validate()`` checks them all now.
    """

    def __init__(
        self,
        path,
        *,
        prefix: str | None = None,
        image_dir=None,
        on_error: str = "raise",
        max_listed: int = 10,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl file not found: {self.path}")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        self.on_error = _check_on_error(on_error)
        self.max_listed = max_listed
        self.examples, self.lines, self.errors = self._read()
        _report(self.errors, str(self.path), self.on_error, max_listed)
        if not self.examples:
            raise DataError(f"{self.path}: no examples (the file has no valid lines)")

    def __repr__(self) -> str:
        return f"JsonlDataset({str(self.path)!r}, {len(self)} examples)"

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int, epoch: int = 0) -> Example:
        return self.examples[index]

    def _read(self) -> tuple[list[Example], list[int], list[LineError]]:
        examples, lines, errors = [], [], []
        for number, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                examples.append(self._parse(raw, number))
                lines.append(number)
            except _BadLine as bad:
                errors.append(LineError(str(self.path), number, str(bad)))
        return examples, lines, errors

    def _parse(self, raw: bytes, number: int) -> Example:
        """One line -> Example; raises _BadLine saying what is wrong."""
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _BadLine(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise _BadLine(f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise _BadLine(f"expected a JSON object {{...}}, got a {_json_type(row)}")
        image = _string_field(row, "image", allow_empty=False)
        if "://" in image:
            raise _BadLine(f"image {image!r} is a URL: download it and give a local path")
        suffix = _string_field(row, "suffix")
        prefix = self.prefix if self.prefix is not None else _string_field(row, "prefix")
        meta = {k: v for k, v in row.items() if k not in ("image", "suffix")}
        if self.prefix is None:
            meta.pop("prefix")
        source = f"{self.path}:{number}"
        return Example(str(self._resolve(image)), prefix, suffix, source, meta)

    def _resolve(self, image: str) -> Path:
        path = Path(image).expanduser()
        return path if path.is_absolute() else self.image_dir / path

    def validate(self) -> JsonlDataset:
        """Open (fully decode) every image now; returns self, for chaining.

        Lines whose image is missing or unreadable are handled by ``on_error``:
        listed in one DataError, or (warn/skip) removed from the dataset and
        added to ``errors``. Each distinct file is read once.
        """
        problems: dict[str, str | None] = {}
        keep, keep_lines, bad = [], [], []
        for example, line in zip(self.examples, self.lines):
            if example.image not in problems:
                problems[example.image] = _image_problem(example.image)
            problem = problems[example.image]
            if problem is None:
                keep.append(example)
                keep_lines.append(line)
            else:
                bad.append(LineError(str(self.path), line, f"image {example.image}: {problem}"))
        _report(bad, str(self.path), self.on_error, self.max_listed)
        self.examples, self.lines = keep, keep_lines
        self.errors = self.errors + bad
        if not self.examples:
            raise DataError(f"{self.path}: no example has a readable image")
        return self


def _string_field(row: dict, key: str, *, allow_empty: bool = True) -> str:
    if key not in row:
        keys = ", ".join(row) or "none"
        raise _BadLine(f"missing key {key!r} (the line has: {keys})")
    value = row[key]
    if not isinstance(value, str):
        raise _BadLine(f"{key!r} must be a string, got a {_json_type(value)}: {value!r:.40}")
    if not allow_empty and not value.strip():
        raise _BadLine(f"{key!r} is empty")
    return value


def _image_problem(path: str) -> str | None:
    """None if the file decodes as an image, else what is wrong."""
    try:
        pimages.load_image(path)
    except pimages.ImageError as error:
        return str(error)
    return None


# ============================================================================ COCO
