"""Parity with transformers' PaliGemma: same weights in, same logits and tokens out.

Tiny random models are built in transformers (PaliGemma 1 = Gemma 1 with
multi-query attention; PaliGemma 2 = Gemma 2 with grouped-query attention,
post-norms and softcaps), saved with ``save_pretrained``, read with
``hf.load_hf`` and run by ``pali_kit.model.PaliGemma``; and the other way round
with ``hf.export_hf`` and ``from_pretrained``. The last section corrupts one
mapping rule at a time and checks that the comparison then fails, so a wrong
rule cannot hide behind the tests.

transformers must run the reference prefix-LM: ``token_type_ids`` 0 marks the
prefix (image + prompt, one bidirectional block), 1 the causal suffix — the
kit's ``mask_ar`` 0 / 1. Only the text positions and the first V_kit
vocabulary columns are compared (transformers has 20 extra rows here).
"""

from __future__ import annotations

import copy
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_kit import hf
from pali_kit.checkpoints import flatten, unflatten
from pali_kit.model import PaliGemma

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V_KIT = 300  # the kit vocabulary; transformers has <image> = 300 and rows up to 320
HF_VOCAB = hf.hf_rows(V_KIT)
# max |kit - hf| / max |hf| over the compared logits: two float32 implementations (XLA and
# torch/oneDNN) of the same tiny model sum in different orders; as for FORWARD_REL (conftest)
# the longest sums have K <= a few hundred terms, K * eps < 1e-4 of the scale, while a wrong
# conversion rule is off by O(1) (the tests below check it is > 100x this).
TOLERANCE = 1e-4
B, N_IMG, PREFIX, SUFFIX = 2, 16, 6, 8  # 16 x 16 images in 4 x 4 patches -> 16 tokens

VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16,
              vision_use_head=False)  # fmt: skip
TEXT = {
    # PaliGemma 1: Gemma 1, multi-query attention, W == Nh * H
    "pg1": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    # PaliGemma 2 3B/10B-like: GQA, W != Nh * H, attention softcap 50, no final softcap
    "pg2": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                final_logit_softcapping=None),
    # PaliGemma 2 28B-like query scale (W / Nh = 16 != head_dim), and softcaps small
    # enough to bite on these tiny logits.
    "pg2-28b": dict(model_type="gemma2", hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0),
}  # fmt: skip


# ------------------------------------------------------------------ building blocks


def hf_model(name: str, seed: int = 0):
    """A tiny transformers PaliGemma with non-trivial random weights, float32, eager attention."""
    config = transformers.PaliGemmaConfig(
        text_config={**TEXT[name], "vocab_size": HF_VOCAB},
        vision_config=VISION,
        image_token_index=V_KIT,
        projection_dim=64,
        hidden_size=64,
        vocab_size=HF_VOCAB,
    )
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config).float().eval()
    model.set_attn_implementation("eager")
    randomize(model, seed)
    return model


def randomize(model, seed: int) -> None:
    """transformers initialises norms to 0/1 and biases to 0; make every weight count.

    Matrices get unit-variance outputs; then the embedding is shrunk and the
    residual branches (o_proj, down_proj, Gemma 2's post-norms) amplified, or
    the tied embedding would echo the last token and greedy decoding would
    only ever repeat it.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:  # (out, in, ...)
                gain = 0.1 if "embed_tokens" in name else 1.0
                gain *= 3.0 if "o_proj" in name or "down_proj" in name else 1.0
                p.copy_(gain * noise / math.sqrt(p[0].numel()))
            elif "vision_tower" in name and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)  # LayerNorm scale
            elif "language_model" in name and ".post_" in name:
                p.copy_(4 + 0.3 * noise)  # RMSNorm (1 + w) after each residual branch
            else:
                p.copy_(0.3 * noise)  # biases; the other RMSNorm weights


def inputs(seed: int = 0):
    """Images and text as both libraries want them."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (B, 3, 16, 16)).astype(np.float32)  # NCHW for torch
    text = rng.integers(3, V_KIT, (B, PREFIX + SUFFIX)).astype(np.int32)
    text[:, 0] = 2  # BOS
    mask_ar = np.array([0] * PREFIX + [1] * SUFFIX, np.int32)[None].repeat(B, 0)
    return pixels, text, mask_ar


