"""The weights cache (``pali_kit.weights_cache``): a later load maps the CPU layout
from disk instead of reading the .npz, with the same bits; a stale, broken or
unwritable cache is never trusted and never fails a load; the default cache never
takes more than its share of the disk, is written in the background, and prunes
what is left of gone checkpoints."""

# ruff: noqa: F811
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import checkpoints, weights_cache
from pali_kit.checkpoints import load_cpu_inference, save_params
from pali_kit.errors import ArgumentTypeError
from pali_kit.model.cpu import Matrix
from pali_kit.weights_cache import CacheWarning, cache_file, resolve_dir

from .conftest import assert_generates_like_the_official_tree

# the fixtures of the same tiny bfloat16 model and its .npz (ruff reads test arguments named
# like them as redefinitions)
from .test_checkpoints_cpu_layout import bf16, saved  # noqa: F401


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def no_npz_reads(monkeypatch):
    """Make reading any member of a .npz fail: what still works came from the cache."""

    def refuse(*args, **kw):
        raise AssertionError("the .npz was read")

    def arm():
        monkeypatch.setattr(checkpoints, "_read_member", refuse)
        monkeypatch.setattr(checkpoints, "_read_out_in", refuse)

    return arm


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        if isinstance(x, jax.Array):
            np.testing.assert_array_equal(_bits(x), _bits(y))


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        yield


