"""Traced programs kept across processes, so that a cold process skips tracing.

JAX's persistent compilation cache keeps compiled executables, but a new
process still traces and lowers a function before it can look one up. For the
unrolled prefill of a 3B model that is Python work that, beside ``pk.load``
(``decode.compile_ahead``), shares the interpreter with the thread reading the
weights and slows both (bench/README.md, the cold start). This module stores the
traced program as a ``jax.export`` serialization (StableHLO, no Python objects)
the first time, and hands it back to later processes, which then only lower a
call to it:

    exported = program("prefill", key, jitted, args)   # stored, else exported and stored
    fn = callable_of(exported, "stored_prefill")        # jax.jit of exported.call

``key`` is a JSON-able value naming what the program depends on besides the
arguments' tree and shapes (config, cache size...); ``program_key`` adds the
versions of JAX, jaxlib, flax and ml_dtypes, a hash of the kit's source, the
backend, the XLA flags and the JAX settings that change a trace. A file is
named by that key's SHA-256, and holds

    b"PKPROGRAM1\\n" | one line of JSON: {"key": the SHA-256, "sha256": of the payload}
    | the payload: ``jax.export.Exported.serialize()``

A file whose key or checksum does not match, that does not deserialize, or
whose program takes other arguments than the call's, is ignored with a
``ProgramCacheWarning`` (and written again); nothing in it is ever executed as
Python. Files are written atomically (``atomic.write_bytes``).

Where: ``<the compilation cache folder>/pali_kit_programs`` (only while JAX's
persistent compilation cache has a folder). Off with ``PALI_KIT_PROGRAM_CACHE=0``.
Serialization needs the ``flatbuffers`` package; without it nothing is stored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import jax

from . import atomic
from .model.cpu import HeadMajorCache, Matrix

ENV = "PALI_KIT_PROGRAM_CACHE"
FOLDER = "pali_kit_programs"
MAGIC = b"PKPROGRAM1\n"
FORMAT = 1  # bump when what a stored program means changes

# JAX settings that change what a function traces to
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_threefry_partitionable", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion")  # fmt: skip


class ProgramCacheWarning(UserWarning):
    """A stored program could not be used (it is traced again) or not be stored."""


def available() -> bool:
    """Whether programs can be stored here (``jax.export`` serialization works)."""
    return _SERIALIZABLE


def folder() -> Path | None:
    """The folder of stored programs, or None when the cache is off."""
    if os.environ.get(ENV, "1") == "0" or not _SERIALIZABLE:
        return None
    base = jax.config.jax_compilation_cache_dir
    return None if not base else Path(base) / FOLDER


@functools.cache
def source_hash() -> str:
    """SHA-256 of the kit's Python source (every ``.py`` under the package, by path)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def program_key(name: str, key, args) -> str:
    """SHA-256 naming the program ``name`` traced for ``key`` and ``args``' tree,
    shapes and dtypes, with everything else that decides the trace (see the module)."""
    import flax
    import jaxlib
    import ml_dtypes

    leaves, tree = jax.tree_util.tree_flatten(args)
    whole = {
        "format": FORMAT,
        "name": name,
        "key": key,
        "tree": str(tree),  # custom nodes print their static data (Matrix shapes, cache form)
        "leaves": [[list(x.shape), str(x.dtype)] for x in leaves],
        "versions": [jax.__version__, jaxlib.__version__, flax.__version__, ml_dtypes.__version__],
        "source": source_hash(),
        "backend": [jax.default_backend(), jax.devices()[0].client.platform_version],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "settings": {s: str(getattr(jax.config, s, None)) for s in _JAX_SETTINGS},
    }
    return hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()


def path_of(name: str, digest: str) -> Path | None:
    where = folder()
    return None if where is None else where / f"{name}-{digest[:32]}.jaxexport"


def load(name: str, key, args):
    """The stored ``jax.export.Exported`` of ``name`` for ``key`` and ``args``, or None."""
    digest = program_key(name, key, args)
    path = path_of(name, digest)
    if path is None or not path.is_file():
        return None
    try:
        data = path.read_bytes()
        exported = _decode(data, digest)
        _check_fits(exported, args)
    except Exception as e:  # noqa: BLE001 - any damage means: trace as usual
        _warn(f"stored program {path} is not usable ({type(e).__name__}: {e}); tracing it again")
        return None
    return exported


