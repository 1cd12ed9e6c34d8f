"""Reading a half-precision .npz straight into the CPU inference layout
(``checkpoints.load_cpu_inference``): the same bits as reading the official tree
and laying it out, with the zip's CRC-32 and sizes still checked, whatever the
read chunk and with or without ``crc32_combine``."""

from __future__ import annotations

import mmap
import platform
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import checkpoints
from pali_kit.checkpoints import CheckpointError, load_cpu_inference, load_params, save_params
from pali_kit.model import cpu_layout
from pali_kit.model.cpu import official_params

from .conftest import assert_generates_like_the_official_tree, tiny_bf16_model

LINEAR = "llm/layers/mlp/linear"


@pytest.fixture(scope="module")
def bf16():
    return tiny_bf16_model()


@pytest.fixture
def saved(tmp_path, bf16):
    return save_params(bf16[1], tmp_path / "m.npz")


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(_bits(x), _bits(y))


@pytest.mark.parametrize("chunk", [1 << 24, 1000])  # rows read at a time: all, or 16
@pytest.mark.parametrize("combine", [True, False])
def test_same_run_tree_as_reading_then_laying_out(saved, bf16, monkeypatch, chunk, combine):
    monkeypatch.setattr(checkpoints, "OUT_IN_CHUNK_BYTES", chunk)
    if not combine:  # e.g. zlib's CRC-32 where ISA-L is missing
        monkeypatch.setattr(checkpoints, "crc32_combine", None)
    want = cpu_layout(load_params(saved), in_place=True)
    skeleton, run = load_cpu_inference(saved)
    _assert_trees_equal(run, want)
    # the matrices held as blocks are placeholders in the skeleton ...
    stub = skeleton["llm"]["layers"]["mlp"]["linear"]
    assert (
        isinstance(stub, jax.ShapeDtypeStruct)
        and stub.shape == bf16[1]["llm"]["layers"]["mlp"]["linear"].shape
    )
    # ... and the official tree is rebuilt from the blocks bit for bit
    _assert_trees_equal(official_params(run, skeleton), bf16[1])


def test_pk_load_gives_the_same_tokens_and_params(saved, bf16):
    config, params = bf16
    model = pk.load(saved, verbose=False)
    assert model._run_replaced  # loaded straight into the run layout: nothing left to lay out
    _assert_trees_equal(model.params, params)
    assert_generates_like_the_official_tree(model, params, config)


def _member_data_start(path, key):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    data = path.read_bytes()
    name_len, extra_len = np.frombuffer(data[info.header_offset + 26 :][:4], "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len), info


@pytest.mark.parametrize("crc_combine", [True, False])
def test_flipped_byte_in_a_blocked_matrix_is_caught(tmp_path, saved, monkeypatch, crc_combine):
    if not crc_combine:
        monkeypatch.setattr(checkpoints, "crc32_combine", None)
    start, info = _member_data_start(saved, LINEAR)
    data = bytearray(saved.read_bytes())
    data[start + info.file_size - 3] ^= 0x01  # a value in the last layer's last block
    bad = tmp_path / "flip.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"flip.npz: {LINEAR} is truncated or corrupt.*"
                       "CRC-32 mismatch.*Download or copy the file again"):  # fmt: skip
        load_cpu_inference(bad)


def test_header_claiming_more_bytes_than_the_member_holds(tmp_path, saved, bf16):
    """The .npy header and the zip directory disagree: caught before reading."""
    shape = bf16[1]["llm"]["layers"]["mlp"]["linear"].shape
    start, info = _member_data_start(saved, LINEAR)
    data = bytearray(saved.read_bytes())
    old = f"'shape': {shape}".encode()
    new = f"'shape': ({shape[0]}, {shape[1]}, {shape[2] + 1})".encode()
    assert len(new) == len(old)
    at = data.index(old, start)
    data[at : at + len(old)] = new
    bad = tmp_path / "grown.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"grown.npz: {LINEAR} is truncated or corrupt"):
        load_cpu_inference(bad)


