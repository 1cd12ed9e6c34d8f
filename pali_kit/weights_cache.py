"""An on-disk copy of a checkpoint's weights in the CPU inference layout.

    model = pk.load("paligemma-3b-pt-224.bf16.npz")                        # on by default
    model = pk.load("paligemma-3b-pt-224.bf16.npz", weights_cache=False)   # or PALI_KIT_WEIGHTS_CACHE=0

A half-precision ``.npz`` is read on CPU straight into the CPU inference layout
(``checkpoints.load_cpu_inference``): every array is new memory, filled from the
file. With the cache on, the first load also writes those filled arrays to one
file (a second copy of the weights on disk, e.g. 5.85 GB for PaliGemma 3B in
bfloat16), on a background thread at the lowest CPU priority once the load is
done (``write_in_background``; the process waits for it before it exits); every
later process maps that file instead of reading the ``.npz``: its arrays reach
JAX without a copy, served from the page cache, and several processes share
those pages. A quantized load (``pk.load(..., quantize="int8" | "int4")``) keeps
its own file per scheme and dtype (a ``variant``: the ``QArray`` children as
quantized, ``checkpoints.load_quantized``), so a later one neither reads nor
quantizes the ``.npz``.

On by default, like JAX's compilation cache, in ``~/.cache/pali_kit/weights``;
that default cache is written only where it takes at most half of the disk's
free space (``AUTO_SHARE``), and says so in one line instead of a warning when
it is not. ``weights_cache=False`` or ``PALI_KIT_WEIGHTS_CACHE=0`` turns it off.
Writing a cache also removes, from its folder, caches whose checkpoint file is
gone and temporary files that an interrupted write left (``prune``).
``pali-kit cache`` lists the caches (``entries``), ``pali-kit cache --clear``
removes them (``clear``).

One file per checkpoint and variant (named after the checkpoint's resolved path),
laid out as

    b"PKWCACHE" | u64 little-endian n | n bytes of JSON manifest | zeros up to the next
    multiple of ALIGN bytes | the arrays, each at a multiple of ALIGN bytes

The manifest records the checkpoint the arrays came from (resolved path, size,
mtime_ns, inode, a digest of its zip directory), the variant, the layout (``LAYOUT``: a version and the CPU layout's
constants), and per array its key, shape, dtype, offset, byte count and CRC-32.
A cache whose checkpoint or layout changed, or that is truncated, unreadable or
fails a CRC-32, is ignored with a warning and written again; it is never
trusted. The file is written atomically (``atomic.atomic_write``) and mapped
copy-on-write: nothing the process does to its arrays reaches the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from . import quant
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
FORMAT = 2  # of the file itself (2: the source identity holds a digest of the zip directory)
# What the stored bytes mean: bump "version" whenever the (out, in) block arrangement the
# .npz reader writes (``cpu.out_in_blocks``), or the ``quant.QArray`` children a quantized
# load's cache (a ``variant``) holds, change in a way these constants don't show.
LAYOUT = {
    "version": 1,
    "block": cpu.BLOCK,
    "quant_group_size": quant.GROUP_SIZE,
    "group_axes": dict(cpu.GROUP_AXES),
    "blocked": ["/".join(p) for p in cpu.IN_PLACE_LEAVES],
}
DISK_MARGIN = 1 << 28  # bytes left free on the disk after writing a cache
# The default cache (no argument, no variable) takes at most this share of the free disk:
# nobody asked for it, so it never fills a disk that the user may need.
AUTO_SHARE = 0.5
STALE_TEMP_S = 3600  # a write's temporary file untouched this long was left by an interrupted write
ACTIVE_TEMP_S = 60  # one touched this recently is another process writing the same cache now
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
    or ``"1"``: ``default_dir()``; ``"0"``: off; anything else: that folder).
    True: ``default_dir()``. False: off. A str or path: that folder.
    """
    if weights_cache is None:
        value = os.environ.get(ENV, "")
        if value == "0":
            return None
        return default_dir() if value in ("", "1") else Path(value).expanduser()
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


def is_automatic(weights_cache) -> bool:
    """Whether ``weights_cache=`` leaves the cache at its default: neither the argument
    nor ``PALI_KIT_WEIGHTS_CACHE`` chose it (then ``AUTO_SHARE`` bounds what it takes)."""
    return weights_cache is None and os.environ.get(ENV, "") == ""