def program(name: str, key, jitted, args):
    """The program of ``jitted`` (named ``name``) for ``key`` and ``args`` (a tree of
    arrays or ``jax.ShapeDtypeStruct``) as a ``jax.export.Exported``: the stored one,
    else exported now (a trace and a lowering) and stored for later processes.
    None when the cache is off or ``jitted`` cannot be exported (warned)."""
    if folder() is None:
        return None
    exported = load(name, key, args)
    if exported is None:
        exported = _export(name, jitted, args)
        if exported is not None:
            _write(name, key, args, exported)
    return exported


def store(name: str, key, jitted, args) -> Path | None:
    """Export ``jitted`` for ``args`` and write it; the path, or None (off, or failed: warned)."""
    if folder() is None:
        return None
    exported = _export(name, jitted, args)
    return None if exported is None else _write(name, key, args, exported)


def _export(name: str, jitted, args):
    try:
        from jax import export

        return export.export(jitted)(*args)
    except Exception as e:  # noqa: BLE001 - the caller traces as usual
        _warn(f"could not export the {name} program ({type(e).__name__}: {e})")
        return None


def _write(name: str, key, args, exported) -> Path | None:
    digest = program_key(name, key, args)
    path = path_of(name, digest)
    try:
        payload = bytes(exported.serialize())
        head = json.dumps({"key": digest, "sha256": hashlib.sha256(payload).hexdigest()})
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_bytes(path, MAGIC + head.encode() + b"\n" + payload)
    except Exception as e:  # noqa: BLE001 - storing is an optimization only
        _warn(f"could not store the {name} program in {path.parent} ({type(e).__name__}: {e})")
        return None


def callable_of(exported, name: str):
    """``exported`` as a jitted function named ``name`` (so compile events and the
    persistent compilation cache see ``jit(name)``)."""

    def call(*args):
        return exported.call(*args)

    call.__name__ = call.__qualname__ = name
    return jax.jit(call)


def _decode(data: bytes, digest: str):
    from jax import export

    if not data.startswith(MAGIC):
        raise ValueError("not a stored program")
    end = data.index(b"\n", len(MAGIC))
    head = json.loads(data[len(MAGIC) : end])
    payload = data[end + 1 :]
    if head.get("key") != digest:
        raise ValueError("stored for another key")
    if head.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise ValueError("checksum mismatch (damaged)")
    return export.deserialize(bytearray(payload))


def _check_fits(exported, args) -> None:
    leaves, tree = jax.tree_util.tree_flatten((args, {}))
    if exported.in_tree != tree:
        raise ValueError("the stored program takes another argument tree")
    want = [(tuple(x.shape), jax.numpy.dtype(x.dtype)) for x in leaves]
    have = [(tuple(a.shape), a.dtype) for a in exported.in_avals]
    if want != have:
        raise ValueError("the stored program takes other shapes or dtypes")
    if tuple(exported.platforms) != (jax.default_backend(),):
        raise ValueError(f"the stored program is for {exported.platforms}")


def _warn(message: str) -> None:
    warnings.warn(f"pali_kit: {message}", ProgramCacheWarning, stacklevel=3)


def _json_aux(aux) -> bytes:
    return json.dumps(aux).encode()


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _register() -> bool:
    """Let ``jax.export`` write the kit's pytree nodes in argument and result trees
    (their static data is a tuple of ints, bools, None and tuples: JSON). False
    where programs cannot be serialized (no ``flatbuffers``, an old JAX)."""
    try:
        import flatbuffers  # noqa: F401 - what Exported.serialize needs
        from jax import export

        for cls in (Matrix, HeadMajorCache):
            export.register_pytree_node_serialization(
                cls, serialized_name=f"pali_kit.{cls.__name__}",
                serialize_auxdata=_json_aux,
                deserialize_auxdata=lambda b: _tuples(json.loads(b)),
            )  # fmt: skip
    except (ImportError, AttributeError, ValueError):
        return False
    return True


_SERIALIZABLE = _register()
