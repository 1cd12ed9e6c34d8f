"""Loading and saving official-layout .npz checkpoints, and every bad-file case."""

from __future__ import annotations

import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pali_kit as pk
from pali_kit import checkpoints
from pali_kit.checkpoints import CheckpointError, flatten, infer_config, load_params, save_params

from .conftest import reference, tiny_config


@pytest.fixture(scope="module")
def tiny_params():
    return pk.init_params(tiny_config(), 7)


def _leaves_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype, k
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_params, dtype):
    params = jax.tree.map(lambda a: a.astype(dtype), tiny_params)
    path = save_params(params, tmp_path / "ckpt.npz")
    _leaves_equal(load_params(path), params)


def test_bfloat16_is_stored_as_two_byte_void(tmp_path, tiny_params):
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    path = save_params(params, tmp_path / "b16.npz")
    with np.load(path, allow_pickle=False) as z:
        arr = z["llm/final_norm/scale"]
    assert arr.dtype == np.dtype("V2")
    np.testing.assert_array_equal(
        arr.view(ml_dtypes.bfloat16), np.asarray(params["llm"]["final_norm"]["scale"])
    )


def test_file_written_by_numpy_savez_with_params_prefix_loads(tmp_path, tiny_params):
    flat = {f"params/{k}": np.asarray(v) for k, v in flatten(tiny_params).items()}
    flat["opt/state/mu"] = np.zeros(3, np.float32)  # optimizer state beside the params
    np.savez(tmp_path / "bv.npz", **flat)
    _leaves_equal(load_params(tmp_path / "bv.npz"), tiny_params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cast_while_loading(tmp_path, tiny_params, dtype):
    path = save_params(tiny_params, tmp_path / "f32.npz")
    loaded = load_params(path, dtype=dtype)
    for leaf in jax.tree.leaves(loaded):
        assert leaf.dtype == jnp.dtype(dtype)
    ref = jax.tree.map(lambda a: a.astype(dtype), tiny_params)
    _leaves_equal(loaded, ref)


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_files_upcast_while_loading(tmp_path, tiny_params, stored):
    params = jax.tree.map(lambda a: a.astype(stored), tiny_params)
    path = save_params(params, tmp_path / "half.npz")
    loaded = load_params(path, dtype="float32")
    for leaf in jax.tree.leaves(loaded):
        assert leaf.dtype == jnp.float32
    _leaves_equal(loaded, jax.tree.map(lambda a: a.astype(jnp.float32), params))


def test_reference_fixture_loads_and_config_is_inferred():
    path, _ = reference("pub_gemma2")
    params = load_params(path)
    config = infer_config(params)
    assert config.vision.image_size == 28 and config.vision.patch_size == 14
    assert config.vision.num_heads == 2 and config.vision.depth == 1
    assert config.llm.post_norms and config.llm.attn_logits_softcap == 50.0
    assert config.llm.final_logits_softcap == 0.0
    assert (config.llm.num_heads, config.llm.num_kv_heads, config.llm.head_dim) == (4, 2, 8)
    assert config.llm.vocab_size == 300
    gemma1 = infer_config(load_params(reference("pub_gemma1")[0]))
    assert not gemma1.llm.post_norms and gemma1.llm.num_kv_heads == 1


@pytest.mark.parametrize(
    "name", ["paligemma-3b-pt-896", "paligemma2-3b-pt-448", "paligemma2-28b-pt-224"]
)
def test_infer_config_recovers_the_official_configs(name):
    config = pk.CHECKPOINTS[name].config
    assert infer_config(pk.param_shapes(config)) == config


def test_pk_load_npz_with_overrides(tmp_path, tiny_params):
    path = save_params(tiny_params, tmp_path / "tiny.npz")
    model = pk.load(path, verbose=False, final_logits_softcap=30.0)
    assert model.config.llm.final_logits_softcap == 30.0
    assert model.config.vision.image_size == 28
    model = pk.load(str(path), dtype="bfloat16", verbose=False)
    assert model.dtype == jnp.bfloat16


def test_pk_load_prints_a_summary(tmp_path, tiny_params, capsys):
    pk.load(save_params(tiny_params, tmp_path / "tiny.npz"))
    out = capsys.readouterr().err  # a status line: on stderr
    assert "params" in out and "float32" in out and "28 px" in out


def test_pk_save_round_trips_a_model(tmp_path, tiny_params):
    model = pk.Model(tiny_params, tiny_config())
    path = pk.save(model, tmp_path / "m.npz")
    _leaves_equal(pk.load(path, verbose=False).params, tiny_params)


# --- bad files ---------------------------------------------------------------------------


def _write(tmp_path, flat, name="bad.npz"):
    np.savez(tmp_path / name, **{k: np.asarray(v) for k, v in flat.items()})
    return tmp_path / name


def test_missing_parameter_is_named(tmp_path, tiny_params):
    flat = flatten(tiny_params)
    del flat["llm/final_norm/scale"]
    path = _write(tmp_path, flat)
    with pytest.raises(
        CheckpointError, match=r"llm/final_norm/scale.*bad\.npz|bad\.npz.*llm/final_norm/scale"
    ):
        pk.load(path, verbose=False)


def test_unexpected_parameter_is_named(tmp_path, tiny_params):
    flat = flatten(tiny_params)
    flat["llm/layers/attn/extra/w"] = np.zeros((2, 3), np.float32)
    with pytest.raises(CheckpointError, match="unexpected parameter llm/layers/attn/extra/w"):
        pk.load(_write(tmp_path, flat), verbose=False)


def test_misshaped_parameter_is_named(tmp_path, tiny_params):
    flat = flatten(tiny_params)
    flat["llm/layers/pre_ffw_norm/scale"] = np.zeros((2, 31), np.float32)
    with pytest.raises(CheckpointError, match=r"llm/layers/pre_ffw_norm/scale.*\(2, 31\)"):
        pk.load(_write(tmp_path, flat), verbose=False)


def test_not_a_paligemma_checkpoint(tmp_path):
    path = _write(tmp_path, {"w": np.zeros(3)})
    with pytest.raises(CheckpointError, match="is this a PaliGemma checkpoint"):
        pk.load(path, verbose=False)


def test_truncated_file(tmp_path, tiny_params):
    path = save_params(tiny_params, tmp_path / "full.npz")
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_params(cut)


def test_corrupt_bytes_inside_an_array(tmp_path, tiny_params):
    path = save_params(tiny_params, tmp_path / "ok.npz")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    middle = info.header_offset + 30 + len(info.filename) + 200
    data[middle] ^= 0xFF
    bad = tmp_path / "flip.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_params(bad)


def test_pickled_object_array_is_refused_not_unpickled(tmp_path):
    flagged = tmp_path / "flag"

    class Boom:
        def __reduce__(self):
            return (flagged.touch, ())

    arr = np.empty(1, dtype=object)
    arr[0] = Boom()
    np.savez(tmp_path / "obj.npz", x=arr)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_params(tmp_path / "obj.npz")
    assert not flagged.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_params(tmp_path / "nothere.npz")
    with pytest.raises(FileNotFoundError, match="not a checkpoint name"):
        pk.load(str(tmp_path / "nothere.npz"), verbose=False)


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, tiny_params, monkeypatch):
    path = save_params(tiny_params, tmp_path / "keep.npz")
    before = path.read_bytes()
    calls = {"n": 0}
    real = np.lib.format.write_array

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", flaky)
    doubled = jax.tree.map(lambda a: a * 2, tiny_params)
    with pytest.raises(OSError, match="disk full"):
        save_params(doubled, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npz"]  # no temp file left behind


def test_checkpoint_keys_reads_headers_only(tmp_path, tiny_params):
    path = save_params(
        jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_params), tmp_path / "k.npz"
    )
    keys = checkpoints.checkpoint_keys(path)
    assert keys["llm/embedder/input_embedding"] == ((2176, 32), np.dtype(ml_dtypes.bfloat16))


def test_loading_can_show_a_progress_bar(tmp_path, tiny_params, capsys):
    path = save_params(tiny_params, tmp_path / "bar.npz")
    load_params(path, progress=True)
    assert "loading bar.npz" in capsys.readouterr().err
    load_params(path)  # small files: no bar by default
    assert "loading" not in capsys.readouterr().err
