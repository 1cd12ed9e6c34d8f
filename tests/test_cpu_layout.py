"""One model, two layouts: the official tree everywhere, the CPU layout for CPU inference.

The model modules compute with the official stacked tree as plain einsums; the
CPU tricks (per-layer views, per-head 2-D matrices, (out, in) blocks,
optimization barriers) live in ``pali_kit.model.cpu`` only. Here: what GPU and
TPU compile has no barrier, and the CPU layout computes what the official tree
computes.

Tolerances: in float32 both layouts do the same products with the same
operands, split differently (per head / per block), so only float32 summation
order differs: a K-term dot product moves by at most ~K * 2^-24 * sum|terms|,
and over a few dozen products in sequence the logits agree to ~1e-5 of their
scale (1e-4 leaves room). In bfloat16 the same holds for the products (the
operands are rounded identically in both layouts), plus the (out, in) blocks
that are summed in float32 in another order: again float32 re-association, so
1e-4 of the scale as well.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pali_kit as pk
from pali_kit import decode
from pali_kit.model import PaliGemma, cpu_layout, inference_params
from pali_kit.model.cpu import BLOCK, Matrix

from .conftest import assert_generates_like_the_official_tree, tiny_config


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, pk.init_params(config, 0)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accelerator_programs_have_no_optimization_barrier(tiny, platform, dtype):
    config, params = tiny
    module = PaliGemma(config)
    p = _shapes(jax.tree.map(lambda a: a.astype(dtype), params))
    image, text = _spec((1, 28, 28, 3), jnp.float32), _spec((1, 8), jnp.int32)
    programs = {
        "forward": (
            lambda p, i, t, m: module.apply({"params": p}, i, t, m),
            (p, image, text, text),
        ),
        "prefill": (
            lambda p, i, t, m: module.apply({"params": p}, i, t, m, 64, method=PaliGemma.prefill),
            (p, image, text, _spec((1, 8), bool)),
        ),
    }
    cache = pk.model.KVCache.zeros(config.llm, 1, 64)
    step = lambda p, tok, c, v, pos, s: module.apply(
        {"params": p}, tok, c, v, pos, s, method=PaliGemma.decode_step
    )
    programs["decode step"] = (
        step,
        (p, _spec((1,), jnp.int32), _shapes(cache), _spec((1, 64), bool),
         _spec((1,), jnp.int32), _spec((), jnp.int32)),
    )  # fmt: skip
    for name, (fn, args) in programs.items():
        text_ir = export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()
        assert "stablehlo.dot_general" in text_ir, name
        assert "stablehlo.optimization_barrier" not in text_ir, name
    # the check can fail: the CPU layout's program has barriers
    cpu_ir = export.export(jax.jit(programs["forward"][0]), platforms=("cpu",))(
        cpu_layout(jax.tree.map(lambda a: a.astype(dtype), params)), image, text, text
    )
    assert "stablehlo.optimization_barrier" in cpu_ir.mlir_module()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_layout_gives_the_official_logits(ref, dtype):
    model, expect = ref
    params = jax.tree.map(lambda a: a.astype(dtype), model.params)
    run = inference_params(params)
    leaves = jax.tree.leaves(run, is_leaf=lambda v: isinstance(v, Matrix))
    assert any(isinstance(leaf, Matrix) for leaf in leaves)
    if dtype == "bfloat16":  # half-precision LLM matrices are (out, in) blocks
        assert run["llm"]["layers"]["mlp"]["linear"][0].transposed
    args = (expect["image"], expect["text"], expect["mask_ar"])
    fn = jax.jit(PaliGemma(model.config).apply)
    assert _rel(fn({"params": run}, *args), fn({"params": params}, *args)) < 1e-4


def test_cpu_layout_decodes_like_the_official_tree(tiny):
    config, params = tiny
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    text = rng.integers(2, 2000, (2, 5)).astype(np.int32)
    mask = np.ones(text.shape, bool)
    for dtype in ("float32", "bfloat16"):
        p = jax.tree.map(lambda a, dt=dtype: a.astype(dt), params)
        a = decode.generate_tokens(config, p, image, text, mask, max_new_tokens=6)
        b = decode.generate_tokens(config, inference_params(p), image, text, mask, max_new_tokens=6)
        np.testing.assert_array_equal(a[0], b[0])
        # log-probs: O(1) values, float32 re-association only
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-4)


def test_layer_views_share_the_stacked_memory(ref):
    model, _ = ref
    run = inference_params(model.params)  # float32: views only, no copies
    stacked_q = model.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
    head = run["llm"]["layers"]["attn"]["q_einsum"]["w"][1].groups[0][0]  # layer 1, head 0
    offset = stacked_q[0].size * stacked_q.dtype.itemsize
    assert head.unsafe_buffer_pointer() == stacked_q.unsafe_buffer_pointer() + offset
    assert len(run["llm"]["layers"]["pre_ffw_norm"]["scale"]) == (model.config.llm.depth)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_out_in_blocks_multiply_like_the_plain_matrix(rows, dtype):
    from pali_kit.model.cpu import _out_in_matrix

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2 * BLOCK + 100, 48)).astype(np.float32)  # 3 blocks
    w = jnp.asarray(jnp.asarray(w).astype(dtype))
    x = jnp.asarray(rng.standard_normal((rows, 1, w.shape[0])), jnp.float32)
    blocked = _out_in_matrix(w, 0)
    assert blocked.transposed and len(blocked.groups[0]) == 3
    assert all(b.shape[1] <= BLOCK for b in blocked.groups[0])
    got = jax.jit(lambda x, m: pk.model.common.mm("btf,fd->btd", x, m))(x, blocked)
    want = jax.jit(lambda x, m: pk.model.common.mm("btf,fd->btd", x, m))(x, w)
    assert got.shape == (rows, 1, 48)
    # the same rounded operands; float32 sums of 4708 terms in another order
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * np.abs(want).max()
    )


def test_loaded_bf16_model_keeps_one_copy_and_still_gives_the_official_tree(tmp_path):
    config = tiny_config(llm_mlp_dim=BLOCK + 64)  # the down-projection needs 2 blocks
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    path = pk.save(pk.Model(params, config), tmp_path / "m.npz")
    model = pk.load(path, verbose=False)  # read straight into the CPU layout
    run = model.run_params
    # the (out, in) blocks of all layers share one buffer the size of the official
    # array: nothing was added
    blocks = [b for m in run["llm"]["layers"]["mlp"]["linear"] for b in m.groups[0]]
    assert len(blocks) == 2 * config.llm.depth
    start = min(b.unsafe_buffer_pointer() for b in blocks)
    end = max(b.unsafe_buffer_pointer() + b.nbytes for b in blocks)
    assert end - start == params["llm"]["layers"]["mlp"]["linear"].nbytes
    # laid out in place from a tree read the usual way: the same, in its own memory
    official = pk.checkpoints.load_params(path)
    stacked = official["llm"]["layers"]["mlp"]["linear"]
    start, end = stacked.unsafe_buffer_pointer(), stacked.unsafe_buffer_pointer() + stacked.nbytes
    in_place = inference_params(official, in_place=True)
    blocks = [b for m in in_place["llm"]["layers"]["mlp"]["linear"] for b in m.groups[0]]
    assert all(start <= b.unsafe_buffer_pointer() < end for b in blocks)
    for a, b in zip(jax.tree.leaves(in_place), jax.tree.leaves(run)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    del stacked, official
    # the official tree is rebuilt on request, bit for bit
    rebuilt = model.params
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    assert model.num_params() == pk.model.count_params(params)
    # and the in-place layout computes what a copied layout computes
    assert_generates_like_the_official_tree(model, params, config)


def test_taking_the_params_before_inference_keeps_them_intact(tmp_path):
    config = tiny_config()
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    model = pk.Model(params, config)  # the caller's arrays
    held = model.params  # e.g. handed to a Trainer before a first generate
    assert model.run_params is not None and not model._run_replaced  # the layout copied
    loaded = pk.load(pk.save(model, tmp_path / "m.npz"), verbose=False)
    held_too = loaded.params  # rebuilt from the blocks the loader wrote: a copy of its own
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
    text, mask = np.array([[5, 6, 7]], np.int32), np.ones((1, 3), bool)
    for m in (model, loaded):
        m.generate_tokens(image, text, mask, max_new_tokens=2)
    for tree in (held, held_too, loaded.params):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
            np.testing.assert_array_equal(
                np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16)
            )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("shape", [(1, 5), (37, 3), (100, 2304), (16, 16)])
def test_striped_transpose_moves_every_value(dtype, shape):
    from pali_kit.model.cpu import transpose_into

    rng = np.random.default_rng(0)
    part = np.asarray(jnp.asarray(rng.standard_normal(shape), dtype))
    out = np.empty(shape[::-1], part.dtype)
    transpose_into(part, out)
    bits = f"u{part.dtype.itemsize}"
    np.testing.assert_array_equal(out.view(bits), np.ascontiguousarray(part.T).view(bits))


def test_misaligned_small_leaves_keep_the_layers_as_views():
    # A bfloat16 (depth, 1000) bias puts layer i at 2000 * i bytes: not 64-byte
    # aligned, so it cannot be viewed. It is copied per layer (kilobytes) so that
    # the big matrices of the same layers stay views; the compiled encoder then
    # slices no layer out of the stacks (it used to hold copies of all of them).
    config = tiny_config(img_width=64, img_mlp_dim=1000, img_depth=4)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    run = inference_params(params)
    block = run["img"]["Transformer"]["encoderblock"]
    stacked = params["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    kernels = block["MlpBlock_0"]["Dense_0"]["kernel"]
    assert len(kernels) == config.vision.depth
    view = kernels[1].groups[0][0]  # layer 1 shares the stacked memory
    assert view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + stacked[0].nbytes
    assert len(block["MlpBlock_0"]["Dense_0"]["bias"]) == config.vision.depth
    embed = jax.jit(lambda p, x: PaliGemma(config).apply({"params": p}, x, method="embed_image"))
    image = jnp.zeros((1, 28, 28, 3), jnp.float32)
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(params["img"]["Transformer"]))
    temp = embed.lower(run, image).compile().memory_analysis().temp_size_in_bytes
    # 4 image tokens: the activations are a few KB; copies of the layers' weights would be
    # about layer_bytes (all of them live at once)
    assert temp < layer_bytes / 4, (temp, layer_bytes)
    np.testing.assert_allclose(
        np.asarray(embed(run, image)), np.asarray(embed(params, image)), rtol=0, atol=1e-5
    )


def test_compiled_generation_holds_no_weight_copies_nor_full_logits():
    # The bfloat16 peak memory of load + generate is the weights plus what the compiled
    # programs add. Each program's XLA temporaries hold activations only: for a
    # 36-token prefill of width 256 / MLP 2048, a few [36, 2048] float32 arrays
    # (~0.3 MB each; 0.77 MB in all measured), while a copy of one MLP matrix (1 MB),
    # of a layer's weights (3.5 MB) or of the embedding table (2 MB) would exceed the
    # bound (a third of a layer's weights, 1.18 MB). The prefill returns the next-token logits
    # of the last position only (all positions: 36x), plus the KV cache it fills.
    config = tiny_config(llm_width=256, llm_mlp_dim=2048, llm_num_heads=4, llm_head_dim=64,
                         vocab_size=4096)  # fmt: skip
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), pk.init_params(config, 0))
    run = inference_params(params)
    layer = jax.tree.leaves(params["llm"]["layers"])
    layer_bytes = sum(a.nbytes for a in layer) // config.llm.depth
    text_len, new = 32, 8
    cache_size = decode.bucket_cache(config.vision.num_tokens, text_len, new)
    prefill, _, step_and_sample = decode._jitted(
        config, cache_size, "float32", decode.cache_form(run)
    )
    r = config.resolution
    traced = prefill.jitted.trace(run, _spec((1, r, r, 3), jnp.float32),
                                  _spec((1, text_len), jnp.int32), _spec((1, text_len), bool))  # fmt: skip
    mem = traced.lower().compile().memory_analysis()
    logits, cache, valid, pos = traced.out_info
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    assert logits.shape == (1, config.llm.vocab_size)
    assert mem.temp_size_in_bytes < layer_bytes / 3, (mem.temp_size_in_bytes, layer_bytes)
    assert mem.output_size_in_bytes <= cache_bytes + 2 * 4 * config.llm.vocab_size + 4096, (
        mem.output_size_in_bytes, cache_bytes)  # fmt: skip
    step = step_and_sample(decode.parse_sampler("greedy"))
    t, rng = jnp.int32(0), jax.random.key(0)
    tok, done = _spec((1,), jnp.int32), _spec((1,), bool)
    mem = (step.jitted.trace(decode._step_params(run), tok, cache, valid, pos, t, rng, t, done,
                             None).lower().compile().memory_analysis())  # fmt: skip
    # one token: kilobytes of activations; the cache is donated (aliased), not copied
    assert mem.temp_size_in_bytes < layer_bytes / 16, (mem.temp_size_in_bytes, layer_bytes)
    assert mem.alias_size_in_bytes >= cache_bytes


ARENA_CHILD = """
import ctypes, os, sys, tempfile, threading
from pali_kit.model import cpu
libc = ctypes.CDLL(None)
def heaps():  # glibc's malloc_info lists one <heap> per arena
    path = tempfile.mktemp()
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp); libc.fclose(fp)
    text = open(path).read(); os.unlink(path)
    return text.count("<heap nr=")
capped = cpu.limit_heap_arenas(2) if sys.argv[1] == "cap" else None
before = heaps()
barrier = threading.Barrier(9)
def work():
    keep = [bytearray(100_000) for _ in range(4)]  # malloc'd in this thread's arena
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
barrier.wait()
for t in threads: t.join()
print(capped, before, heaps())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_heap_arenas_capped():
    # Eight threads allocating at once get an arena each from glibc by default
    # (up to 8 per core); capped, they share at most two (plus any made before).
    def run(mode):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        out = subprocess.run([sys.executable, "-c", ARENA_CHILD, mode], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        capped, before, after = out.stdout.split()
        return capped, int(before), int(after)

    capped, before, after = run("cap")
    if capped != "True":
        pytest.skip("no glibc mallopt here")
    assert after <= max(before, 2), (before, after)
    _, before, after = run("free")
    assert after >= before + 4, (before, after)  # the check above can fail