def test_truncated_file_is_a_checkpoint_error(tmp_path, saved):
    cut = tmp_path / "cut.npz"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.npz.*truncated download.*Download it again"):
        load_cpu_inference(cut)


def test_other_files_keep_the_streaming_reader(tmp_path, bf16, saved):
    params = bf16[1]
    f32 = save_params(jax.tree.map(lambda a: a.astype(jnp.float32), params), tmp_path / "f.npz")
    assert load_cpu_inference(f32) is None  # float32: no (out, in) blocks
    assert load_cpu_inference(saved, "float32") is None  # a cast while reading
    assert load_cpu_inference(saved, "bfloat16") is not None  # no cast: fine
    flat = {k: checkpoints._to_storable(v) for k, v in checkpoints.flatten(params).items()}
    packed = tmp_path / "z.npz"
    np.savez_compressed(packed, **flat)
    assert load_cpu_inference(packed) is None  # compressed members: streamed as before
    # and pk.load still reads these through load_params
    model = pk.load(packed, verbose=False)
    assert not model._run_replaced
    _assert_trees_equal(model.params, params)


def _linux_at_least(major: int, minor: int) -> bool:
    if platform.system() != "Linux":
        return False
    return tuple(int(x) for x in platform.release().split(".")[:2]) >= (major, minor)


@pytest.mark.skipif(not _linux_at_least(5, 14), reason="MADV_POPULATE_WRITE needs Linux 5.14")
def test_prefaulted_arrays_are_resident_before_the_first_write():
    from pali_kit.model.common import aligned_empty

    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE

    before = resident_bytes()
    a = aligned_empty((64 << 20,), np.uint8)  # 64 MB, untouched: not resident yet
    assert resident_bytes() - before < 8 << 20
    assert checkpoints._prefaulted(a) is a
    assert resident_bytes() - before >= 60 << 20
    a[::4096] = 1  # and still an ordinary writable array
    assert int(a.sum()) == (64 << 20) // 4096


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_same_run_tree_while_the_pages_are_faulted_in_alongside(saved, bf16, monkeypatch):
    # every array, however small, faulted in by the helper thread a page at a time
    # while the reader writes into the same arrays
    monkeypatch.setattr(checkpoints, "PREFAULT_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoints, "PREFAULT_STEP", mmap.PAGESIZE)
    started = []
    enter = checkpoints._Prefaulter.__enter__
    monkeypatch.setattr(checkpoints._Prefaulter, "__enter__",
                        lambda self: started.append(len(self.arrays)) or enter(self))  # fmt: skip
    skeleton, run = load_cpu_inference(saved)
    assert started and started[0] == len(jax.tree.leaves(bf16[1]))  # all arrays, up front
    _assert_trees_equal(run, cpu_layout(load_params(saved), in_place=True))
    _assert_trees_equal(official_params(run, skeleton), bf16[1])


@pytest.mark.skipif(not _linux_at_least(5, 14), reason="MADV_POPULATE_WRITE needs Linux 5.14")
def test_the_prefaulter_makes_arrays_resident_in_order_and_stops_on_errors(monkeypatch):
    from pali_kit.model.common import aligned_empty

    before = _resident_bytes()
    arrays = [aligned_empty((32 << 20,), np.uint8) for _ in range(2)]  # untouched
    assert _resident_bytes() - before < 8 << 20
    with checkpoints._Prefaulter(arrays) as p:
        p.thread.join()  # it ends by itself once every array is in
    assert _resident_bytes() - before >= 60 << 20
    # an error in the reader stops the thread before the with-block is left
    monkeypatch.setattr(checkpoints, "PREFAULT_STEP", mmap.PAGESIZE)  # a slow thread
    more = [aligned_empty((64 << 20,), np.uint8)]
    with pytest.raises(CheckpointError), checkpoints._Prefaulter(more) as p:
        raise CheckpointError("a corrupt member")
    assert p.thread is not None and not p.thread.is_alive()
    for a in arrays + more:  # still ordinary writable arrays
        a[::4096] = 1
        assert int(a.sum()) == a.size // 4096
