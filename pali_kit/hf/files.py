"""The safetensors files of a transformers folder: find, read, write.

Reading goes through the ``safetensors`` library (numpy backend: no torch; bf16
comes back as ``ml_dtypes.bfloat16``), which also checks that a file is whole.
Writing streams one tensor at a time into the library's format instead of
calling ``safetensors.numpy.save_file``: that one takes a dict of finished
arrays, so every transformers-layout tensor of a shard (up to 5 GB) would be in
memory next to the params, where streaming holds one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from ..atomic import atomic_write
from ..checkpoints import CheckpointError
from .mapping import IGNORED, short_name

SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _open(path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a complete safetensors file ({e}): download it again"
        ) from None


def read_header(path) -> dict[str, dict]:
    """Name -> ``{"dtype": "BF16", "shape": [...]}`` for every tensor of a .safetensors file."""
    with _open(path) as f:
        return {
            key: {
                "dtype": f.get_slice(key).get_dtype(),
                "shape": list(f.get_slice(key).get_shape()),
            }
            for key in f.keys()
        }


class Tensor(NamedTuple):
    file: Path
    key: str  # the name stored in the file
    shape: tuple[int, ...]
    dtype: np.dtype


class SafetensorsFolder:
    """Every tensor of a transformers folder by short name (``text.norm.weight``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tensors: dict[str, Tensor] = {}
        self._open: dict[Path, object] = {}
        for file in weight_files(folder):
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
        self.tensors[short] = Tensor(file, key, tuple(info["shape"]), dtype)

    def read(self, short: str) -> np.ndarray:
        """The whole tensor; bf16 comes back as ml_dtypes.bfloat16."""
        t = self.tensors[short]
        return self._handle(t.file).get_tensor(t.key)

    def read_rows(self, short: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor, without reading the rest."""
        t = self.tensors[short]
        return self._handle(t.file).get_slice(t.key)[start:stop]

    def _handle(self, file: Path):
        if file not in self._open:
            self._open[file] = _open(file)
        return self._open[file]

    def close(self):
        self._open.clear()


def weight_files(folder: Path) -> list[Path]:
    """The .safetensors files of a folder: those its index lists, else all of them."""
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


class Pending(NamedTuple):
    """A tensor to write: its header entry now, its bytes when its turn comes."""

    name: str  # the name written to the file
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: Path, tensors: Iterable[Pending]) -> None:
    """Stream tensors into a .safetensors file (atomically): header, then each array's bytes.

    The format: 8-byte little-endian header length, the JSON header (name ->
    dtype, shape, data_offsets counted from the end of the header; padded with
    spaces so the data starts 8-byte aligned), then the raw little-endian data.
    Only one made tensor is in memory at a time.
    """
    tensors = list(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            array = np.ascontiguousarray(t.make(), dtype=t.dtype)
            if array.shape != t.shape:
                raise AssertionError(f"{t.name}: made {array.shape}, header says {t.shape}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
