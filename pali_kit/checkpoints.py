"""Read and write checkpoints in the official big_vision ``.npz`` layout.

An official checkpoint is a zip of ``.npy`` arrays with ``/``-joined keys
(``img/Transformer/encoder_norm/scale``, ``llm/layers/attn/q_einsum/w``, ...),
optionally under a leading ``params/``. Arrays are float32, float16, or
bfloat16 stored as 2-byte void (numpy has no bfloat16; we view the bits).

    params = load_params("paligemma2-3b-pt-224.b16.npz")          # nested dict of jax arrays
    config = infer_config(params)                                 # from the shapes
    save_params(params, "mine.npz")                               # atomic; bf16 bit-exact

Loading is leaf by leaf, largest first, each array streamed from the zip in
small chunks (and cast chunk by chunk when a dtype is asked for), so host
memory peaks near one copy of the weights. Nothing is ever unpickled.

On CPU, ``load_cpu_inference`` reads a bfloat16/float16 file straight into the
CPU inference layout (``pk.load`` uses it): the LLM matrices are transposed
into their (out, in) blocks as they are read, in one pass.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
import struct
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from .atomic import atomic_write
from .configs import (
    GEMMA_VARIANTS,
    GemmaConfig,
    PaliGemmaConfig,
    VisionConfig,
)
from .errors import CheckpointError  # noqa: F401  (defined with the kit's other errors)
from .model.common import aligned_empty, to_device

try:  # ISA-L's CRC-32 (the zip one): the same values, several times faster than zlib's
    from isal.isal_zlib import crc32, crc32_combine
except ImportError:  # a platform without an isal wheel: zlib's, slower (and no combine)
    from zlib import crc32

    crc32_combine = None

CHUNK_BYTES = 1 << 24  # 16 MiB read at a time
QUANT_CHUNK_BYTES = 1 << 22  # 4 MiB slices when quantizing while reading
OUT_IN_CHUNK_BYTES = 1 << 24  # rows read at a time when transposing while reading


# --- dtypes ----------------------------------------------------------------------

_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def as_dtype(dtype) -> np.dtype | None:
    """``"bf16"``/``jnp.bfloat16``/``np.float32``/... -> numpy dtype (None stays None)."""
    if dtype is None:
        return None
    aliases = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "fp16": "float16",
               "fp32": "float32", "half": "float16"}  # fmt: skip
    if isinstance(dtype, str):
        dtype = aliases.get(dtype, dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
        return _DTYPES[dtype]
    return np.dtype(dtype)


def is_float(dtype: np.dtype) -> bool:
    """float16/32/64 or bfloat16 (whose numpy kind is "V", not "f")."""
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def _stored_dtype(descr: np.dtype, path, key) -> np.dtype:
    """The dtype an array was saved as; ``|V2`` is bfloat16 (big_vision's convention)."""
    if descr.hasobject:
        raise CheckpointError(
            f"{path}: {key} holds Python objects (a pickle). pali_kit never unpickles; "
            "re-save the checkpoint with plain numeric arrays."
        )
    if descr.kind == "V" and descr.itemsize == 2 and descr.fields is None:
        return np.dtype(ml_dtypes.bfloat16)
    if descr.kind not in "fiub":
        raise CheckpointError(f"{path}: {key} has unsupported dtype {descr}")
    return descr


# --- reading ---------------------------------------------------------------------


def _open_zip(path) -> zipfile.ZipFile:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pk.load reads transformers folders, "
                              "load_params wants a .npz file")  # fmt: skip
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(2)
        what = "a pickle" if head[:1] == b"\x80" else "not a .npz (zip) file"
        raise CheckpointError(
            f"{path} is {what}, or a truncated download (no zip directory found). "
            "Download it again; pali_kit reads .npz checkpoints and never unpickles."
        ) from None


def _member_header(zf: zipfile.ZipFile, member: str, path):
    with zf.open(member) as f:
        return _read_header(f, path, member)


def _read_header(f, path, key):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, descr = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, descr = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # numpy raises ValueError for bad magic/headers
        raise CheckpointError(f"{path}: {key} is not a valid .npy array ({e})") from None
    return shape, fortran, descr