@functools.cache
def kit_forward(config):
    """Jitted ``PaliGemma(config).apply``: params, images NHWC, text, mask_ar -> logits."""

    def forward(params, images, text, mask_ar, mask_input):
        return PaliGemma(config).apply({"params": params}, images, text, mask_ar, mask_input)

    return jax.jit(forward)


def kit_logits(params, config, pixels, text, mask_ar, mask_input=None):
    """float32[B, T, V_kit]."""
    mask_input = np.ones(text.shape, bool) if mask_input is None else mask_input
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    out = kit_forward(config)(params, images, jnp.asarray(text), jnp.asarray(mask_ar), mask_input)
    return np.asarray(out)


def hf_logits(model, pixels, text, mask_ar):
    """transformers' logits at the text positions, first V_kit columns: float32[B, T, V_kit]."""
    ids = np.concatenate([np.full((B, N_IMG), V_KIT), text], axis=1)
    token_type = np.concatenate([np.zeros((B, N_IMG), np.int64), mask_ar], axis=1)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            pixel_values=torch.tensor(pixels),
            token_type_ids=torch.tensor(token_type, dtype=torch.long),
        )
    return out.logits[:, N_IMG:, :V_KIT].float().numpy()


def relative_error(kit, ref) -> float:
    return float(np.abs(kit - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=list(TEXT))
def saved(request, tmp_path_factory):
    """(name, transformers model, folder written by save_pretrained)."""
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


# ------------------------------------------------------------------ transformers -> kit


def test_loaded_model_gives_transformers_logits(saved):
    name, model, folder = saved
    params, config = hf.load_hf(folder)
    pixels, text, mask_ar = inputs()
    ref = hf_logits(model, pixels, text, mask_ar)
    err = relative_error(kit_logits(params, config, pixels, text, mask_ar), ref)
    print(f"\n{name} transformers -> kit: max relative error {err:.2e}")
    assert err < TOLERANCE


def test_loaded_config_matches_the_transformers_config(saved):
    name, _, folder = saved
    _, config = hf.load_hf(folder)
    text = TEXT[name]
    assert config.llm.post_norms == (text["model_type"] == "gemma2")
    assert config.llm.vocab_size == V_KIT
    assert config.llm.attn_logits_softcap == text.get("attn_logit_softcapping", 0.0)
    assert config.llm.final_logits_softcap == (text.get("final_logit_softcapping") or 0.0)
    expected = "rsqrt_emb_per_head" if name == "pg2-28b" else "rsqrt_head_dim"
    assert config.llm.query_pre_attn_norm == expected


def test_greedy_tokens_match_transformers_generate(saved):
    name, model, folder = saved
    params, config = hf.load_hf(folder)
    pixels, text, _ = inputs(seed=1)
    prompt, steps = text[:, :PREFIX], SUFFIX  # the same text length: no new compile
    ref = hf_greedy(model, pixels, prompt, steps)
    mine = kit_greedy(params, config, pixels, prompt, steps)
    print(f"\n{name} greedy: {mine.tolist()}")
    np.testing.assert_array_equal(mine, ref)


SUPPRESSED = [1, *range(V_KIT, HF_VOCAB)]  # EOS (so both run `steps` tokens) and HF-only rows


def hf_greedy(model, pixels, prompt, steps):
    ids = np.concatenate([np.full((B, N_IMG), V_KIT), prompt], axis=1)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            pixel_values=torch.tensor(pixels),
            token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            suppress_tokens=SUPPRESSED,
        )
    return out[:, ids.shape[1] :].numpy()


