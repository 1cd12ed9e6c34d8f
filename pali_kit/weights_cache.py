"""An opt-in on-disk copy of a checkpoint's weights in the CPU inference layout.

    model = pk.load("paligemma-3b-pt-224.bf16.npz", weights_cache=True)   # or PALI_KIT_WEIGHTS_CACHE=1

A half-precision ``.npz`` is read on CPU straight into the CPU inference layout
(``checkpoints.load_cpu_inference``): every array is new memory, filled from the
file. With the cache on, the first load also writes those filled arrays to one
file (a second copy of the weights on disk, e.g. 5.85 GB for PaliGemma 3B in
bfloat16); every later process maps that file instead of reading the ``.npz``:
its arrays reach JAX without a copy, served from the page cache, and several
processes share those pages.

One file per checkpoint (named after the checkpoint's resolved path), laid out as

    b"PKWCACHE" | u64 little-endian n | n bytes of JSON manifest | zeros up to the next
    multiple of ALIGN bytes | the arrays, each at a multiple of ALIGN bytes

The manifest records the checkpoint the arrays came from (resolved path, size,
mtime_ns, inode), the layout (``LAYOUT``: a version and the CPU layout's
constants), and per array its key, shape, dtype, offset, byte count and CRC-32.
A cache whose checkpoint or layout changed, or that is truncated, unreadable or
fails a CRC-32, is ignored with a warning and written again; it is never
trusted. The file is written atomically (``atomic.atomic_write``) and mapped
copy-on-write: nothing the process does to its arrays reaches the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np

from .atomic import atomic_write
from .errors import ArgumentTypeError
from .model import cpu

try:  # ISA-L's CRC-32: the same values as zlib's, several times faster (as checkpoints.py;
    from isal.isal_zlib import crc32  # not imported from there: checkpoints imports this module)
except ImportError:
    from zlib import crc32

ENV = "PALI_KIT_WEIGHTS_CACHE"
MAGIC = b"PKWCACHE"
ALIGN = 4096  # bytes: every array starts on a page (JAX adopts >= 64-byte-aligned memory)
FORMAT = 1  # of the file itself
# What the stored bytes mean: bump VERSION whenever the (out, in) block arrangement the
# .npz reader writes (``cpu.out_in_blocks``) changes in a way these constants don't show.
LAYOUT = {
    "version": 1,
    "block": cpu.BLOCK,
    "group_axes": dict(cpu.GROUP_AXES),
    "blocked": ["/".join(p) for p in cpu.IN_PLACE_LEAVES],
}
DISK_MARGIN = 1 << 28  # bytes left free on the disk after writing a cache
# Check every array's CRC-32 when mapping. With ISA-L this pass also faults the whole
# mapping in from the page cache: 0.23 s for PaliGemma 3B bfloat16 (5.85 GB), 0.06 s
# without it (the pages then come during the first forward pass). MAP_POPULATE is not
# used: on a copy-on-write mapping it faults every page in for writing, i.e. copies the
# whole file into new memory (3.5 s and 5.8 GB of it in the same measurement).
VERIFY = True

_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    **{n: np.dtype(n) for n in ("float16", "float32", "float64", "int8", "int16", "int32",
                                "int64", "uint8", "uint16", "uint32", "uint64", "bool")},
}  # fmt: skip


class CacheWarning(UserWarning):
    """A weights cache that could not be used or written (the load itself goes on)."""


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/pali_kit/weights`` (``~/.cache/pali_kit/weights``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pali_kit" / "weights"


def resolve_dir(weights_cache, where: str = "pk.load") -> Path | None:
    """``pk.load``'s ``weights_cache=`` -> the cache folder, or None (off).

    None: the environment variable ``PALI_KIT_WEIGHTS_CACHE`` decides (unset, empty
    or ``"0"``: off; ``"1"``: ``default_dir()``; anything else: that folder).
    True: ``default_dir()``. False: off. A str or path: that folder.
    """
    if weights_cache is None:
        value = os.environ.get(ENV, "")
        if value in ("", "0"):
            return None
        return default_dir() if value == "1" else Path(value).expanduser()
    if weights_cache is True:
        return default_dir()
    if weights_cache is False:
        return None
    if isinstance(weights_cache, (str, os.PathLike)) and str(weights_cache):
        return Path(weights_cache).expanduser()
    raise ArgumentTypeError(
        f"{where}: weights_cache={weights_cache!r}: pass True (the default folder "
        f"{default_dir()}), a folder path, False (off), or None (the {ENV} variable decides)"
    )


def cache_file(folder: Path, source) -> Path:
    """Where the cache of the checkpoint ``source`` lives in ``folder``."""
    resolved = Path(source).resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return Path(folder) / f"{resolved.stem}-{tag}.weights"


def _identity(source) -> dict:
    st = Path(source).stat()
    return {
        "path": str(Path(source).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
    }


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# --- reading ---------------------------------------------------------------------------


class _Stale(Exception):
    """The cache is unusable: the message says why."""


def read(folder: Path, source, dtype: np.dtype | None):
    """``{key: array}`` of numpy arrays on a copy-on-write mapping of the cache of
    ``source``, as ``checkpoints.load_cpu_inference`` fills them: each in its official
    shape (e.g. ``llm/layers/mlp/linear`` (L, F, W)), the ``cpu.IN_PLACE_LEAVES``
    matrices holding their (out, in) blocks (``cpu.out_in_blocks``), or None: no cache (quietly), or an
    unusable one (with a ``CacheWarning``). ``dtype``: the dtype asked for (None:
    as stored); a cache of another dtype is not used.
    """
    path = cache_file(folder, source)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(f"cannot open the weights cache {path} ({e}); reading {source}")
        return None
    try:
        with f:
            manifest = _read_manifest(f, path)
            if dtype is not None and manifest.get("dtype") != np.dtype(dtype).name:
                return None  # a cast was asked for: the .npz is read (and not cached)
            size = _data_start(f.tell() - len(MAGIC) - 8) + manifest["data_bytes"]
            _check(manifest, source, dtype, os.fstat(f.fileno()).st_size, size)
            mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # copy-on-write
        arrays = _arrays(mapping, manifest, size - manifest["data_bytes"])
        if VERIFY:
            _verify(arrays, manifest)
        return arrays
    except _Stale as e:
        _warn(f"weights cache {path}: {e}; reading {source} and writing the cache again")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        _warn(f"weights cache {path} is unreadable ({type(e).__name__}: {e}); reading "
              f"{source} and writing the cache again")  # fmt: skip
    return None


def _read_manifest(f, path) -> dict:
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
        raise _Stale("not a pali_kit weights cache (bad magic bytes or truncated header)")
    (n,) = struct.unpack("<Q", head[len(MAGIC) :])
    if n > 1 << 26:
        raise _Stale(f"manifest length {n} bytes is implausible")
    text = f.read(n)
    if len(text) != n:
        raise _Stale("truncated manifest")
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Stale(f"bad manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Stale(f"manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
                     f", this kit reads {FORMAT}")  # fmt: skip
    return manifest


def _check(manifest: dict, source, dtype, file_size: int, size: int) -> None:
    if manifest.get("source") != _identity(source):
        raise _Stale(
            f"the checkpoint changed since the cache was written (was {manifest.get('source')})"
        )
    if manifest.get("layout") != LAYOUT:
        raise _Stale("written for another CPU layout (another pali_kit version)")
    if file_size != size:
        raise _Stale(f"the file has {file_size} bytes, its manifest says {size} "
                     "(truncated or overwritten)")  # fmt: skip


def _arrays(mapping: mmap.mmap, manifest: dict, start: int) -> dict:
    arrays = {}
    for entry in manifest["arrays"]:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        count, offset = int(np.prod(shape, dtype=np.int64)), int(entry["offset"])
        if (offset % ALIGN or offset < 0 or count * dtype.itemsize != entry["nbytes"]
                or offset + entry["nbytes"] > manifest["data_bytes"]):  # fmt: skip
            raise _Stale(f"{entry['key']}: offset/size out of place in the manifest")
        arrays[entry["key"]] = np.frombuffer(mapping, dtype, count, start + offset).reshape(shape)
    return arrays


def _verify(arrays: dict, manifest: dict) -> None:
    want = {e["key"]: e["crc32"] for e in manifest["arrays"]}
    got = _crcs(arrays)
    bad = [k for k in arrays if got[k] != want[k]]
    if bad:
        raise _Stale(f"CRC-32 mismatch in {bad[:3]}{' ...' if len(bad) > 3 else ''} (corrupt data)")


def _bytes(a: np.ndarray):
    return a.reshape(-1).view(np.uint8)


def _crcs(arrays: dict) -> dict:
    """``{key: CRC-32 of the array's bytes}``, the arrays shared between threads."""
    return dict(zip(arrays, cpu.thread_pool().map(lambda a: crc32(_bytes(a)), arrays.values())))


def _warn(message: str) -> None:
    warnings.warn(f"pali_kit: {message}", CacheWarning, stacklevel=4)


# --- writing ---------------------------------------------------------------------------


def write(folder: Path, source, arrays: dict, dtype: np.dtype) -> Path | None:
    """Write ``{key: numpy array}`` (C-contiguous) as the cache of ``source``, atomically.

    ``dtype``: the weights' float dtype (what ``read`` matches a ``dtype=`` against).
    Skipped with a ``CacheWarning`` (and None returned) when the folder cannot be
    made or the disk lacks the room (the file's size plus ``DISK_MARGIN``); a failed
    write leaves no file behind (nor touches an older cache of that name).
    """
    path = cache_file(folder, source)
    arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
    crcs = _crcs(arrays)
    entries, data_bytes = [], 0
    for key, a in arrays.items():
        entries.append({"key": key, "shape": list(a.shape), "dtype": a.dtype.name,
                        "offset": data_bytes, "nbytes": a.nbytes, "crc32": crcs[key]})  # fmt: skip
        data_bytes = _round_up(data_bytes + a.nbytes)
    manifest = {"format": FORMAT, "source": _identity(source), "layout": LAYOUT,
                "dtype": np.dtype(dtype).name, "arrays": entries, "data_bytes": data_bytes}  # fmt: skip
    text = json.dumps(manifest).encode("utf-8")
    start = _data_start(len(text))
    size = start + data_bytes
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        _warn(f"cannot use the weights cache folder {folder} ({e}); no cache written")
        return None
    if free < size + DISK_MARGIN:
        _warn(f"not enough free disk for the weights cache in {folder}: it needs "
              f"{(size + DISK_MARGIN) / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; no cache "
              "written (free some space, or choose another folder with weights_cache=)")  # fmt: skip
        return None
    try:
        with atomic_write(path) as out:
            head = MAGIC + struct.pack("<Q", len(text)) + text
            out.write(head + b"\0" * (start - len(head)))
            at = 0
            for e in entries:
                out.write(b"\0" * (e["offset"] - at))
                out.write(memoryview(_bytes(arrays[e["key"]])))
                at = e["offset"] + e["nbytes"]
            out.write(b"\0" * (data_bytes - at))
    except OSError as e:
        _warn(f"could not write the weights cache {path} ({e}); no cache written")
        return None
    return path


def _data_start(manifest_bytes: int) -> int:
    """Where the arrays begin: the first multiple of ALIGN after the header."""
    return _round_up(len(MAGIC) + 8 + manifest_bytes)


def unusable(folder: Path, source, error: Exception) -> None:
    """Warn that a cache that mapped fine does not make a run tree (it is written again)."""
    _warn(f"weights cache {cache_file(folder, source)} does not fit its checkpoint "
          f"({type(error).__name__}: {error}); reading {source} and writing the cache again")  # fmt: skip