class _Crc:
    """CRC-32 of a member's bytes, computed on a helper thread while reading goes on."""

    def __init__(self, initial: bytes):
        self.value = crc32(initial)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._last = None

    def _update(self, view):
        self.value = crc32(view, self.value)  # both release the GIL on big buffers

    def add(self, view, wait: bool = False):
        self._last = self._pool.submit(self._update, view)
        if wait:
            self._last.result()

    def result(self) -> int:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self.value


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path):
    """(file object at the member's first byte, raw) -- raw: stored bytes we CRC ourselves."""
    if info.compress_type != zipfile.ZIP_STORED:
        return zf.open(info), False  # np.savez_compressed: zipfile inflates and checks the CRC
    f = open(path, "rb")  # noqa: SIM115 -- closed by the caller
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        f.close()
        raise CheckpointError(f"{path}: {info.filename} has a corrupt zip header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    return f, True


_READ_ERRORS = (EOFError, zipfile.BadZipFile, OSError, ValueError)


def _corrupt(path, key, error: Exception) -> CheckpointError:
    """The error for a member that cannot be read to its end with a matching CRC."""
    return CheckpointError(
        f"{path}: {key} is truncated or corrupt ({error or type(error).__name__}). "
        "Download or copy the file again."
    )


def _start_member(f, raw_member: bool, path, key, dtype: np.dtype | None):
    """Read a member's .npy header -> (shape, fortran, stored, out_dtype, raw_dtype, crc).

    ``stored``: the array's dtype (bfloat16 for big_vision's 2-byte void);
    ``out_dtype``: ``dtype`` for float members when given, else ``stored``;
    ``raw_dtype``: how the bytes are read; ``crc``: for a stored member, the zip
    CRC-32 started over the header bytes (None when zipfile checks it).
    """
    start = f.tell() if raw_member else 0
    shape, fortran, descr = _read_header(f, path, key)
    stored = _stored_dtype(descr, path, key)
    crc = None
    if raw_member:  # the zip's CRC-32 covers the .npy header too
        header_len = f.tell() - start
        f.seek(start)
        crc = _Crc(f.read(header_len))
    out_dtype = dtype if dtype is not None and is_float(stored) else stored
    raw_dtype = np.dtype(np.uint16) if descr.kind == "V" else np.dtype(descr.str)
    return shape, fortran, stored, out_dtype, raw_dtype, crc


def _read_member(zf, info, path, key, dtype: np.dtype | None, out=None) -> np.ndarray:
    """Read one .npy member straight into a new page-aligned array, casting if asked.

    Stored (uncompressed) members are read with plain file reads into the final
    array and checked against the zip's CRC-32; compressed ones stream through zipfile.
    ``out``: the array to read into (``_new_array``'s for this member), else a new one.
    """
    f, raw_member = _open_member(zf, info, path)
    try:
        shape, fortran, stored, out_dtype, raw_dtype, crc = _start_member(
            f, raw_member, path, key, dtype
        )
        if out is None:
            out = aligned_empty(shape[::-1] if fortran else shape, out_dtype)
        elif out.shape != tuple(shape[::-1] if fortran else shape) or out.dtype != out_dtype:
            raise ValueError(f"the header changed while reading: {shape} {out_dtype}")
        flat = out.reshape(-1)
        per_chunk = max(1, CHUNK_BYTES // raw_dtype.itemsize)
        cast = out_dtype != stored or raw_dtype.byteorder not in "=|"
        scratch = np.empty(min(per_chunk, max(flat.size, 1)), raw_dtype) if cast else None
        done = 0
        while done < flat.size:
            n = min(per_chunk, flat.size - done)
            target = scratch[:n] if cast else flat[done : done + n].view(np.uint8)
            got = f.readinto(memoryview(target).cast("B"))
            if got != target.nbytes:
                raise EOFError("file ends early")
            if crc is not None:
                crc.add(target, wait=cast)  # the scratch buffer is reused: wait for it
            if cast:
                flat[done : done + n] = target.view(stored) if stored != raw_dtype else target
            done += n
        if crc is not None and crc.result() != info.CRC:
            raise zipfile.BadZipFile("CRC-32 mismatch")
    except _READ_ERRORS as e:
        raise _corrupt(path, key, e) from None
    finally:
        f.close()
    return out.T if fortran else out


def _iter_member_rows(zf, info, path, key, dtype: np.dtype | None, rows_bytes: int = CHUNK_BYTES,
                      lead: int = 1):  # fmt: skip
    """Yield ``(start, rows)``: consecutive slices ``a[start:start + n]`` of one member.

    ``a`` is the array with its first ``lead`` axes merged into one. For
    quantizing while loading: only one slice (about ``rows_bytes``, at least
    one row) is in memory at a time. Slices come in the stored dtype, or cast
    to ``dtype``. Fortran-order members are read whole (one slice).
    """
    f, raw_member = _open_member(zf, info, path)
    try:
        shape, fortran, stored, out_dtype, raw_dtype, crc = _start_member(
            f, raw_member, path, key, dtype
        )
        if fortran or len(shape) == 0:
            f.close()
            whole = _read_member(zf, info, path, key, dtype)
            yield 0, whole.reshape(-1, *whole.shape[lead:])
            return
        shape = (int(np.prod(shape[:lead], dtype=np.int64)), *shape[lead:])
        row = int(np.prod(shape[1:], dtype=np.int64))
        n_rows = max(1, rows_bytes // max(1, row * raw_dtype.itemsize))
        for first in range(0, shape[0], n_rows):
            n = min(n_rows, shape[0] - first)
            raw = np.empty(n * row, raw_dtype)
            if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise EOFError("file ends early")
            if crc is not None:
                crc.add(raw, wait=True)
            rows = raw.view(stored) if stored != raw_dtype else raw
            yield first, rows.astype(out_dtype, copy=False).reshape(n, *shape[1:])
        if crc is not None and crc.result() != info.CRC:
            raise zipfile.BadZipFile("CRC-32 mismatch")
    except _READ_ERRORS as e:
        raise _corrupt(path, key, e) from None
    finally:
        f.close()


def member_shape(zf, member: str, path) -> tuple[tuple[int, ...], np.dtype]:
    shape, fortran, descr = _member_header(zf, member, path)
    return tuple(shape), _stored_dtype(descr, path, member)


def _canonical_key(member: str) -> str:
    key = member[:-4] if member.endswith(".npy") else member
    return key[len("params/") :] if key.startswith("params/") else key


def checkpoint_keys(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, stored dtype) for every array in a .npz, reading only headers."""
    with _open_zip(path) as zf:
        out = {}
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            shape, _, descr = _member_header(zf, member, path)
            key = _canonical_key(member)
            out[key] = (tuple(shape), _stored_dtype(descr, path, key))
        return out


def iter_arrays(
    path, dtype=None, order: str = "largest", *, quantize: str | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, numpy array)`` one at a time (``params/`` prefix removed).

    order="largest" yields the biggest arrays first, which keeps the peak of
    "arrays already converted + the one being read" close to the total.
    quantize ("int8" | "int4"): the weights ``pali_kit.quant.RULES`` names come
    as numpy-backed ``QArray``s, quantized slice by slice while they are read.
    """
    from . import quant

    dtype = as_dtype(dtype)
    quant.check_scheme(quantize)
    with _open_zip(path) as zf:
        members = [m for m in zf.namelist() if m.endswith(".npy")]
        if not members:
            raise CheckpointError(f"{path} holds no arrays: is this a checkpoint?")
        if any(m.startswith("params/") for m in members):
            members = [m for m in members if m.startswith("params/")]  # skip optimizer state
        if order == "largest":
            members.sort(key=lambda m: -zf.getinfo(m).file_size)
        for member in members:
            key = _canonical_key(member)
            axes = quant.contraction_axes(key) if quantize else None
            if axes is None:
                yield key, _read_member(zf, zf.getinfo(member), path, key, dtype)
                continue
            shape, stored = member_shape(zf, member, path)
            stands_for = dtype if dtype is not None else stored
            lead = min(a % len(shape) for a in axes)  # axes before the first contracted one
            if lead == 0:  # contracted along axis 0: quantize it whole (small matrices)
                whole = _read_member(zf, zf.getinfo(member), path, key, dtype)
                yield key, quant.quantize_rows_of([(0, whole)], shape, stands_for, quantize, axes)
                continue
            # slices along the leading axes, merged into one (smaller slices)
            rows = _iter_member_rows(zf, zf.getinfo(member), path, key, dtype,
                                     QUANT_CHUNK_BYTES, lead)  # fmt: skip
            merged = (int(np.prod(shape[:lead])), *shape[lead:])
            q = quant.quantize_rows_of(rows, merged, stands_for, quantize, axes)
            yield key, q._replace(q.values.reshape(*shape[:lead], *q.values.shape[1:]),
                                  q.scales.reshape(*shape[:lead], *q.scales.shape[1:]))  # fmt: skip


# --- reading straight into the CPU inference layout -----------------------------------


def load_cpu_inference(path, dtype=None, *, progress: bool | None = None, cache=None,
                       write_cache=None):  # fmt: skip
    """Read a .npz straight into the CPU inference layout: ``(skeleton, run)``, or None.

    ``run`` is what ``model.cpu_layout(params, in_place=True)`` makes of the
    official tree ``load_params`` reads; ``skeleton`` is that tree with the LLM
    matrices ``run`` holds as (out, in) blocks (``model.cpu.IN_PLACE_LEAVES``)
    replaced by their ``jax.ShapeDtypeStruct`` (``model.cpu.official_params(run,
    skeleton)`` rebuilds them). Those blocks are written in one pass over the
    file's bytes (read 16 MB at a time and transposed from that buffer), the
    zip's CRC-32 checked on the way; the other arrays are read as
    ``load_params`` reads them. Memory peaks near one copy of the weights. All
    arrays are allocated first, and a helper thread faults their pages in ahead
    of the reader (``_Prefaulter``): new memory that the OS must first obtain
    (e.g. from a VM's host) then arrives while bytes are copied, not between copies.

    None (read with ``load_params``) unless the arrays go to the CPU, those
    matrices are stored uncompressed in C order as bfloat16 or float16 like the
    final norm, and ``dtype`` is None or that dtype.

    ``cache``: a folder for the weights cache (``pali_kit.weights_cache``), or None:
    when it holds a valid cache of this file, its arrays are mapped instead of
    reading the file (no new memory); otherwise, after reading, the filled arrays
    are written there for the next process, by ``write_cache(cache, path, {key: numpy
    array}, dtype)`` (default ``weights_cache.write``; ``pk.load`` writes in the
    background).
    """
    from . import weights_cache
    from .model import cpu

    dtype = as_dtype(dtype)
    if jax.default_backend() != "cpu":  # (to_device puts each array on the default device)
        return None
    blocked = {f"llm/layers/{'/'.join(p)}": cpu.GROUP_AXES["/".join(p)]
               for p in cpu.IN_PLACE_LEAVES}  # fmt: skip
    if cache is not None:
        mapped = weights_cache.read(cache, path, dtype)
        if mapped is not None:
            try:
                _check_same_arrays(mapped, path)
                done = _run_tree({k: to_device(a) for k, a in mapped.items()}, blocked)
            except (KeyError, TypeError, ValueError) as e:  # a manifest missing arrays
                weights_cache.unusable(cache, path, e)
                done = None
            if done is not None:
                return done
    with _open_zip(path) as zf:
        members = [m for m in zf.namelist() if m.endswith(".npy")]
        if any(m.startswith("params/") for m in members):
            members = [m for m in members if m.startswith("params/")]  # skip optimizer state
        by_key = {_canonical_key(m): m for m in members}
        if not _stored_half(zf, by_key, [*blocked, "llm/final_norm/scale"], path, dtype):
            return None
        size = Path(path).stat().st_size
        bar = (
            _progress(size, Path(path).name)
            if (progress or (progress is None and size > 2e8))
            else None
        )
        members.sort(key=lambda m: -zf.getinfo(m).file_size)
        # every array allocated up front, its pages faulted in by a helper thread
        # ahead of the reader (see _Prefaulter)
        outs = {m: _new_array(zf, m, path, dtype) for m in members}
        flat, host = {}, {}
        with _Prefaulter(outs.values()):
            for member in members:
                key = _canonical_key(member)
                info = zf.getinfo(member)
                if key in blocked:
                    array = _read_out_in(info, path, key, blocked[key], outs.pop(member))
                else:
                    array = _read_member(zf, info, path, key, dtype, outs.pop(member))
                flat[key] = to_device(array)
                if cache is not None:
                    host[key] = array
                if bar is not None:
                    bar.update(array.nbytes)
                del array
        if bar is not None:
            bar.close()
    done = _run_tree(flat, blocked)
    if done is not None and cache is not None:  # the next process maps these instead
        (write_cache or weights_cache.write)(cache, path, host, flat["llm/final_norm/scale"].dtype)
    return done


def quantized_variant(quantize: str, dtype=None) -> str:
    """The weights cache variant of a quantized load, e.g. ``"int8-stored"``, ``"int4-float32"``."""
    return f"{quantize}-{as_dtype(dtype).name if dtype is not None else 'stored'}"


def load_quantized(path, dtype, quantize: str, *, cache=None, write_cache=None) -> dict:
    """``load_params(path, dtype, quantize=quantize)``, through the weights cache on CPU.

    ``cache``: a folder (``pali_kit.weights_cache``) or None. When it holds this
    file's cache for the same scheme and dtype, its arrays are mapped (the
    ``QArray`` children as they were quantized: no reading, no quantizing, no new
    memory); otherwise the file is read and quantized, and the result written there
    by ``write_cache`` (as in ``load_cpu_inference``) for the next process.
    """
    from . import quant, weights_cache

    if cache is None or jax.default_backend() != "cpu":
        return load_params(path, dtype, quantize=quantize)
    variant = quantized_variant(quantize, dtype)
    found = weights_cache.read_variant(cache, path, None, variant)
    if found is not None:
        arrays, manifest = found
        try:
            return _quantized_tree(arrays, manifest["quantized"], path)
        except (KeyError, TypeError, ValueError) as e:
            weights_cache.unusable(cache, path, e, variant)
    params = load_params(path, dtype, quantize=quantize)
    flat, meta = {}, {}
    for key, leaf in flatten(params).items():
        if isinstance(leaf, quant.QArray):
            flat[f"{key}#values"], flat[f"{key}#scales"] = (
                np.asarray(leaf.values),
                np.asarray(leaf.scales),
            )
            meta[key] = {"scheme": leaf.scheme, "in_axes": list(leaf.in_axes),
                         "in_shape": list(leaf.in_shape), "dtype": leaf.dtype.name}  # fmt: skip
        else:
            flat[key] = np.asarray(leaf)
    float_dtype = params["llm"]["final_norm"]["scale"].dtype
    (write_cache or weights_cache.write)(cache, path, flat, float_dtype, variant=variant,
                                         quantized=meta)  # fmt: skip
    return params


def _quantized_tree(arrays: dict, meta: dict, path) -> dict:
    """The tree ``load_params(..., quantize=)`` gives, from a cache's mapped arrays."""
    from . import quant

    arrays, flat = dict(arrays), {}
    for key, m in meta.items():
        values, scales = arrays.pop(f"{key}#values"), arrays.pop(f"{key}#scales")
        flat[key] = quant.QArray(to_device(values), to_device(scales), m["scheme"],
                                 m["in_axes"], m["in_shape"], as_dtype(m["dtype"]))  # fmt: skip
    flat.update({key: to_device(a) for key, a in arrays.items()})
    want = {k for k in checkpoint_keys(path) if k.startswith(("img/", "llm/"))}
    have = {k for k in flat if k.startswith(("img/", "llm/"))}
    if have != want:
        raise ValueError(f"arrays differ from the checkpoint's: {sorted(have ^ want)[:3]}")
    return unflatten(flat)


def _check_same_arrays(arrays: dict, path) -> None:
    """ValueError unless ``arrays`` holds every ``img/`` and ``llm/`` array of the .npz
    at ``path`` in its shape (reversed for a Fortran-order member), reading headers only."""
    want = {k: s for k, (s, _) in checkpoint_keys(path).items() if k.startswith(("img/", "llm/"))}
    have = {k: a.shape for k, a in arrays.items() if k.startswith(("img/", "llm/"))}
    if have.keys() != want.keys():
        odd = sorted(have.keys() ^ want.keys())
        raise ValueError(f"arrays differ from the checkpoint's: {odd[:3]}")
    for key, shape in want.items():
        if have[key] not in (shape, shape[::-1]):
            raise ValueError(f"{key}: shape {have[key]}, the checkpoint's is {shape}")


def _run_tree(flat: dict, blocked: dict):
    """``(skeleton, run)`` from the filled arrays ``{key: jax array}`` (the ``blocked``
    keys holding (out, in) blocks), or None where per-layer views are impossible."""
    from .model import cpu

    run = cpu.cpu_layout(unflatten(flat), out_in=True, in_place="written")
    layers = run["llm"]["layers"]
    for p in cpu.IN_PLACE_LEAVES:
        node = layers
        for k in p:
            node = node[k]
        if not (isinstance(node, tuple) and getattr(node[0], "transposed", False)):
            return None  # per-layer views impossible (unusual shapes): read the official tree
    flat = dict(flat)
    for key in blocked:
        a = flat[key]
        flat[key] = jax.ShapeDtypeStruct(a.shape, a.dtype)
    return unflatten(flat), run


def _stored_half(zf, by_key: dict, keys: list, path, dtype) -> bool:
    """Whether every key is a stored (uncompressed) C-order bfloat16/float16 member in
    native byte order, all of one dtype, which ``dtype`` (if given) does not change."""
    found = set()
    for key in keys:
        member = by_key.get(key)
        if member is None or zf.getinfo(member).compress_type != zipfile.ZIP_STORED:
            return False
        shape, fortran, descr = _member_header(zf, member, path)
        stored = _stored_dtype(descr, path, key)
        if fortran or descr.byteorder == ">" or stored.name not in ("bfloat16", "float16"):
            return False
        found.add(stored)
    return len(found) == 1 and (dtype is None or dtype in found)


def _read_out_in(info: zipfile.ZipInfo, path, key: str, n_group: int, out=None) -> np.ndarray:
    """One stacked LLM matrix ``(L, groups..., in..., out)`` read into a new array that
    holds, layer after layer, its (out, in) blocks (``model.cpu.out_in_blocks``).

    The member's rows are read in order, ``OUT_IN_CHUNK_BYTES`` at a time, into a
    small reused buffer, and transposed from there into their block while they
    are in the cache; the CRC-32 is summed over each stripe of rows just before
    it is transposed (per thread, then combined; without ``crc32_combine``, over
    each chunk first). One pass over the bytes, no second copy of the matrix.
    ``out``: the array to write into (``_new_array``'s for this member), else a new one.
    """
    from .model import cpu

    f, _ = _open_member(None, info, path)
    try:
        member_start = f.tell()
        shape, _, stored, _, raw_dtype, crc = _start_member(f, True, path, key, None)
        value = crc.result()  # the CRC-32 of the .npy header
        nbytes = math.prod(shape) * raw_dtype.itemsize
        if info.file_size != f.tell() - member_start + nbytes:
            raise EOFError(
                f"the zip directory gives {info.file_size} bytes, the array's header "
                f"{f.tell() - member_start + nbytes}"
            )
        if out is None:
            out = _prefaulted(aligned_empty(shape, stored))
        elif out.shape != tuple(shape) or out.dtype != stored:
            raise ValueError(f"the header changed while reading: {shape} {stored}")
        flat_out = out.reshape(-1).view(raw_dtype)
        width = shape[-1]  # values per row
        chunk_rows = max(cpu.STRIPE, OUT_IN_CHUNK_BYTES // (width * raw_dtype.itemsize))
        chunk_rows -= chunk_rows % cpu.STRIPE
        buffer = np.empty(chunk_rows * width, raw_dtype)
        combine = crc32_combine is not None
        for offset, rows in cpu.out_in_blocks(shape[1:], n_group, shape[0]):
            block = flat_out[offset : offset + rows * width].reshape(width, rows)
            _prefaulted(block)  # usually there already (_Prefaulter): then a quick check
            for first in range(0, rows, chunk_rows):
                n = min(chunk_rows, rows - first)
                part = buffer[: n * width].reshape(n, width)
                if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                    raise EOFError("file ends early")
                if not combine:
                    value = crc32(part, value)
                pieces = cpu.transpose_into(
                    part, block[:, first : first + n], crc32 if combine else None
                )
                for piece, size in pieces if combine else ():
                    value = crc32_combine(value, piece, size)
        if value != info.CRC:
            raise zipfile.BadZipFile("CRC-32 mismatch")
    except _READ_ERRORS as e:
        raise _corrupt(path, key, e) from None
    finally:
        f.close()
    return out


def _new_array(zf, member: str, path, dtype: np.dtype | None) -> np.ndarray:
    """The uninitialised array ``_read_member`` (or ``_read_out_in``) reads a member into."""
    shape, fortran, descr = _member_header(zf, member, path)
    stored = _stored_dtype(descr, path, _canonical_key(member))
    out_dtype = dtype if dtype is not None and is_float(stored) else stored
    return aligned_empty(shape[::-1] if fortran else shape, out_dtype)


class _Prefaulter:
    """Faults in the pages of new arrays on a helper thread, in order, ahead of the reader.

    Writing into fresh memory costs a page fault per page; where the memory must
    first come from a hypervisor (a VM whose free memory is handed back to the
    host), about 1 GB/s, and the reader would wait for each fault in turn. Here
    a thread asks the kernel for the pages (``MADV_POPULATE_WRITE``, in
    ``PREFAULT_STEP`` pieces, releasing the GIL) while the reader copies and
    transposes bytes into the pages already there. The reader never waits for
    it: a page it reaches first it faults in itself. A context manager: leaving
    it stops the thread (e.g. on a corrupt member) and waits for it.
    """

    def __init__(self, arrays):
        self.arrays = [a for a in arrays if PREFAULT and a.nbytes >= PREFAULT_MIN_BYTES]
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if self.arrays and sys.platform == "linux":
            self.thread = threading.Thread(target=self._run, name="pali_kit prefault", daemon=True)
            self.thread.start()
        return self

    def _run(self):
        try:
            madvise = _madvise()
        except (OSError, AttributeError):
            return
        for a in self.arrays:
            start = a.ctypes.data - a.ctypes.data % mmap.PAGESIZE
            end = a.ctypes.data + a.nbytes
            for lo in range(start, end, PREFAULT_STEP):
                if self.stop.is_set() or madvise(lo, min(PREFAULT_STEP, end - lo), 23) != 0:
                    return  # stopped, or a kernel without MADV_POPULATE_WRITE (Linux < 5.14)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.arrays = []


PREFAULT_STEP = 1 << 25  # bytes faulted in per call by _Prefaulter
PREFAULT_MIN_BYTES = 1 << 22  # smaller arrays: their pages come on first touch


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


PREFAULT = True  # back new arrays with memory in one call before they are transposed into


def _prefaulted(array: np.ndarray) -> np.ndarray:
    """``array`` with its pages allocated up front (Linux ``MADV_POPULATE_WRITE``).

    The transposes write each (out, in) block in stripes across all its pages;
    taking each page's first-touch fault there, from two threads at once, costs
    more than having the kernel allocate them all in one call (as ``readinto``
    does). Elsewhere, or where the kernel refuses, the pages come on first touch.
    """
    if PREFAULT and array.nbytes >= PREFAULT_MIN_BYTES and sys.platform == "linux":
        try:
            start = array.ctypes.data - array.ctypes.data % mmap.PAGESIZE
            _madvise()(start, array.ctypes.data + array.nbytes - start, 23)
        except (OSError, AttributeError):
            pass
    return array


def unflatten(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "/"))
        else:
            flat[key] = v
    return flat


def load_params(
    path,
    dtype=None,
    *,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    progress: bool | None = None,
    quantize: str | None = None,
) -> dict:
    """Load a big_vision .npz as a nested dict of jax arrays (the official tree).

    Args:
      path: the .npz file.
      dtype: cast floating arrays to this dtype while reading (None keeps the
        stored dtype; bfloat16 ``|V2`` arrays come back as bfloat16).
      place: ``(key, array) -> jax.Array`` to put each leaf where it belongs
        (e.g. ``jax.device_put`` with a sharding); default ``jnp.asarray``.
      progress: show a progress bar (default: for files over 200 MB).
      quantize: "int8" | "int4" to quantize the large matrices while reading,
        slice by slice (``pali_kit.quant``): host memory peaks near the quantized
        size. Those leaves come back as ``QArray``s.
    """
    from . import quant

    place = place or (lambda key, a: to_device(a))
    size = Path(path).stat().st_size if Path(path).exists() else 0
    bar = (
        _progress(size, Path(path).name)
        if (progress or (progress is None and size > 2e8))
        else None
    )
    flat = {}
    for key, array in iter_arrays(path, dtype, quantize=quantize):
        if isinstance(array, quant.QArray):
            done = array.size * np.dtype(array.dtype).itemsize  # the float bytes it replaces
            flat[key] = array._replace(place(key, array.values), place(key, array.scales))
        else:
            done = array.nbytes
            flat[key] = place(key, array)
        if bar is not None:
            bar.update(done)
        del array
    if bar is not None:
        bar.close()
    return unflatten(flat)


def _progress(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {desc}", leave=False)


# --- writing ---------------------------------------------------------------------


def _to_storable(array) -> np.ndarray:
    a = np.asarray(jax.device_get(array)) if isinstance(array, jax.Array) else np.asarray(array)
    if a.dtype == ml_dtypes.bfloat16:
        return a.view(np.dtype("V2"))  # big_vision's convention for bfloat16
    if a.dtype.hasobject:
        raise TypeError("cannot save Python objects in a checkpoint")
    return a


def save_params(params: dict, path, *, extra: dict | None = None) -> Path:
    """Write a nested dict of arrays as an official-layout .npz, atomically.

    Keys are ``/``-joined without a ``params/`` prefix (as the reference colab
    saves). bfloat16 is stored as ``|V2`` and round-trips bit-exactly. The file
    is written to a temporary name in the same folder, flushed to disk and
    renamed, so an interrupted save never damages an existing checkpoint.
    ``extra`` adds more flat arrays (e.g. ``{"opt/...": ...}``) to the same zip.
    """
    flat = flatten(params)
    if extra:
        flat.update(extra)
    return save_arrays(flat.items(), path)


def save_arrays(items, path) -> Path:
    """Atomically write ``(key, array)`` pairs to a .npz, one array in memory at a time."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as raw:
        with zipfile.ZipFile(raw, "w", allowZip64=True) as zf:
            for key, value in items:
                array = _to_storable(value)
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
                del array
    return path


# --- the architecture from the shapes -----------------------------------------------

_IMG = "img/Transformer/encoderblock"
_REQUIRED = [
    "img/embedding/kernel", "img/embedding/bias", "img/pos_embedding",
    f"{_IMG}/LayerNorm_0/scale", f"{_IMG}/MultiHeadDotProductAttention_0/query/kernel",
    f"{_IMG}/MlpBlock_0/Dense_0/kernel", "img/head/kernel",
    "llm/embedder/input_embedding", "llm/final_norm/scale",
    "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w", "llm/layers/mlp/gating_einsum",
]  # fmt: skip


def infer_config(shapes, where: str = "checkpoint") -> PaliGemmaConfig:
    """The PaliGemmaConfig that fits a tree (or flat dict) of arrays / shapes.

    Reads vision width, depth, heads, patch and resolution; Gemma 1 vs 2 from
    the post-norm keys; LLM width, depth, heads, kv heads, head dim, MLP dim and
    vocabulary. A known LLM variant (gemma2_27b, ...) brings its query scale.
    """
    flat = flatten(shapes) if any(isinstance(v, dict) for v in shapes.values()) else dict(shapes)
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in flat.items()}
    missing = [k for k in _REQUIRED if k not in shape]
    if missing:
        raise CheckpointError(
            f"{where} has no {missing[0]}"
            + (f" (and {len(missing) - 1} more PaliGemma keys)" if len(missing) > 1 else "")
            + ": is this a PaliGemma checkpoint in the big_vision layout?"
        )
    p, _, _, v_width = shape["img/embedding/kernel"]
    tokens = shape["img/pos_embedding"][1]
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise CheckpointError(
            f"{where}: img/pos_embedding has {tokens} positions, not a square grid"
        )
    vision = VisionConfig(
        width=v_width,
        depth=shape[f"{_IMG}/LayerNorm_0/scale"][0],
        mlp_dim=shape[f"{_IMG}/MlpBlock_0/Dense_0/kernel"][-1],
        num_heads=shape[f"{_IMG}/MultiHeadDotProductAttention_0/query/kernel"][2],
        patch_size=p,
        image_size=grid * p,
    )
    depth, heads, width, head_dim = shape["llm/layers/attn/q_einsum/w"]
    kv_heads = shape["llm/layers/attn/kv_einsum/w"][2]
    mlp_dim = shape["llm/layers/mlp/gating_einsum"][-1]
    vocab = shape["llm/embedder/input_embedding"][0]
    gemma2 = "llm/layers/post_attention_norm/scale" in shape
    llm = GemmaConfig(
        variant="custom", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, post_norms=gemma2,
        attn_logits_softcap=50.0 if gemma2 else 0.0,
    )  # fmt: skip
    shape_fields = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim",
                    "post_norms")  # fmt: skip
    for known in GEMMA_VARIANTS.values():
        if all(getattr(known, f) == getattr(llm, f) for f in shape_fields):
            llm = dataclasses.replace(known, vocab_size=vocab)  # brings e.g. the 27B query scale
            break
    return PaliGemmaConfig(vision=vision, llm=llm)


def check_params(params, config: PaliGemmaConfig, where: str = "checkpoint") -> None:
    """Raise CheckpointError naming any missing, unexpected or mis-shaped parameter."""
    from .model import param_shapes

    want = flatten(jax.tree.map(lambda s: s.shape, param_shapes(config)))
    have = {k: tuple(v.shape) for k, v in flatten(params).items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing:
        raise CheckpointError(
            f"missing parameter {missing[0]} in {where}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": is this a PaliGemma checkpoint of this architecture?"
        )
    if unexpected:
        raise CheckpointError(
            f"unexpected parameter {unexpected[0]} in {where}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f"; the config ({config.family}, {config.llm.variant}) has no such weight"
        )
    for key in sorted(want):
        if want[key] != have[key]:
            raise CheckpointError(
                f"{key} in {where} has shape {have[key]}, the config expects {want[key]}"
            )
