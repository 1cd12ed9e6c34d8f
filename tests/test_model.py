"""The model reproduces big_vision: shapes, counts, masks, image embeddings and logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pali_kit as pk
from pali_kit.configs import paligemma_config
from pali_kit.model import PaliGemma, count_params, make_attn_mask, param_shapes

from .conftest import tiny_config

# Spec 1.5: parameter counts computed from the official shapes.
PUBLISHED_COUNTS = {
    "paligemma-3b-pt-224": 2_923_335_408,
    "paligemma-3b-pt-448": 2_924_220_144,
    "paligemma-3b-pt-896": 2_927_759_088,
    "paligemma2-3b-pt-224": 3_032_094_960,
    "paligemma2-3b-pt-448": 3_032_979_696,
    "paligemma2-3b-pt-896": 3_036_518_640,
    "paligemma2-10b-pt-224": 9_662_409_456,
    "paligemma2-10b-pt-448": 9_663_294_192,
    "paligemma2-10b-pt-896": 9_666_833_136,
    "paligemma2-28b-pt-224": 27_650_192_112,
    "paligemma2-28b-pt-448": 27_651_076_848,
    "paligemma2-28b-pt-896": 27_654_615_792,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_param_count_matches_published(name):
    assert count_params(pk.param_shapes(name)) == PUBLISHED_COUNTS[name]


def test_mix_and_transfer_checkpoints_have_the_pt_architecture():
    assert count_params(pk.param_shapes("paligemma-3b-mix-448")) == 2_924_220_144
    assert count_params(pk.param_shapes("paligemma-3b-ft-refcoco-seg-896")) == 2_927_759_088
    assert count_params(pk.param_shapes("paligemma2-10b-mix-224")) == 9_662_409_456


def test_image_tower_alone_has_published_count():
    shapes = pk.param_shapes("paligemma-3b-pt-224")
    assert count_params(shapes["img"]) == 414_803_696


def _flat(tree):
    return {
        "/".join(k.key for k in path): v.shape
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_per_key_shapes_of_paligemma1_224():
    s = _flat(param_shapes("paligemma-3b-pt-224"))
    enc = "img/Transformer/encoderblock"
    assert s["img/embedding/kernel"] == (14, 14, 3, 1152)
    assert s["img/pos_embedding"] == (1, 256, 1152)
    assert s[f"{enc}/MultiHeadDotProductAttention_0/query/kernel"] == (27, 1152, 16, 72)
    assert s[f"{enc}/MultiHeadDotProductAttention_0/out/kernel"] == (27, 16, 72, 1152)
    assert s[f"{enc}/MlpBlock_0/Dense_0/kernel"] == (27, 1152, 4304)
    assert s["img/head/kernel"] == (1152, 2048)
    assert s["llm/embedder/input_embedding"] == (257152, 2048)
    assert s["llm/layers/attn/q_einsum/w"] == (18, 8, 2048, 256)
    assert s["llm/layers/attn/kv_einsum/w"] == (18, 2, 1, 2048, 256)
    assert s["llm/layers/attn/attn_vec_einsum/w"] == (18, 8, 256, 2048)
    assert s["llm/layers/mlp/gating_einsum"] == (18, 2, 2048, 16384)
    assert s["llm/layers/mlp/linear"] == (18, 16384, 2048)
    assert "llm/layers/post_attention_norm/scale" not in s
    assert len(s) == 32


@pytest.mark.parametrize("name", ["pub_gemma1", "pub_gemma2"])
def test_tree_has_exactly_the_reference_keys(name):
    from pali_kit.checkpoints import checkpoint_keys, infer_config

    from .conftest import reference

    stored = checkpoint_keys(reference(name)[0])
    config = infer_config({k: shape for k, (shape, _) in stored.items()})
    ours = _flat(param_shapes(config))
    assert ours == {k: shape for k, (shape, _) in stored.items()}


@pytest.mark.parametrize(
    "name, q, kv, gating",
    [
        ("paligemma2-3b-pt-448", (26, 8, 2304, 256), (26, 2, 4, 2304, 256), (26, 2, 2304, 9216)),
        ("paligemma2-10b-pt-224", (42, 16, 3584, 256), (42, 2, 8, 3584, 256), (42, 2, 3584, 14336)),
        (
            "paligemma2-28b-pt-896",
            (46, 32, 4608, 128),
            (46, 2, 16, 4608, 128),
            (46, 2, 4608, 36864),
        ),
    ],
)
def test_per_key_shapes_of_paligemma2(name, q, kv, gating):
    s = _flat(param_shapes(name))
    assert s["llm/layers/attn/q_einsum/w"] == q
    assert s["llm/layers/attn/kv_einsum/w"] == kv
    assert s["llm/layers/mlp/gating_einsum"] == gating
    assert s["llm/layers/post_ffw_norm/scale"] == (q[0], q[2])
    res = int(name.rsplit("-", 1)[1])
    assert s["img/pos_embedding"] == (1, (res // 14) ** 2, 1152)


def test_28b_query_scale_is_rsqrt_width_per_head():
    llm = paligemma_config("gemma2_27b").llm
    assert llm.query_scale == pytest.approx(1 / 12)
    assert paligemma_config("gemma2_9b").llm.query_scale == pytest.approx(1 / 16)


def test_mask_from_spec_example():
    # tokens [img img BOS cap \n | a cat EOS]: 5 prefix tokens, then 3 causal ones.
    mask_ar = jnp.array([[0, 0, 0, 0, 0, 1, 1, 1]])
    m = np.asarray(make_attn_mask(jnp.ones((1, 8), bool), mask_ar))[0].astype(int)
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    np.testing.assert_array_equal(m, expected)


def test_mask_all_ones_is_causal_and_alternating_is_block_causal():
    causal = np.asarray(make_attn_mask(jnp.ones((1, 4), bool), jnp.ones((1, 4), int)))[0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
    block = np.asarray(make_attn_mask(jnp.ones((1, 4), bool), jnp.array([[1, 0, 1, 0]])))[0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(block, expected)


def test_mask_hides_padding_in_both_directions():
    m = np.asarray(make_attn_mask(jnp.array([[True, True, False]]), jnp.zeros((1, 3), int)))[0]
    assert not m[:, 2].any() and not m[2].any()
    assert m[:2, :2].all()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_embed_image_matches_big_vision(ref):
    model, expect = ref
    assert _rel(model.embed_image(expect["image"]), expect["zimg"]) < 1e-4


def test_text_logits_match_big_vision(ref):
    model, expect = ref
    logits = model.logits(expect["image"], expect["text"], expect["mask_ar"])
    assert logits.shape == expect["text_logits"].shape
    assert _rel(logits, expect["text_logits"]) < 1e-4


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_unrolled_layers(ref, remat):
    model, expect = ref
    args = (expect["image"], expect["text"], expect["mask_ar"])
    scanned = PaliGemma(model.config, scan=True, remat=remat).apply({"params": model.params}, *args)
    unrolled = PaliGemma(model.config).apply({"params": model.params}, *args)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)


def test_final_softcap_bounds_every_logit(ref):
    model, expect = ref
    capped = pk.Model(model.params, model.config.replace(final_logits_softcap=0.5))
    logits = np.asarray(capped.logits(expect["image"], expect["text"], expect["mask_ar"]))
    assert np.abs(logits).max() <= 0.5
    np.testing.assert_allclose(logits, 0.5 * np.tanh(expect["text_logits"] / 0.5), atol=1e-4)


def test_query_scale_override_changes_the_output():
    # width / heads = 8 differs from head_dim = 16, so the two query scales differ.
    config = tiny_config(llm_head_dim=16)
    params = pk.init_params(config, 3)
    image = np.zeros((1, 28, 28, 3), np.float32)
    text, mask_ar = np.array([[5, 6, 7]]), np.array([[0, 0, 1]])
    a = pk.Model(params, config).logits(image, text, mask_ar)
    other = config.replace(query_pre_attn_norm="rsqrt_emb_per_head")
    b = pk.Model(params, other).logits(image, text, mask_ar)
    assert not np.allclose(a, b, atol=1e-4)


def test_right_padding_does_not_change_real_logits(ref):
    model, expect = ref
    image, text, mask_ar = expect["image"], expect["text"], expect["mask_ar"]
    padded = np.concatenate([text, np.zeros((2, 5), np.int32)], axis=1)
    pad_ar = np.concatenate([mask_ar, np.ones((2, 5), np.int32)], axis=1)
    mask_input = np.arange(17)[None] < 12
    out = model.logits(image, padded, pad_ar, np.repeat(mask_input, 2, 0))
    np.testing.assert_allclose(out[:, :12], expect["text_logits"], rtol=1e-4, atol=1e-4)


def test_video_frames_concatenate_image_tokens(ref):
    model, expect = ref
    frames = np.stack([expect["image"], expect["image"][::-1]], axis=1)  # [B, 2, H, W, 3]
    z = np.asarray(model.embed_image(frames))
    n = model.config.vision.num_tokens
    assert z.shape == (2, 2 * n, model.config.llm.width)
    np.testing.assert_allclose(z[:, :n], expect["zimg"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z[0, n:], expect["zimg"][1], rtol=1e-4, atol=1e-5)


def test_wrong_image_size_names_the_fix():
    config = tiny_config()
    params = pk.init_params(config)
    with pytest.raises(ValueError, match="pk.preprocess"):
        PaliGemma(config).apply(
            {"params": params}, np.zeros((1, 56, 56, 3), np.float32), method="embed_image"
        )


def test_overrides_by_field_name():
    config = tiny_config()
    assert config.replace(final_logits_softcap=30.0).llm.final_logits_softcap == 30.0
    assert config.replace(img_depth=3).vision.depth == 3
    with pytest.raises(TypeError, match="both towers"):
        config.replace(depth=3)
    with pytest.raises(TypeError, match="unknown config field"):
        config.replace(softcap=1.0)


def test_bfloat16_weights_give_close_logits(ref):
    model, expect = ref
    bf16 = model.astype("bfloat16")
    logits = bf16.logits(expect["image"], expect["text"], expect["mask_ar"])
    assert logits.dtype == jnp.float32
    # Rounding these random weights to bf16 alone moves the logits by ~3.5 %.
    assert _rel(logits, expect["text_logits"]) < 0.1
    agree = np.mean(np.argmax(logits, -1) == np.argmax(expect["text_logits"], -1))
    assert agree > 0.9


# The CPU inference layout (views, (out, in) blocks) is tested in test_cpu_layout.py.