def kit_greedy(params, config, pixels, prompt, steps):
    """Uncached greedy decoding: one full forward per new token (the kit's decoder
    is compared separately). The text buffer has a fixed length so one compile serves
    every step; mask_input hides the unused tail, and new tokens get mask_ar 1."""
    b, t = prompt.shape
    text = np.zeros((b, t + steps), np.int32)
    text[:, :t] = prompt
    mask_ar = np.array([0] * t + [1] * steps, np.int32)[None].repeat(b, 0)
    banned = np.zeros(V_KIT, bool)
    banned[[s for s in SUPPRESSED if s < V_KIT]] = True
    for step in range(steps):
        mask_input = np.arange(t + steps)[None].repeat(b, 0) < t + step
        logits = kit_logits(params, config, pixels, text, mask_ar, mask_input)[:, t + step - 1]
        text[:, t + step] = np.where(banned, -np.inf, logits).argmax(-1)
    return text[:, t:]


def test_bfloat16_files_load_bit_exact(saved, tmp_path):
    """torch and ml_dtypes round float32 -> bfloat16 the same way (nearest even)."""
    _, model, folder = saved
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
    bf16, _ = hf.load_hf(tmp_path)
    f32, _ = hf.load_hf(folder, dtype="bfloat16")
    bf16 = flatten(bf16)
    for key, value in flatten(f32).items():
        assert bf16[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(bf16[key]), np.asarray(value), err_msg=key)