def cache_file(folder: Path, source, variant: str = "") -> Path:
    """Where the cache of the checkpoint ``source`` lives in ``folder`` (``variant``:
    e.g. ``"int8-stored"`` for a quantized load's, beside the plain one)."""
    resolved = Path(source).resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return Path(folder) / f"{resolved.stem}-{tag}{'.' + variant if variant else ''}.weights"


def _identity(source) -> dict:
    """What must match between a checkpoint and its cache: its path and file stat, and a
    digest of its zip directory (each member's name, size and CRC-32), which changes
    with the weights even where a rewrite brings back the size, mtime and inode."""
    st = Path(source).stat()
    digest = hashlib.sha256()
    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
    return {
        "path": str(Path(source).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "members": digest.hexdigest(),
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
    found = read_variant(folder, source, dtype, "")
    return None if found is None else found[0]


def read_variant(folder: Path, source, dtype: np.dtype | None, variant: str):
    """``read`` for the cache ``variant`` (whose name says its dtype: ``dtype`` is then
    not matched): ``(arrays, manifest)`` or None; ``manifest["quantized"]`` says which
    arrays are ``QArray`` children (see ``checkpoints.load_quantized``)."""
    path = cache_file(folder, source, variant)
    wait(path)  # this process's own write of it, if one is under way
    if not path.exists():
        return None
    try:
        identity = _identity(source)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None  # reading the checkpoint itself will say what is wrong with it
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
            if (not variant and dtype is not None
                    and manifest.get("dtype") != np.dtype(dtype).name):  # fmt: skip
                return None  # a cast was asked for: the .npz is read (and not cached)
            if manifest.get("variant", "") != variant:
                raise _Stale(f"written as {manifest.get('variant')!r}, not {variant!r}")
            size = _data_start(f.tell() - len(MAGIC) - 8) + manifest["data_bytes"]
            _check(manifest, identity, os.fstat(f.fileno()).st_size, size)
            mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # copy-on-write
        arrays = _arrays(mapping, manifest, size - manifest["data_bytes"])
        if VERIFY:
            _verify(arrays, manifest)
        return arrays, manifest
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


def _check(manifest: dict, identity: dict, file_size: int, size: int) -> None:
    if manifest.get("source") != identity:
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
    """``{key: CRC-32 of the array's bytes}``, the arrays shared between threads (one
    by one in the calling thread once the interpreter is shutting down: a background
    write that outlives the main thread, whose pools then take no new work)."""
    try:
        crcs = cpu.thread_pool().map(lambda a: crc32(_bytes(a)), arrays.values())
        return dict(zip(arrays, crcs))
    except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
        return {key: crc32(_bytes(a)) for key, a in arrays.items()}


def _warn(message: str) -> None:
    warnings.warn(f"pali_kit: {message}", CacheWarning, stacklevel=4)


# --- writing ---------------------------------------------------------------------------


def write(folder: Path, source, arrays: dict, dtype: np.dtype, *, automatic: bool = False,
          verbose: bool = False, variant: str = "", quantized: dict | None = None) -> Path | None:  # fmt: skip
    """Write ``{key: numpy array}`` (C-contiguous) as the cache of ``source``, atomically.

    ``dtype``: the weights' float dtype (what ``read`` matches a ``dtype=`` against).
    Skipped (None returned) when the folder cannot be made or the disk lacks the
    room: the file's size plus ``DISK_MARGIN``, or for the default cache
    (``automatic``) at most ``AUTO_SHARE`` of the free space. A failed write leaves
    no file behind (nor touches an older cache of that name). Skips and failures
    are ``CacheWarning`` s, or for the default cache one line on stderr when
    ``verbose``. ``variant`` and ``quantized`` (JSON): see ``read_variant``.
    The folder is pruned first (``prune``); nothing is written while
    another process writes the same cache (its temporary file touched in the last
    ``ACTIVE_TEMP_S``), e.g. several processes of one job loading one checkpoint.
    """
    plan = _plan(folder, source, arrays, dtype, automatic=automatic, verbose=verbose,
                 variant=variant, quantized=quantized)  # fmt: skip
    return None if plan is None else _commit(plan)


def _plan(folder, source, arrays, dtype, *, automatic=False, verbose=False, variant="",
          quantized=None):  # fmt: skip
    """``write``'s checks and what it says, in the calling thread: a dict for
    ``_commit`` (which computes the CRC-32s and writes), or None (skipped)."""
    path = cache_file(folder, source, variant)
    arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
    entries, data_bytes = [], 0
    for key, a in arrays.items():
        entries.append({"key": key, "shape": list(a.shape), "dtype": a.dtype.name,
                        "offset": data_bytes, "nbytes": a.nbytes, "crc32": 0})  # fmt: skip
        data_bytes = _round_up(data_bytes + a.nbytes)
    manifest = {"format": FORMAT, "source": _identity(source), "layout": LAYOUT,
                "dtype": np.dtype(dtype).name, "arrays": entries, "data_bytes": data_bytes,
                "variant": variant, "quantized": quantized or {}}  # fmt: skip
    # the size with every CRC-32 at its longest (10 digits): what the disk must hold
    size = _data_start(len(json.dumps(manifest)) + 9 * len(entries)) + data_bytes
    off = "weights_cache=False or PALI_KIT_WEIGHTS_CACHE=0 turns the cache off"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        prune(folder, keep=path)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        _report(f"cannot use the weights cache folder {folder} ({e}); no cache written"
                + (f" ({off})" if automatic else ""), automatic, verbose)  # fmt: skip
        return None
    if _being_written(path):
        _report(f"another process is writing the weights cache {path} now; not writing it "
                "twice", automatic, verbose)  # fmt: skip
        return None
    if automatic and size > AUTO_SHARE * (free - DISK_MARGIN):
        _report(f"no weights cache written: it would take {size / 1e9:.2f} GB of the "
                f"{free / 1e9:.2f} GB free in {folder} (the default cache takes at most "
                f"{AUTO_SHARE:.0%} of it; weights_cache=DIR chooses another folder, "
                "weights_cache=True insists)", automatic, verbose)  # fmt: skip
        return None
    if free < size + DISK_MARGIN:
        _report(f"not enough free disk for the weights cache in {folder}: it needs "
                f"{(size + DISK_MARGIN) / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; no cache "
                "written (free some space, or choose another folder with weights_cache=)",
                automatic, verbose)  # fmt: skip
        return None
    if verbose:
        what = (
            f"the {variant.split('-')[0]} weights" if variant else "the weights in the CPU layout"
        )
        print(f"pali_kit: writing {what} to {path} ({size / 1e9:.2f} GB"
              f"); later processes map it instead of reading {Path(source).name} ({off})",
              file=sys.stderr)  # fmt: skip
    return {"path": path, "arrays": arrays, "manifest": manifest, "automatic": automatic,
            "verbose": verbose}  # fmt: skip


def _commit(plan: dict) -> Path | None:
    """The CRC-32s into the manifest, then the file written (atomically): its path, or
    None (a failed write, reported)."""
    path, arrays, manifest = plan["path"], plan["arrays"], plan["manifest"]
    crcs = _crcs(arrays)
    for e in manifest["arrays"]:
        e["crc32"] = crcs[e["key"]]
    text = json.dumps(manifest).encode("utf-8")
    start, data_bytes = _data_start(len(text)), manifest["data_bytes"]
    try:
        # no fsync: a cache lost or cut by a crash fails its size or CRC-32 check and is
        # written again
        with atomic_write(path, durable=False) as out:
            head = MAGIC + struct.pack("<Q", len(text)) + text
            out.write(head + b"\0" * (start - len(head)))
            at = 0
            for e in manifest["arrays"]:
                out.write(b"\0" * (e["offset"] - at))
                out.write(memoryview(_bytes(arrays[e["key"]])))
                at = e["offset"] + e["nbytes"]
            out.write(b"\0" * (data_bytes - at))
    except OSError as e:
        _report(f"could not write the weights cache {path} ({e}); no cache written",
                plan["automatic"], plan["verbose"])  # fmt: skip
        return None
    return path


_writers: dict[Path, threading.Thread] = {}  # cache file -> this process's thread writing it
_writers_lock = threading.Lock()


def write_in_background(folder: Path, source, arrays: dict, dtype: np.dtype, **kw):
    """``write(...)``, its checks and messages here, its CRC-32s and writing on a new
    thread at the lowest CPU priority (Linux), so that the caller's first forward pass
    is not kept waiting; the thread is not a daemon, so the process finishes the write
    before it exits. ``read`` of that cache (and ``wait``) wait for it. Returns the
    thread, or None (skipped)."""
    path = cache_file(folder, source, kw.get("variant", ""))
    wait(path)
    plan = _plan(folder, source, arrays, dtype, **kw)
    if plan is None:  # skipped (and said why, here)
        return None

    def run():
        if sys.platform.startswith("linux"):  # (elsewhere setpriority would nice the process)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        _commit(plan)

    thread = threading.Thread(target=run, name=f"pali_kit weights cache {path.name}")
    with _writers_lock:
        _writers[path] = thread
    thread.start()
    return thread


def wait(path: Path | None = None) -> None:
    """Wait until this process's background write of the cache file ``path`` (None:
    of every cache file) is done."""
    with _writers_lock:
        threads = [t for p, t in _writers.items() if path is None or p == Path(path)]
    for thread in threads:
        thread.join()
    with _writers_lock:
        for p in [p for p, t in _writers.items() if not t.is_alive()]:
            del _writers[p]


def prune(folder: Path, keep: Path | None = None) -> list[Path]:
    """Remove from ``folder`` the weights caches whose checkpoint file no longer
    exists and the temporary files of writes interrupted over ``STALE_TEMP_S`` ago
    (never ``keep``, nor a file this module did not write). Returns what it removed."""
    removed = []
    for e in entries(folder):  # (files not ours, or unreadable here, are left alone)
        gone = e["checkpoint"] is not None and not e["checkpoint_exists"]
        if gone and (keep is None or e["file"] != Path(keep)):
            with contextlib.suppress(OSError):
                e["file"].unlink()
                removed.append(e["file"])
    now = time.time()
    for tmp in Path(folder).glob(".*.weights.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
                removed.append(tmp)
    return removed


def entries(folder: Path) -> list[dict]:
    """The weights caches in ``folder``: per file ``{"file", "bytes", "checkpoint" (its
    path, or None if the manifest names none), "checkpoint_exists"}``, sorted by file
    name; ``*.weights`` files that are not caches this kit can read are left out."""
    out = []
    for file in sorted(Path(folder).glob("*.weights")):
        try:
            with open(file, "rb") as f:
                source = _read_manifest(f, file).get("source", {}).get("path")
            size = file.stat().st_size
        except (OSError, _Stale, AttributeError):
            continue
        source = source if isinstance(source, str) and source else None
        exists = source is not None and Path(source).exists()
        out.append({"file": file, "bytes": size, "checkpoint": source, "checkpoint_exists": exists})
    return out


def clear(folder: Path) -> list[Path]:
    """Remove every weights cache (and temporary file of one) from ``folder``; files the
    kit did not write are left. Returns what was removed."""
    wait()
    removed = []
    for file in [e["file"] for e in entries(folder)] + list(Path(folder).glob(".*.weights.*.tmp")):
        with contextlib.suppress(OSError):
            file.unlink()
            removed.append(file)
    return removed


def _being_written(path: Path) -> bool:
    """Whether a temporary file of ``path`` was written to in the last ``ACTIVE_TEMP_S``."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime < ACTIVE_TEMP_S:
                return True
    return False


def _report(message: str, automatic: bool, verbose: bool) -> None:
    if not automatic:
        _warn(message)
    elif verbose:
        print(f"pali_kit: {message}", file=sys.stderr)


def _data_start(manifest_bytes: int) -> int:
    """Where the arrays begin: the first multiple of ALIGN after the header."""
    return _round_up(len(MAGIC) + 8 + manifest_bytes)


def unusable(folder: Path, source, error: Exception, variant: str = "") -> None:
    """Warn that a cache that mapped fine does not make a run tree (it is written again)."""
    _warn(f"weights cache {cache_file(folder, source, variant)} does not fit its checkpoint "
          f"({type(error).__name__}: {error}); reading {source} and writing the cache again")  # fmt: skip