def _mapping_of(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _inside(a: jax.Array, ranges) -> bool:
    start = a.unsafe_buffer_pointer()
    return any(lo <= start and start + a.nbytes <= hi for lo, hi in ranges)


# --- the cache gives the same weights, mapped ------------------------------------------


def test_a_second_load_maps_the_same_bits_without_reading_the_npz(saved, folder, no_npz_reads):
    want = load_cpu_inference(saved)
    with _no_warnings():
        first = load_cpu_inference(saved, cache=folder)  # reads the .npz, writes the cache
    _assert_trees_equal(first, want)
    path = cache_file(folder, saved)
    assert path.is_file() and [p.name for p in folder.iterdir()] == [path.name]  # no temp left
    no_npz_reads()
    with _no_warnings():
        skeleton, run = load_cpu_inference(saved, cache=folder)
    _assert_trees_equal((skeleton, run), want)
    # every array is the mapped file's memory, handed to JAX without a copy
    if sys.platform == "linux":
        ranges = _mapping_of(path)
        assert ranges
        mapped = [a for a in jax.tree.leaves(skeleton) if isinstance(a, jax.Array)]
        matrices = [m for m in jax.tree.leaves(run["llm"]["layers"], is_leaf=_is_matrix)
                    if isinstance(m, Matrix)]  # fmt: skip
        assert len(matrices) == 2 * 5 and all(m.transposed for m in matrices)  # 2 layers
        mapped += [b for m in matrices for g in m.groups for b in g]
        assert len(mapped) > 20 and all(_inside(a, ranges) for a in mapped)


def _is_matrix(x):
    return isinstance(x, Matrix)


def test_pk_load_with_the_cache_generates_the_same_tokens_and_params(
    saved, folder, bf16, no_npz_reads
):
    config, params = bf16
    with _no_warnings():
        pk.load(saved, verbose=False, weights_cache=folder)
    no_npz_reads()
    with _no_warnings():
        model = pk.load(saved, verbose=False, weights_cache=folder)
    assert model._run_replaced  # the run tree came from the cache, laid out already
    # the same program on the same values: logits equal bit for bit
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
    text, mask_ar = np.array([[5, 6, 7, 8]], np.int32), np.array([[0, 0, 1, 1]], np.int32)
    reference = pk.Model(params, config)
    np.testing.assert_array_equal(
        np.asarray(model.logits(image, text, mask_ar)),
        np.asarray(reference.logits(image, text, mask_ar)),
    )
    assert_generates_like_the_official_tree(model, params, config)
    _assert_trees_equal(model.params, params)  # the official tree, rebuilt from the blocks


def test_training_and_saving_never_write_into_the_cache_file(saved, folder, bf16, tmp_path):
    from pali_kit import train as pt

    config, params = bf16
    pk.load(saved, verbose=False, weights_cache=folder)
    model = pk.load(saved, verbose=False, weights_cache=folder)  # mapped
    path = cache_file(folder, saved)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = pk.save(model, tmp_path / "again.npz")
    _assert_trees_equal(checkpoints.load_params(out), params)
    # a train step whose donated state holds the mapped arrays themselves (its output
    # may reuse their memory: a private copy of those pages, never the file)
    official = model.params
    mask, _ = pt.trainable_mask(official, "all")
    trainable, frozen = pt.split_params(official, mask)
    tx, _ = pt.make_optimizer("sgd", num_steps=1, lr=1e-2, warmup_percent=0)
    state = pt.init_state(trainable, tx)
    text = np.array([[5, 6, 7, 8]], np.int32)
    batch = {
        "image": np.zeros((1, 28, 28, 3), np.float32),
        "text": text,
        "mask_ar": np.array([[0, 0, 1, 1]], np.int32),
        "mask_loss": np.array([[0, 0, 1, 1]], np.int32),
        "mask_input": np.ones(text.shape, bool),
    }
    new, metrics = pt.make_train_step(config, tx)(state, frozen, batch)
    assert bool(metrics["ok"])
    jax.block_until_ready(new)
    # whatever writes into the mapped memory writes into a private copy of the page
    arrays = weights_cache.read(folder, saved, None)
    arrays["llm/layers/mlp/linear"][...] = 1
    assert np.all(_bits(arrays["llm/layers/mlp/linear"]) == _bits(np.ones(1, jnp.bfloat16)))
    del arrays
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    # (the donated arrays are gone from ``model``); a new mapping holds the checkpoint's weights
    again = pk.load(saved, verbose=False, weights_cache=folder)
    assert_generates_like_the_official_tree(again, params, config)


# --- a stale or broken cache: a warning, the .npz read, the cache written again ---------------


def _assert_rebuilt(saved, folder, want, no_npz_reads, match):
    with pytest.warns(CacheWarning, match=match):
        got = load_cpu_inference(saved, cache=folder)
    _assert_trees_equal(got, want)
    no_npz_reads()  # the cache written again is good
    with _no_warnings():
        _assert_trees_equal(load_cpu_inference(saved, cache=folder), want)


def test_a_changed_checkpoint_invalidates_the_cache(saved, folder, bf16, no_npz_reads):
    load_cpu_inference(saved, cache=folder)
    # other weights of the same shapes (same file size) written over the checkpoint
    other = jax.tree.map(lambda a: (a.astype(jnp.float32) + 1).astype(a.dtype), bf16[1])
    save_params(other, saved)
    st = saved.stat()
    os.utime(saved, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: surely later
    want = load_cpu_inference(saved)
    assert not np.array_equal(
        _bits(want[0]["llm"]["final_norm"]["scale"]), _bits(bf16[1]["llm"]["final_norm"]["scale"])
    )
    _assert_rebuilt(saved, folder, want, no_npz_reads, "checkpoint changed since")


def test_a_touched_checkpoint_invalidates_the_cache(saved, folder, no_npz_reads):
    load_cpu_inference(saved, cache=folder)
    st = saved.stat()
    os.utime(saved, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _assert_rebuilt(saved, folder, load_cpu_inference(saved), no_npz_reads,
                    "checkpoint changed since")  # fmt: skip


def test_other_weights_behind_the_same_file_stat_invalidate_the_cache(
    saved, folder, bf16, no_npz_reads
):
    """Size, mtime and inode can all come back after a rewrite (inodes are reused, clocks
    are coarse); the digest of the zip directory's CRC-32s cannot."""
    load_cpu_inference(saved, cache=folder)
    other = jax.tree.map(lambda a: (a.astype(jnp.float32) + 1).astype(a.dtype), bf16[1])
    save_params(other, saved)
    st = saved.stat()
    # the cache's manifest made to record exactly the new file's stat
    _edit_manifest(cache_file(folder, saved), lambda m: m["source"].update(
        size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino))  # fmt: skip
    _assert_rebuilt(saved, folder, load_cpu_inference(saved), no_npz_reads,
                    "checkpoint changed since")  # fmt: skip


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[8:16])[0]


def _truncate_data(p: Path):
    p.write_bytes(p.read_bytes()[:-100])


def _flip_data_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[-len(data) // 3] ^= 0x10  # inside one of the arrays
    p.write_bytes(bytes(data))


def _garble_manifest(p: Path):
    data = bytearray(p.read_bytes())
    data[16:26] = b"#" * 10  # the JSON's first bytes
    p.write_bytes(bytes(data))


def _cut_manifest(p: Path):
    p.write_bytes(p.read_bytes()[: 16 + _header_length(p) // 2])


def _bad_magic(p: Path):
    data = bytearray(p.read_bytes())
    data[:8] = b"NOTACACH"
    p.write_bytes(bytes(data))


def _empty(p: Path):
    p.write_bytes(b"")


def _edit_manifest(p: Path, edit):
    """Rewrite the JSON manifest through ``edit(dict)``, compacted and padded with
    spaces to its old length (so the arrays stay where they are)."""
    import json

    data = p.read_bytes()
    n = _header_length(p)
    manifest = json.loads(data[16 : 16 + n])
    edit(manifest)
    text = json.dumps(manifest, separators=(",", ":")).encode()
    assert len(text) <= n
    p.write_bytes(data[:16] + text + b" " * (n - len(text)) + data[16 + n :])


def _shifted_offset(p: Path):  # valid JSON that points an array outside the data
    _edit_manifest(p, lambda m: m["arrays"][0].update(offset=m["data_bytes"]))


def _dropped_array(p: Path):  # valid JSON without the final norm: no run tree from it
    def drop(m):
        m["arrays"] = [a for a in m["arrays"] if a["key"] != "llm/final_norm/scale"]

    _edit_manifest(p, drop)


@pytest.mark.parametrize(
    "damage, match",
    [
        (_truncate_data, "truncated"),
        (_flip_data_byte, "CRC-32 mismatch"),
        (_garble_manifest, "bad manifest"),
        (_cut_manifest, "truncated manifest"),
        (_bad_magic, "not a pali_kit weights cache"),
        (_empty, "not a pali_kit weights cache"),
        (_shifted_offset, "out of place"),
        (_dropped_array, "does not fit its checkpoint.*final_norm"),
    ],
)
def test_a_broken_cache_is_ignored_and_written_again(saved, folder, no_npz_reads, damage, match):
    want = load_cpu_inference(saved)
    load_cpu_inference(saved, cache=folder)
    damage(cache_file(folder, saved))
    _assert_rebuilt(saved, folder, want, no_npz_reads, match)


def test_a_failed_write_leaves_no_file_and_the_load_succeeds(saved, folder, monkeypatch):
    real = weights_cache.atomic_write

    class Full:  # a disk that fills up after 64 KiB
        def __init__(self, f):
            self.f, self.left = f, 1 << 16

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

    @contextlib.contextmanager
    def failing(path, *args, **kw):
        with real(path, *args, **kw) as f:
            yield Full(f)

    monkeypatch.setattr(weights_cache, "atomic_write", failing)
    with pytest.warns(CacheWarning, match="could not write the weights cache.*No space left"):
        got = load_cpu_inference(saved, cache=folder)
    _assert_trees_equal(got, load_cpu_inference(saved))
    assert list(folder.iterdir()) == []  # no partial cache, no temporary file


def test_too_little_free_disk_writes_no_cache(saved, folder, monkeypatch):
    import shutil

    usage = shutil.disk_usage(saved.parent)
    monkeypatch.setattr(weights_cache.shutil, "disk_usage",
                        lambda p: usage._replace(free=1 << 20))  # fmt: skip
    with pytest.warns(CacheWarning, match="not enough free disk") as caught:
        got = load_cpu_inference(saved, cache=folder)
    assert len(caught) == 1
    _assert_trees_equal(got, load_cpu_inference(saved))
    assert not cache_file(folder, saved).exists()


# --- where the cache applies, and how it is turned on -------------------------------------


def test_only_for_a_half_precision_npz_read_as_stored_or_quantized(tmp_path, saved, folder, bf16):
    config, params = bf16
    f32 = save_params(jax.tree.map(lambda a: a.astype(jnp.float32), params), tmp_path / "f.npz")
    with _no_warnings():
        pk.load(f32, verbose=False, weights_cache=folder)  # float32: no CPU-layout read
        pk.load(saved, dtype="float32", verbose=False, weights_cache=folder)  # a cast
        pk.load("demo", verbose=False, weights_cache=folder)
    assert not folder.exists() or list(folder.iterdir()) == []
    # a cache of the stored dtype does not serve a cast either
    pk.load(saved, verbose=False, weights_cache=folder)
    with _no_warnings():
        model = pk.load(saved, dtype="float32", verbose=False, weights_cache=folder)
    assert model.dtype == jnp.float32


def test_the_argument_and_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "pali_kit" / "weights"
    for value, want, automatic in [(None, default, True), ("", default, True), ("0", None, False),
                                   ("1", default, False),
                                   (str(tmp_path / "env"), tmp_path / "env", False)]:  # fmt: skip
        if value is None:
            monkeypatch.delenv(weights_cache.ENV, raising=False)
        else:
            monkeypatch.setenv(weights_cache.ENV, value)
        assert resolve_dir(None) == want, value
        assert weights_cache.is_automatic(None) is automatic, value
        assert not weights_cache.is_automatic(True) and not weights_cache.is_automatic(False)
    monkeypatch.setenv(weights_cache.ENV, "1")
    assert resolve_dir(False) is None  # the argument wins over the variable
    assert resolve_dir(True) == default
    assert resolve_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv(weights_cache.ENV)
    assert resolve_dir(True) == default
    assert resolve_dir(False) is None
    for bad in (1, "", ["x"]):
        with pytest.raises(ArgumentTypeError, match=r"pk.load: weights_cache=.*pass True"):
            resolve_dir(bad)


def test_on_by_default_in_the_default_folder_written_in_the_background(
    saved, tmp_path, monkeypatch, capsys, no_npz_reads
):
    import threading

    monkeypatch.delenv(weights_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    file = cache_file(weights_cache.default_dir(), saved)
    # pk.load returns while the write is still held back: it runs on its own thread
    started, release, seen = threading.Event(), threading.Event(), {}
    real = weights_cache._commit  # (the write itself, after the checks)

    def held(*args, **kw):
        seen["thread"] = threading.current_thread()
        started.set()
        assert release.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(weights_cache, "_commit", held)
    with _no_warnings():
        model = pk.load(saved, verbose=True)
    # what it does is said before pk.load returns (not later, from the thread)
    err = capsys.readouterr().err
    assert f"writing the weights in the CPU layout to {file}" in err
    assert "PALI_KIT_WEIGHTS_CACHE=0 turns the cache off" in err
    assert started.wait(60) and not file.exists()
    assert seen["thread"] is not threading.main_thread()
    assert not seen["thread"].daemon  # the process finishes the write before exiting
    release.set()
    no_npz_reads()
    with _no_warnings():  # waits for the write, then maps it
        again = pk.load(saved, verbose=False)
    assert file.is_file() and again._run_replaced
    np.testing.assert_array_equal(_bits(model.params["llm"]["final_norm"]["scale"]),
                                  _bits(again.params["llm"]["final_norm"]["scale"]))  # fmt: skip


def test_the_default_cache_takes_at_most_half_the_free_disk(
    saved, folder, tmp_path, monkeypatch, capsys
):
    import shutil

    want = load_cpu_inference(saved, cache=tmp_path / "probe")
    size = cache_file(tmp_path / "probe", saved).stat().st_size
    usage = shutil.disk_usage(saved.parent)
    free = weights_cache.DISK_MARGIN + int(1.5 * size)  # room for it, but not twice
    monkeypatch.setattr(weights_cache.shutil, "disk_usage", lambda p: usage._replace(free=free))
    with _no_warnings():  # the default cache: one line, no warning
        got = load_cpu_inference(saved, cache=folder,
                                 write_cache=_automatic_writer(verbose=True))  # fmt: skip
    _assert_trees_equal(got, want)
    assert not cache_file(folder, saved).exists()
    assert "no weights cache written: it would take" in capsys.readouterr().err
    with _no_warnings():  # silent when not verbose
        load_cpu_inference(saved, cache=folder, write_cache=_automatic_writer(verbose=False))
    assert capsys.readouterr().err == ""
    # a cache asked for explicitly only needs the room for itself
    load_cpu_inference(saved, cache=folder)
    assert cache_file(folder, saved).is_file()


def _automatic_writer(verbose):
    def write(*args):
        return weights_cache.write(*args, automatic=True, verbose=verbose)

    return write


def test_writing_a_cache_prunes_caches_of_gone_checkpoints_and_stale_temporary_files(
    saved, folder, bf16, tmp_path
):
    other = save_params(bf16[1], tmp_path / "other.npz")
    load_cpu_inference(other, cache=folder)
    gone = cache_file(folder, other)
    stale, fresh = folder / f".{gone.name}.abc.tmp", folder / f".{gone.name}.def.tmp"
    foreign = folder / "notes.weights"  # not a cache: left alone
    for f in (stale, fresh, foreign):
        f.write_bytes(b"x")
    old = os.stat(stale).st_mtime - weights_cache.STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    load_cpu_inference(saved, cache=folder)  # only the stale temporary file goes
    assert gone.is_file() and not stale.exists() and fresh.exists() and foreign.exists()
    other.unlink()
    cache_file(folder, saved).unlink()
    load_cpu_inference(saved, cache=folder)  # writing: the gone checkpoint's cache goes
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [cache_file(folder, saved).name, fresh.name, foreign.name])  # fmt: skip


def test_pk_load_follows_the_environment_variable(saved, tmp_path, monkeypatch):
    monkeypatch.setenv(weights_cache.ENV, str(tmp_path / "env"))
    pk.load(saved, verbose=False, weights_cache=False)  # off, whatever the variable says
    assert not (tmp_path / "env").exists()
    pk.load(saved, verbose=False)
    weights_cache.wait()  # (written in the background)
    assert cache_file(tmp_path / "env", saved).is_file()
    with pytest.raises(ArgumentTypeError, match="weights_cache=3"):
        pk.load(saved, verbose=False, weights_cache=3)


def test_cli_flag():
    from pali_kit.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["generate", "im.png", "caption en"]).weights_cache is None
    assert parse(["generate", "im.png", "caption en", "--weights-cache"]).weights_cache is True
    args = parse(["generate", "im.png", "caption en", "--weights-cache", "/c"])
    assert args.weights_cache == "/c"
    assert parse(["generate", "im.png", "caption en", "--no-weights-cache"]).weights_cache is False


def test_no_second_write_while_another_process_writes_the_same_cache(saved, folder):
    folder.mkdir()
    name = cache_file(folder, saved).name
    busy = folder / f".{name}.other.tmp"  # another process's write, under way
    busy.write_bytes(b"x")
    with pytest.warns(CacheWarning, match="another process is writing"):
        load_cpu_inference(saved, cache=folder)
    assert not cache_file(folder, saved).exists()
    old = os.stat(busy).st_mtime - weights_cache.ACTIVE_TEMP_S - 10  # that write went quiet
    os.utime(busy, (old, old))
    with _no_warnings():
        load_cpu_inference(saved, cache=folder)
    assert cache_file(folder, saved).is_file()


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_flushes_to_disk_only_when_durable(tmp_path, monkeypatch, durable):
    from pali_kit import atomic

    synced = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd))
    path = tmp_path / "f.bin"
    with atomic.atomic_write(path, durable=durable) as f:
        f.write(b"abc")
    assert path.read_bytes() == b"abc" and bool(synced) is durable
    with pytest.raises(RuntimeError), atomic.atomic_write(path, durable=durable) as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_cli_generate_says_it_writes_the_cache_and_cache_lists_and_clears_it(
    saved, tmp_path, capsys
):
    import shutil

    from pali_kit.cli import main

    shutil.copy(pk.asset_dir() / "tokenizer.model", saved.parent / "tokenizer.model")
    image = str(pk.asset_dir() / "images" / "shapes_0.png")
    folder = tmp_path / "wc"
    argv = ["generate", image, "caption en", "--model", str(saved), "--max-new-tokens", "2",
            f"--weights-cache={folder}"]  # fmt: skip
    assert main(argv) == 0
    weights_cache.wait()
    err = capsys.readouterr().err
    assert f"writing the weights in the CPU layout to {cache_file(folder, saved)}" in err
    assert main(argv) == 0  # mapped: nothing written
    assert "writing the weights" not in capsys.readouterr().err
    (folder / "notes.txt").write_text("mine")
    assert main(["cache", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{cache_file(folder, saved).name}  <- {saved.resolve()}" in out
    assert "1 weights cache(s)" in out
    assert main(["cache", "--dir", str(folder), "--clear"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


WRITE_AFTER_EXIT = """
import sys, time
import pali_kit as pk
from pali_kit import weights_cache
real = weights_cache._commit  # (the write itself, after the checks)

def late(*args, **kw):  # the write starts after the main thread has finished
    time.sleep(1.0)
    return real(*args, **kw)

weights_cache._commit = late
pk.load(sys.argv[1], verbose=False, weights_cache=sys.argv[2])
"""


def test_a_process_that_ends_right_after_loading_still_writes_a_whole_cache(saved, folder):
    import subprocess

    out = subprocess.run([sys.executable, "-c", WRITE_AFTER_EXIT, str(saved), str(folder)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    with _no_warnings():
        arrays = weights_cache.read(folder, saved, None)  # whole: sizes and CRC-32s check out
    assert arrays is not None and "llm/final_norm/scale" in arrays


# --- quantized loads --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_load_maps_its_cache_instead_of_reading_and_quantizing(
    saved, folder, monkeypatch, no_npz_reads, scheme
):
    from pali_kit import quant

    with _no_warnings():
        first = pk.load(saved, quantize=scheme, verbose=False, weights_cache=folder)
    file = cache_file(folder, saved, f"{scheme}-stored")
    weights_cache.wait()
    assert file.is_file() and not cache_file(folder, saved).exists()  # its own file

    def refuse(*args, **kw):
        raise AssertionError("quantized again")

    no_npz_reads()
    monkeypatch.setattr(quant, "quantize_rows_of", refuse)
    with _no_warnings():
        again = pk.load(saved, quantize=scheme, verbose=False, weights_cache=folder)
    is_q = lambda x: isinstance(x, quant.QArray)  # noqa: E731
    a, b = jax.tree.leaves(first.params, is_leaf=is_q), jax.tree.leaves(again.params, is_leaf=is_q)
    assert jax.tree.structure(first.params, is_leaf=is_q) == jax.tree.structure(
        again.params, is_leaf=is_q
    )
    assert sum(map(is_q, a)) >= 7  # the LLM's and the encoder's matrices
    for x, y in zip(a, b, strict=True):
        if is_q(x):
            assert (x.scheme, x.in_axes, x.in_shape, x.dtype) == (
                y.scheme,
                y.in_axes,
                y.in_shape,
                y.dtype,
            )
            x, y = (x.values, x.scales), (y.values, y.scales)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            assert u.shape == v.shape and u.dtype == v.dtype
            np.testing.assert_array_equal(_bits(u), _bits(v))
    # the same program on the same values: the same logits, bit for bit
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
    text, mask_ar = np.array([[5, 6, 7, 8]], np.int32), np.array([[0, 0, 1, 1]], np.int32)
    np.testing.assert_array_equal(np.asarray(first.logits(image, text, mask_ar)),
                                  np.asarray(again.logits(image, text, mask_ar)))  # fmt: skip
    # another dtype is another cache (read and quantized)
    monkeypatch.undo()
    with _no_warnings():
        pk.load(saved, quantize=scheme, dtype="float32", verbose=False, weights_cache=folder)
    weights_cache.wait()
    assert cache_file(folder, saved, f"{scheme}-float32").is_file()