@pytest.mark.parametrize("layout", ["4.x Hub", "model-prefixed"])
def test_other_key_layouts_give_the_same_logits(saved, tmp_path, layout):
    """5.24 writes language_model.model.* and vision_tower.* (no vision_model level);
    the Hub's 4.x files have vision_tower.vision_model.*, newer in-memory names model.*."""
    from safetensors.numpy import load_file, save_file

    name, model, folder = saved
    tensors = load_file(str(folder / "model.safetensors"))
    if layout == "4.x Hub":
        rename = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")
    else:
        rename = lambda k: (
            k.replace("language_model.model.", "model.language_model.")
            .replace("vision_tower.", "model.vision_tower.")
            .replace("multi_modal_projector.", "model.multi_modal_projector.")
        )
    save_file({rename(k): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    params, config = hf.load_hf(tmp_path)
    pixels, text, mask_ar = inputs()
    ref = hf_logits(model, pixels, text, mask_ar)
    assert relative_error(kit_logits(params, config, pixels, text, mask_ar), ref) < TOLERANCE


# ------------------------------------------------------------------ kit -> transformers


def test_exported_model_gives_the_kit_logits_in_transformers(saved, tmp_path):
    name, _, folder = saved
    params, config = hf.load_hf(folder)
    rng = np.random.default_rng(7)  # new random kit weights, at the same scale
    params = unflatten({
        k: v + jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype)
        for k, v in flatten(params).items()
    })  # fmt: skip
    hf.export_hf(params, tmp_path, config)
    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    pixels, text, mask_ar = inputs(seed=2)
    ref = hf_logits(model.eval(), pixels, text, mask_ar)
    err = relative_error(kit_logits(params, config, pixels, text, mask_ar), ref)
    print(f"\n{name} kit -> transformers: max relative error {err:.2e}")
    assert err < TOLERANCE


# ------------------------------------------------------------------ the tests catch wrong rules


def _swap(fn):
    return lambda a, b, c: fn(b, a, c)


CORRUPTIONS = {
    # family: (model, function in pali_kit.hf.mapping, wrong replacement built from the right one)
    "q heads not transposed": ("pg2", "q_to_kit", lambda f: lambda w, c: w.reshape(c.llm.num_heads, w.shape[1], -1)),
    "k and v swapped": ("pg2", "kv_to_kit", _swap),
    "gate and up swapped": ("pg1", "gating_to_kit", _swap),
    "o_proj heads interleaved": ("pg2", "o_to_kit", lambda f: lambda w, c: w.reshape(w.shape[0], -1, c.llm.num_heads).transpose(2, 1, 0)),
    "dense weights reshaped, not transposed": ("pg1", "dense_to_kit", lambda f: lambda w, c: w.reshape(w.shape[::-1])),
    "embedding rows from the end": ("pg1", "embed_to_kit", lambda f: lambda w, c: w[-c.llm.vocab_size :]),
    "vision q/k/v heads interleaved": ("pg1", "vit_qkv_to_kit", lambda f: lambda w, c: w.T.reshape(w.shape[1], -1, c.vision.num_heads).transpose(0, 2, 1)),
    "vision out_proj heads interleaved": ("pg1", "vit_out_to_kit", lambda f: lambda w, c: w.T.reshape(-1, c.vision.num_heads, w.shape[0]).transpose(1, 0, 2)),
    "patch kernel rows and columns swapped": ("pg1", "patch_to_kit", lambda f: lambda w, c: w.transpose(3, 2, 1, 0)),
    "position grid transposed": ("pg1", "posemb_to_kit", lambda f: lambda w, c: w.reshape(4, 4, -1).transpose(1, 0, 2).reshape(1, 16, -1)),
}  # fmt: skip
NORM_CORRUPTIONS = {
    "Gemma 1 norms swapped": ("pg1", "GEMMA1_NORMS", {"pre_attention_norm": "post_attention_layernorm", "pre_ffw_norm": "input_layernorm"}),
    "Gemma 2 post-attention and pre-FFW norms swapped": ("pg2", "GEMMA2_NORMS", {"post_attention_norm": "pre_feedforward_layernorm", "pre_ffw_norm": "post_attention_layernorm"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (folder, transformers logits) for the models the corruptions use."""
    out = {}
    pixels, text, mask_ar = inputs()
    for name in ("pg1", "pg2"):
        model = hf_model(name)
        folder = tmp_path_factory.mktemp(f"ref-{name}")
        model.save_pretrained(folder)
        out[name] = folder, hf_logits(model, pixels, text, mask_ar)
    return out


def _parity_error(folder, ref) -> float:
    params, config = hf.load_hf(folder)
    pixels, text, mask_ar = inputs()
    return relative_error(kit_logits(params, config, pixels, text, mask_ar), ref)


@pytest.mark.parametrize("family", list(CORRUPTIONS))
def test_a_wrong_tensor_rule_fails_parity(references, monkeypatch, family):
    name, function, corrupt = CORRUPTIONS[family]
    folder, ref = references[name]
    assert _parity_error(folder, ref) < TOLERANCE  # right rules: parity holds
    monkeypatch.setattr(hf.mapping, function, corrupt(getattr(hf.mapping, function)))
    err = _parity_error(folder, ref)  # every corruption keeps the shapes: only parity sees it
    assert err > 100 * TOLERANCE, f"{family}: parity still holds ({err:.1e})"


@pytest.mark.parametrize("family", list(NORM_CORRUPTIONS))
def test_a_wrong_norm_name_fails_parity(references, monkeypatch, family):
    name, table, wrong = NORM_CORRUPTIONS[family]
    folder, ref = references[name]
    for kit, hf_name in wrong.items():
        monkeypatch.setitem(getattr(hf, table), kit, hf_name)
    assert _parity_error(folder, ref) > 100 * TOLERANCE


def test_pk_load_of_the_folder_decodes_like_transformers_generate(saved, capsys):
    """The user's path: pk.load(folder) and the kit's cached decoder (not the uncached loop)."""
    import pali_kit as pk
    from pali_kit import decode

    name, model, folder = saved
    kit = pk.load(str(folder))
    assert folder.name in capsys.readouterr().err  # the one-line status summary
    pixels, text, _ = inputs(seed=1)
    prompt, steps = text[:, :PREFIX], SUFFIX
    allowed = np.ones(V_KIT, bool)
    allowed[[s for s in SUPPRESSED if s < V_KIT]] = False
    mine, _ = decode.generate_tokens(
        kit.config, kit.run_params, pixels.transpose(0, 2, 3, 1), prompt, np.ones(prompt.shape, bool),
        max_new_tokens=steps, logit_mask=allowed,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(mine), hf_greedy(model, pixels, prompt, steps))


def test_loading_a_folder_can_show_a_progress_bar(saved, capsys):
    _, _, folder = saved
    hf.load_hf(folder, progress=True)
    assert f"loading {folder.name}" in capsys.readouterr().err
