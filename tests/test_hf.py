"""Specification of pali_kit.hf: transformers folders <-> the big_vision tree (no torch needed).

The comparison with transformers itself lives in test_parity.py; here every
rule is checked against the math it stands for, and folders are written by
``export_hf`` and then edited (renamed keys, changed config) to cover the
layouts and the errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from pali_kit import hf
from pali_kit.checkpoints import CheckpointError, flatten, unflatten
from pali_kit.configs import GemmaConfig, PaliGemmaConfig, VisionConfig
from pali_kit.model import param_shapes

from .conftest import F32_EPS, assert_close_to_scale

VISION = VisionConfig(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=4, image_size=16)
PG1 = PaliGemmaConfig(  # Gemma 1, multi-query, W == Nh * H
    vision=VISION,
    llm=GemmaConfig(variant="custom", width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1,
                    head_dim=16, vocab_size=300),
)  # fmt: skip
PG2 = PaliGemmaConfig(  # Gemma 2, grouped-query, W != Nh * H
    vision=VISION,
    llm=GemmaConfig(variant="custom", width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2,
                    head_dim=32, vocab_size=300, post_norms=True, attn_logits_softcap=50.0),
)  # fmt: skip
CONFIGS = {"pg1": PG1, "pg2": PG2}


def random_params(config, seed=0, dtype=np.float32) -> dict:
    """Random params in the official tree: every leaf different, nothing zero."""
    rng = np.random.default_rng(seed)
    flat = flatten(param_shapes(config))
    return unflatten(
        {k: jnp.asarray(rng.standard_normal(s.shape).astype(dtype)) for k, s in flat.items()}
    )


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def read_all(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def rewrite_keys(folder: Path, rename) -> None:
    """Rename every tensor of model.safetensors (to fake another transformers layout)."""
    tensors = read_all(folder / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, str(folder / "model.safetensors"))


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def export(config, folder, **kw):
    params = random_params(config)
    return params, config, hf.export_hf(params, folder, config, **kw)


@pytest.fixture
def exported(tmp_path):
    """(params, config, folder) of a random PaliGemma 2 model exported with export_hf."""
    return export(PG2, tmp_path / "hf")


@pytest.fixture(params=["pg1", "pg2"])
def exported_both(request, tmp_path):
    """The same for PaliGemma 1 and 2."""
    return export(CONFIGS[request.param], tmp_path / "hf")


# ------------------------------------------------------------------ round trips


def test_export_then_load_gives_back_the_same_params_and_config(exported_both):
    params, config, folder = exported_both
    loaded, loaded_config = hf.load_hf(folder)
    assert_same_params(loaded, params)
    assert loaded_config == config


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    params = random_params(PG2, dtype=ml_dtypes.bfloat16)
    folder = hf.export_hf(params, tmp_path / "bf16", PG2)
    assert {t["dtype"] for t in hf.read_header(folder / "model.safetensors").values()} == {"BF16"}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = hf.load_hf(folder)
    assert_same_params(loaded, params)


def test_dtype_argument_casts_while_loading(exported):
    _, _, folder = exported
    loaded, _ = hf.load_hf(folder, dtype="bfloat16")
    assert {str(a.dtype) for a in flatten(loaded).values()} == {"bfloat16"}


def test_export_accepts_an_object_with_params_and_config(tmp_path):
    class Model:
        params = random_params(PG1)
        config = PG1

    loaded, config = hf.load_hf(hf.export_hf(Model(), tmp_path / "obj"))
    assert config == PG1
    assert_same_params(loaded, Model.params)


def test_sharded_export_writes_an_index_and_loads_back(tmp_path):
    params = random_params(PG2)
    folder = hf.export_hf(params, tmp_path / "sharded", PG2, max_shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    assert all((folder / s).exists() for s in shards)
    loaded, _ = hf.load_hf(folder)
    assert_same_params(loaded, params)


def test_re_export_unsharded_removes_the_old_shards_and_keeps_other_files(tmp_path):
    params = random_params(PG1)
    folder = hf.export_hf(params, tmp_path / "f", PG1, max_shard_bytes=40_000)
    (folder / "tokenizer.model").write_bytes(b"keep me")
    hf.export_hf(params, folder, PG1)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.model"]


def test_failed_export_leaves_no_partial_files(tmp_path, monkeypatch):
    def broken(a, c):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf.mapping, "embed_to_hf", broken)  # after the vision tensors are written
    with pytest.raises(RuntimeError, match="disk full"):
        hf.export_hf(random_params(PG1), tmp_path / "broken", PG1)
    assert list((tmp_path / "broken").iterdir()) == []


# ------------------------------------------------------------------ config.json


def test_exported_config_follows_transformers_conventions(exported_both):
    _, config, folder = exported_both
    cfg = json.loads((folder / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == "paligemma"
    assert cfg["image_token_index"] == 300  # the first id after the kit vocabulary
    assert cfg["vocab_size"] == text["vocab_size"] == 320  # 300 + <image>, up to a multiple of 64
    assert cfg["projection_dim"] == cfg["hidden_size"] == vision["projection_dim"] == 64
    assert text["model_type"] == ("gemma2" if config.llm.post_norms else "gemma")
    assert text["head_dim"] == config.llm.head_dim
    assert (
        vision["image_size"] == 16 and vision["patch_size"] == 4 and not vision["vision_use_head"]
    )
    assert text["final_logit_softcapping"] is None  # disabled softcap: null, never 0.0
    if config.llm.post_norms:
        assert text["attn_logit_softcapping"] == 50.0
        assert text["query_pre_attn_scalar"] == config.llm.head_dim


def test_disabled_attention_softcap_is_written_as_null_and_enabled_final_as_a_number():
    config = PG2.replace(attn_logits_softcap=0.0, final_logits_softcap=30.0)
    text = hf.hf_config(config)["text_config"]
    assert text["attn_logit_softcapping"] is None
    assert text["final_logit_softcapping"] == 30.0


def test_28b_style_query_scale_round_trips_as_query_pre_attn_scalar(tmp_path):
    config = PG2.replace(query_pre_attn_norm="rsqrt_emb_per_head")  # 64 / 4 = 16 != head_dim 32
    assert hf.hf_config(config)["text_config"]["query_pre_attn_scalar"] == 16
    _, loaded = hf.load_hf(hf.export_hf(random_params(config), tmp_path / "q", config))
    assert loaded.llm.query_pre_attn_norm == "rsqrt_emb_per_head"


def test_official_vocabulary_gets_transformers_257216_rows():
    assert hf.hf_rows(257_152) == 257_216


def test_hf_only_embedding_rows_are_the_mean_row(exported):
    params, _, folder = exported
    table = read_all(folder / "model.safetensors")["language_model.model.embed_tokens.weight"]
    kit = np.asarray(params["llm"]["embedder"]["input_embedding"])
    np.testing.assert_array_equal(table[:300], kit)
    # the mean of 300 float32 rows, summed by the export and by numpy in other orders: at
    # most K * eps = 300 eps of the scale apart
    mean = np.broadcast_to(kit.mean(0), (20, 64))
    assert_close_to_scale(table[300:], mean, 300 * F32_EPS)


def test_missing_sizes_in_config_json_come_from_the_shapes(exported):
    params, config, folder = exported

    def strip(cfg):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size"):
            cfg["vision_config"].pop(key, None)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"):
            cfg["text_config"].pop(key)

    edit_config(folder, strip)
    _, loaded = hf.load_hf(folder)
    assert loaded == config


def test_absent_softcaps_take_transformers_defaults_except_the_final_one(tmp_path):
    folder = hf.export_hf(
        random_params(PG2), tmp_path / "caps", PG2.replace(attn_logits_softcap=0.0)
    )

    def drop_caps(cfg):
        cfg["text_config"].pop("attn_logit_softcapping")
        cfg["text_config"].pop("final_logit_softcapping")

    edit_config(folder, drop_caps)
    _, config = hf.load_hf(folder)
    assert config.llm.attn_logits_softcap == 50.0  # Gemma 2's default in transformers
    assert config.llm.final_logits_softcap == 0.0  # the kit's PaliGemma 2 default


def test_null_softcaps_load_as_disabled(tmp_path):
    folder = hf.export_hf(
        random_params(PG2), tmp_path / "null", PG2.replace(attn_logits_softcap=0.0)
    )
    _, config = hf.load_hf(folder)
    assert config.llm.attn_logits_softcap == 0.0 and config.llm.final_logits_softcap == 0.0


def test_known_architectures_get_their_big_vision_name():
    import dataclasses

    from pali_kit.configs import GEMMA_VARIANTS

    custom = dataclasses.replace(
        GEMMA_VARIANTS["gemma2_27b"], variant="custom", final_logits_softcap=30.0
    )
    assert hf.named_variant(custom).variant == "gemma2_27b"


# ------------------------------------------------------------------ layouts


def test_transformers_5_layout_without_vision_model_level_loads(exported_both):
    params, _, folder = exported_both
    rewrite_keys(folder, lambda k: k.replace("vision_tower.vision_model.", "vision_tower."))
    loaded, _ = hf.load_hf(folder)
    assert_same_params(loaded, params)


def test_new_model_prefixed_layout_with_tied_lm_head_loads(exported):
    params, _, folder = exported
    tensors = read_all(folder / "model.safetensors")
    new = {}
    for key, value in tensors.items():
        key = key.replace("language_model.model.", "model.language_model.")
        key = key.replace("vision_tower.vision_model.", "model.vision_tower.")
        key = key.replace("multi_modal_projector.", "model.multi_modal_projector.")
        new[key] = value
    new["lm_head.weight"] = new["model.language_model.embed_tokens.weight"]
    save_file(new, str(folder / "model.safetensors"))
    loaded, _ = hf.load_hf(folder)
    assert_same_params(loaded, params)


def test_untied_lm_head_is_refused(exported):
    _, _, folder = exported
    tensors = read_all(folder / "model.safetensors")
    table = tensors["language_model.model.embed_tokens.weight"]
    tensors["language_model.lm_head.weight"] = table + 1
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="language_model.lm_head.weight differs"):
        hf.load_hf(folder)


def test_same_weight_in_two_layouts_is_refused(exported):
    _, _, folder = exported
    tensors = read_all(folder / "model.safetensors")
    tensors["model.language_model.norm.weight"] = tensors["language_model.model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="two naming layouts"):
        hf.load_hf(folder)


def test_gemma1_post_attention_layernorm_is_the_pre_ffw_norm(tmp_path):
    params = random_params(PG1)
    tensors = read_all(hf.export_hf(params, tmp_path / "g1", PG1) / "model.safetensors")
    pre_ffw = np.asarray(params["llm"]["layers"]["pre_ffw_norm"]["scale"])
    for i in range(PG1.llm.depth):
        hf_norm = tensors[f"language_model.model.layers.{i}.post_attention_layernorm.weight"]
        np.testing.assert_array_equal(hf_norm, pre_ffw[i])


def test_gemma2_norms_map_one_to_one(tmp_path):
    params = random_params(PG2)
    tensors = read_all(hf.export_hf(params, tmp_path / "g2", PG2) / "model.safetensors")
    layers = params["llm"]["layers"]
    for kit, name in hf.GEMMA2_NORMS.items():
        hf_norm = tensors[f"language_model.model.layers.1.{name}.weight"]
        np.testing.assert_array_equal(hf_norm, np.asarray(layers[kit]["scale"][1]))


# ------------------------------------------------------------------ errors


def test_config_that_disagrees_with_the_weights_names_file_and_key(exported):
    _, _, folder = exported
    edit_config(folder, lambda cfg: cfg["text_config"].update(intermediate_size=128))
    with pytest.raises(CheckpointError) as err:
        hf.load_hf(folder)
    message = str(err.value)
    assert "model.safetensors" in message and "layers.0.mlp.gate_proj.weight" in message
    assert "(96, 64)" in message and "(128, 64)" in message


def test_wrong_head_count_is_caught(exported):
    _, _, folder = exported
    edit_config(folder, lambda cfg: cfg["text_config"].update(num_key_value_heads=4))
    with pytest.raises(CheckpointError, match="k_proj.weight has shape"):
        hf.load_hf(folder)
    edit_config(folder, lambda cfg: cfg["text_config"].update(num_key_value_heads=3))
    with pytest.raises(CheckpointError, match="not a multiple"):
        hf.load_hf(folder)


def test_extra_layers_are_reported(exported):
    _, _, folder = exported
    edit_config(folder, lambda cfg: cfg["text_config"].update(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        hf.load_hf(folder)


def test_missing_tensor_is_named(exported):
    _, _, folder = exported
    tensors = read_all(folder / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor text\.layers\.1\.mlp\.up_proj"):
        hf.load_hf(folder)


def test_folder_without_config_json_says_what_is_missing(exported):
    _, _, folder = exported
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.load_hf(folder)


def test_a_file_instead_of_a_folder_points_to_the_npz_loader(exported):
    _, _, folder = exported
    with pytest.raises(CheckpointError, match="load_params"):
        hf.load_hf(folder / "model.safetensors")


def test_pickle_weights_are_not_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config(PG1)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors only"):
        hf.load_hf(tmp_path)


def test_other_model_types_are_refused(exported):
    _, _, folder = exported
    edit_config(folder, lambda cfg: cfg["text_config"].update(model_type="gemma3_text"))
    with pytest.raises(CheckpointError, match="gemma3_text"):
        hf.load_hf(folder)


def test_gemma1_with_attention_softcap_cannot_be_exported(tmp_path):
    config = PG1.replace(attn_logits_softcap=50.0)
    with pytest.raises(ValueError, match="Gemma 1 has no attention softcap"):
        hf.export_hf(random_params(config), tmp_path / "x", config)


# ------------------------------------------------------------------ reading


def test_loading_needs_no_torch(exported, monkeypatch):
    _, _, folder = exported
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    hf.load_hf(folder)


def test_reader_and_writer_agree_with_safetensors_for_every_dtype(tmp_path):
    arrays = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f16": np.arange(6, dtype=np.float16),
        "bf16": (np.arange(10, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16).reshape(2, 5),
    }
    save_file(arrays, str(tmp_path / "x.safetensors"))  # the library writes, the kit reads
    header = hf.read_header(tmp_path / "x.safetensors")
    pending = []
    for name, array in arrays.items():
        assert header[name]["shape"] == list(array.shape)
        assert hf.SAFETENSORS_DTYPES[header[name]["dtype"]] == array.dtype
        pending.append(hf.files.Pending(name, array.shape, array.dtype, lambda a=array: a))
    hf.files.write_safetensors(tmp_path / "y.safetensors", pending)  # the kit writes
    with safe_open(str(tmp_path / "y.safetensors"), framework="numpy") as f:  # the library reads
        for name, array in arrays.items():
            back = f.get_tensor(name)
            assert back.dtype == array.dtype
            np.testing.assert_array_equal(back, array)


def test_a_truncated_safetensors_file_says_download_again(tmp_path):
    save_file({"a": np.ones((4, 4), np.float32)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="download it again"):
        hf.read_header(tmp_path / "x.safetensors")


# ------------------------------------------------------------------ the math of each rule


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def same_product(a, b):
    """Two float64 products of the same standard-normal numbers, summed in other orders.

    A sum of K <= 128 terms moves by up to K * eps64 = 3e-14 of max |term| when
    re-associated; relative to max |result| (~ sqrt(K) * max |term|), 1e-12 bounds it.
    An elementwise rtol would fail on results that cancel to near zero.
    """
    assert_close_to_scale(a, b, 1e-12)


def test_q_rule_computes_the_same_projection(rng):
    w = rng.standard_normal((4 * 32, 64))  # HF q_proj (Nh*H, W)
    x = rng.standard_normal(64)
    q = hf.q_to_kit(w, PG2)  # (Nh, W, H)
    same_product(np.einsum("d,ndh->nh", x, q).reshape(-1), w @ x)
    np.testing.assert_array_equal(hf.q_to_hf(q, PG2)[0], w)


def test_kv_rule_puts_keys_first_and_values_second(rng):
    k, v = rng.standard_normal((2, 2 * 32, 64))  # (K*H, W) each
    x = rng.standard_normal(64)
    kv = hf.kv_to_kit(k, v, PG2)  # (2, K, W, H)
    same_product(np.einsum("d,kdh->kh", x, kv[0]).reshape(-1), k @ x)
    same_product(np.einsum("d,kdh->kh", x, kv[1]).reshape(-1), v @ x)
    back = hf.kv_to_hf(kv, PG2)
    np.testing.assert_array_equal(back[0], k)
    np.testing.assert_array_equal(back[1], v)


def test_o_rule_computes_the_same_projection_when_width_differs_from_heads(rng):
    w = rng.standard_normal((64, 4 * 32))  # HF o_proj (W, Nh*H)
    enc = rng.standard_normal((4, 32))
    o = hf.o_to_kit(w, PG2)  # (Nh, H, W)
    same_product(np.einsum("nh,nhd->d", enc, o), w @ enc.reshape(-1))
    np.testing.assert_array_equal(hf.o_to_hf(o, PG2)[0], w)


def test_gating_rule_puts_gate_first_and_up_second(rng):
    gate, up = rng.standard_normal((2, 96, 64))
    x = rng.standard_normal(64)
    g = hf.gating_to_kit(gate, up, PG1)  # (2, W, F)
    same_product(x @ g[0], gate @ x)
    same_product(x @ g[1], up @ x)


def test_vision_attention_rules_compute_the_same_projections(rng):
    w_in, bias = rng.standard_normal((32, 32)), rng.standard_normal(32)
    x = rng.standard_normal(32)
    kernel, b = hf.vit_qkv_to_kit(w_in, PG1), hf.vit_qkv_bias_to_kit(bias, PG1)  # (D, n, h), (n, h)
    same_product((np.einsum("d,dnh->nh", x, kernel) + b).reshape(-1), w_in @ x + bias)
    w_out = rng.standard_normal((32, 32))
    enc = rng.standard_normal((4, 8))
    out = hf.vit_out_to_kit(w_out, PG1)  # (n, h, D)
    same_product(np.einsum("nh,nhd->d", enc, out), w_out @ enc.reshape(-1))


def test_patch_rule_computes_the_same_convolution(rng):
    w = rng.standard_normal((32, 3, 4, 4))  # torch Conv2d (out, in, kh, kw)
    patch = rng.standard_normal((4, 4, 3))  # one image patch, HWC
    kernel = hf.patch_to_kit(w, PG1)  # HWIO
    torch_conv = np.einsum("oikl,kli->o", w, patch)
    same_product(np.einsum("klio,kli->o", kernel, patch), torch_conv)
    np.testing.assert_array_equal(hf.patch_to_hf(kernel, PG1)[0], w)


def test_every_hf_name_maps_from_one_of_the_known_prefixes():
    for prefix, short in hf.PREFIXES:
        assert hf.short_name(prefix + "x.weight") == short + "x.weight"
    assert hf.short_name("model.vision_tower.vision_model.post_layernorm.weight") == (
        "vision.post_layernorm.weight"
    )
    assert hf.short_name("encoder.layers.0.weight") is None


def test_loaded_arrays_are_adopted_without_a_second_copy(tmp_path):
    # load_hf writes each array into page-aligned memory that JAX adopts as it is
    # (the .npz reader does the same), so a model loads at about one copy of its
    # weights; converting a finished numpy array with jnp.asarray made XLA copy
    # it (1.77x the weights at peak for a 3B bf16 folder). Arrays of 4 MiB and up
    # start on a 2 MiB boundary (checkpoints' aligned buffers); an array XLA
    # allocated itself would not.
    config = PG2.replace(vocab_size=20000)  # a 5.1 MB embedding table
    params, _, folder = export(config, tmp_path / "hf")
    loaded, _ = hf.load_hf(folder)
    big = {k: a for k, a in flatten(loaded).items() if a.nbytes >= 1 << 22}
    assert "llm/embedder/input_embedding" in big
    for key, a in big.items():
        assert a.unsafe_buffer_pointer() % (1 << 21) == 0, f"{key} was copied after loading"
    assert_same_params(params, loaded)
