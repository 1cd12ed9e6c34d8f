"""Weight-only int8 / int4 quantization (pali_kit.quant): bounds, products, layout, errors."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pali_kit import quant
from pali_kit.model.common import thread_pool

EPS32 = np.finfo(np.float32).eps


def _step(q: quant.QArray) -> np.ndarray:
    """The scale of every element, in the official layout (the bound is half of it)."""
    ones = q._replace(
        np.ones_like(np.asarray(quant.unpack_values(q, np.float32)), dtype=np.int8)
        if q.scheme == "int8"
        else np.full(q.values.shape, 0x11, np.int8),  # two 1-levels: 1 + 16 * 1
        q.scales,
    )
    return np.asarray(quant.dequantize(ones, np.float32))


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize(
    "shape, in_axes",
    [((96, 40), (-2,)), ((3, 4, 130, 5), (-2,)), ((2, 3, 8, 24), (-3, -2)), ((50, 200), (-1,))],
)
def test_round_trip_within_half_a_step(scheme, shape, in_axes):
    # Rounding w / s to the nearest level errs by at most 1/2 level, i.e. s / 2.
    # w / s is computed in float32 (relative error <= eps, |w / s| <= qmax), so
    # a value within qmax * eps of a .5 boundary may round the other way: the
    # bound grows by s * qmax * eps (and by |w| * eps for the final product).
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[-1])).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel quantizes to zeros
    q = quant.quantize(w, scheme, in_axes)
    assert q.shape == w.shape and quant.dequantize(q).shape == w.shape
    back = np.asarray(quant.dequantize(q))
    step = _step(q)
    qmax = {"int8": 127, "int4": 7}[scheme]
    bound = step * (0.5 + qmax * EPS32) + np.abs(w) * EPS32
    assert np.all(np.abs(w - back) <= bound)
    assert np.all(back[..., 0] == 0.0)
    # the step really is max|w| / qmax of its channel (group): not a loose bound
    assert np.isclose(step.max(), np.abs(w).max() / qmax, rtol=1e-6)


def test_int4_groups_and_packing():
    # Groups of GROUP_SIZE consecutive inputs share a scale: a group of small
    # weights keeps its precision next to a group of large ones.
    g = quant.GROUP_SIZE
    w = np.concatenate([np.full((g, 1), 0.07), np.full((g, 1), 7.0)]).astype(np.float32)
    q = quant.quantize(w, "int4", (-2,))
    assert q.values.shape == (1, g) and q.values.dtype == np.int8  # two values per byte
    assert q.scales.shape == (1, 2)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q)), w, rtol=1e-6)
    # 2304 x 9216 (a PaliGemma-3B MLP matrix): bytes per weight vs bfloat16's 2
    big = jax.eval_shape(lambda: quant.quantize(jnp.zeros((2304, 9216)), "int4"))
    assert big.nbytes / (2304 * 9216 * 2) < 0.29
    big8 = jax.eval_shape(lambda: quant.quantize(jnp.zeros((2304, 9216)), "int8"))
    assert big8.nbytes / (2304 * 9216 * 2) < 0.51


def test_int4_packs_twos_complement_nibbles():
    # byte = (even level & 15) | (odd level << 4): every pair of levels -7..7
    # packs to that byte and unpacks to the same pair.
    levels = np.arange(-7, 8)
    even, odd = (a.reshape(-1) for a in np.meshgrid(levels, levels))
    w = np.stack([even, odd], axis=-1).astype(np.float32)  # [225 outputs, 2 inputs]
    w = np.concatenate([w, np.full((len(w), 62), 7.0, np.float32)], axis=1)  # scale 1
    q = quant.quantize(w, "int4", (-1,))
    assert np.all(np.asarray(q.scales)[:, 0] == 1.0)
    byte = np.asarray(q.values)[:, 0]
    np.testing.assert_array_equal(byte, ((even & 15) | (odd << 4)).astype(np.int8))
    np.testing.assert_array_equal(np.asarray(quant.unpack_values(q))[:, :2], w[:, :2])


def test_int4_loop_levels_are_exact_powers_of_two():
    # The one-row loop reads a byte b (sign-extended to int32) as float(b << 28)
    # and float(b & -16), its inputs pre-multiplied by quant.LOW and quant.HIGH:
    # for every byte, these products are the two levels exactly.
    b = np.arange(-128, 128, dtype=np.int32)
    low = (b << 28).astype(np.int32).astype(np.float32) * np.float32(quant.LOW)
    high = (b & -16).astype(np.float32) * np.float32(quant.HIGH)
    np.testing.assert_array_equal(low, ((b << 28).astype(np.int32) >> 28).astype(np.float32))
    np.testing.assert_array_equal(high, (b >> 4).astype(np.float32))
    v = b.astype(np.int8)[None]  # the same through the QArray's unpacking
    q = quant.QArray(v, np.ones((1, 8), np.float32), "int4", (-1,), (512,))
    both = np.asarray(quant.unpack_values(q))[0]
    np.testing.assert_array_equal(both[0::2], low)
    np.testing.assert_array_equal(both[1::2], high)


@pytest.mark.parametrize("scheme, loops", [("int8", 1), ("int4", 1)])
def test_cpu_one_row_product_reads_each_byte_once(scheme, loops):
    # The compiled one-row product of a CpuQArray: one loop (a fusion ending in a
    # dot) per column block reads the integer matrix, each byte once; no
    # float array of the matrix's size is written.
    q = quant.for_cpu(quant.quantize_leaf(np.ones((2304, 512), np.float32), scheme, (-2,)))
    x = jnp.ones((1, 2304), jnp.float32)
    program = jax.jit(lambda x, q: q.einsum("bd,df->bf", x)).lower(x, q).compile().as_text()
    entry = program[program.index("\nENTRY") :]
    ints = re.findall(r"(%\S+) = s8\[\S+ parameter\(", entry)  # the integer matrix's name
    assert len(ints) == 1, ints
    readers = [line for line in entry.splitlines()
               if re.search(re.escape(ints[0]) + r"[,)]", line) and " parameter(" not in line]  # fmt: skip
    assert len(readers) == loops and " fusion(" in readers[0], readers
    assert not [line for n, line in _entry_float_arrays(program) if n >= 512 * 512 // 4]


def test_bfloat16_weights_keep_their_dtype():
    w = np.random.default_rng(1).standard_normal((64, 16)).astype(ml_dtypes.bfloat16)
    q = quant.quantize(w, "int8")
    assert q.dtype == np.dtype(ml_dtypes.bfloat16)
    assert quant.dequantize(q).dtype == np.dtype(ml_dtypes.bfloat16)


EQUATIONS = [  # (eq, x shape, weight shape, in_axes): the model's products
    ("btd,ndh->btnh", (2, 3, 64), (4, 64, 8), (-2,)),  # q_einsum
    ("btd,ckdh->cbtkh", (2, 3, 64), (2, 2, 64, 8), (-2,)),  # kv_einsum
    ("btnh,nhd->btd", (2, 3, 4, 16), (4, 16, 32), (-3, -2)),  # attn_vec
    ("...d,vd->...v", (2, 3, 40), (100, 40), (-1,)),  # output layer
    ("bnd,dhk->bnhk", (2, 5, 70), (70, 2, 6), (-3,)),  # SigLIP query
    ("btf,fd->btd", (2, 3, 2500), (2500, 8), (-2,)),  # MLP linear: CPU blocks of <= 2304 inputs
]


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("eq, xs, ws, in_axes", EQUATIONS)
@pytest.mark.parametrize("cpu_reduce", [False, "rows", "rows-blocks", True, "blocks"])
def test_quantized_product_equals_dequantized_product(
    scheme, eq, xs, ws, in_axes, cpu_reduce, monkeypatch
):
    # Both sides sum the same float32 products x * (q * s) over K terms, in another
    # order (the CPU path: per column block, and for int4 the even inputs before
    # the odd ones): float32 re-association bounds the difference by
    # ~K * eps * sum_k |x_k| |w_k|. "blocks": the CPU path with column blocks of
    # at most 96 bytes (for_cpu copies them; int4 splits at group boundaries).
    # "rows": the accelerators' decoding form (one multiply-and-sum over the
    # integers, ``_reduce_rows``); "rows-blocks": the same on values stored in
    # column blocks of at most 96 bytes.
    from pali_kit.model import common

    if cpu_reduce in ("blocks", "rows-blocks"):
        monkeypatch.setattr(common, "BLOCK", 96)  # read by quant.quantize and quant.for_cpu
    rng = np.random.default_rng(2)
    x = rng.standard_normal(xs).astype(np.float32)
    if cpu_reduce:
        x = x[:1, :2]  # two rows: what the reduce path takes (decoding)
    w = rng.standard_normal(ws).astype(np.float32)
    q = quant.quantize(jnp.asarray(w), scheme, in_axes)
    if cpu_reduce in (True, "blocks"):
        q = quant.cpu_layout({"w": q})["w"]
        assert isinstance(q, quant.CpuQArray)
        blocks = q.kernel[0]
        assert sum(b.shape[1] for b in blocks) == q.row_bytes
        if cpu_reduce == "blocks":
            assert all(b.shape[1] <= 96 for b in blocks)
            assert scheme == "int8" or all(b.shape[1] % 32 == 0 for b in blocks)
    got = jax.jit(lambda x, q: q.einsum(eq, x))(jnp.asarray(x), q)
    deq = np.asarray(quant.dequantize(q), np.float64)
    want = np.einsum(eq, x.astype(np.float64), deq)
    magnitude = np.einsum(eq, np.abs(x).astype(np.float64), np.abs(deq))
    k = np.prod([ws[a] for a in in_axes])
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert np.all(np.abs(np.asarray(got) - want) <= 2 * k * EPS32 * magnitude + 1e-30)


@pytest.mark.parametrize("scheme, blocks", [("int8", 8), ("int4", 5)])
def test_wide_rows_are_stored_in_column_blocks(scheme, blocks, monkeypatch):
    # Rows over BLOCK bytes (here 96; the MLP output matrix's 9216 inputs at full
    # size) are stored as equal column blocks, int4 split at group boundaries:
    # the QArray stands for the same weight (shape, dequantized values, streamed
    # quantization), and the CPU form reads each block where it is stored.
    from pali_kit.model import common

    w = np.random.default_rng(5).standard_normal((3, 640, 48)).astype(np.float32)  # (L, F, W)
    plain = quant.quantize(w, scheme, (-2,))  # BLOCK = 2304: one block
    monkeypatch.setattr(common, "BLOCK", 96)
    q = quant.quantize(w, scheme, (-2,))
    width = {"int8": 640, "int4": 320}[scheme]  # bytes per output row
    assert plain.blocks == 1 and plain.values.shape == (3, 48, width)
    assert q.blocks == blocks and q.values.shape == (3, blocks, 48, width // blocks)
    assert q.shape == w.shape and q.out_shape == (3, 48) and q.nbytes == plain.nbytes
    np.testing.assert_array_equal(np.asarray(quant.out_in_values(q)), plain.values)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), quant.dequantize(plain))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q[1])), quant.dequantize(plain)[1])
    # what loading does: slices of layers quantized one at a time
    streamed = quant.quantize_rows_of(((i, w[i : i + 1]) for i in range(3)), w.shape,
                                      w.dtype, scheme, (-2,))  # fmt: skip
    np.testing.assert_array_equal(streamed.values, q.values)
    # the CPU form of a layer: its kernel blocks are views of the layer's values
    layer = quant.quantize_leaf(w[1:2], scheme, (-2,))
    layer = layer._replace(layer.values[0], layer.scales[0])  # (F, W) as a layer view
    cpu = quant.for_cpu(layer)
    start = cpu.values.unsafe_buffer_pointer()
    pointers = [b.unsafe_buffer_pointer() for b in cpu.kernel[0]]
    assert pointers == [start + i * 48 * (width // blocks) for i in range(blocks)]
    x = np.random.default_rng(6).standard_normal((1, 640)).astype(np.float32)
    got = jax.jit(lambda x, m: m.einsum("bf,fd->bd", x))(x, cpu)
    deq = np.asarray(quant.dequantize(layer), np.float64)
    bound = 2 * 640 * EPS32 * (np.abs(x) @ np.abs(deq))  # float32 re-association, K = 640
    assert np.all(np.abs(np.asarray(got) - x @ deq) <= bound)


def _entry_float_arrays(hlo: str) -> list[tuple[int, str]]:
    """(elements, line) of every float array the compiled program's entry computation
    writes (its buffers; what a fusion computes inside is never stored whole)."""
    entry = hlo[hlo.index("\nENTRY") :]
    found = []
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%\S+ = (?:f32|bf16|f16)\[([\d,]*)\]", line)
        if m and " parameter(" not in line:
            found.append((int(np.prod([int(d) for d in m.group(1).split(",") if d])), line))
    return found


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_cpu_decode_step_never_writes_a_float_matrix(scheme, monkeypatch):
    # The compiled one-token step of the CPU layout: no float array as large as a
    # quantized matrix (the smallest: 128 x 128 here) is written; every weight is
    # read as integers inside the product's loop. Control: with the fused path
    # off (REDUCE_ROWS = 0) the same check finds the dequantized matrices.
    import pali_kit as pk
    from pali_kit.model import PaliGemma
    from pali_kit.model.gemma import KVCache

    def compiled(model):
        cfg, slots = model.config, 64  # cache entries: 64 x 2 x 32 < 128 x 128
        step = jax.jit(
            lambda p, *a: PaliGemma(cfg).apply({"params": p}, *a, method=PaliGemma.decode_step)
        )
        args = (jnp.zeros((1,), jnp.int32), KVCache.zeros(cfg.llm, 1, slots),
                jnp.ones((1, slots), bool), jnp.zeros((1,), jnp.int32), jnp.int32(3))  # fmt: skip
        return step.lower(model.run_params, *args).compile()

    model = pk.load("demo", dtype="bfloat16", quantize=scheme, verbose=False)
    layer = model.params["llm"]["layers"]
    smallest = min(layer["attn"][k]["w"][0].size for k in ("q_einsum", "kv_einsum"))
    assert smallest == 128 * 128
    program = compiled(model)
    assert not [line for n, line in _entry_float_arrays(program.as_text()) if n >= smallest]
    assert program.memory_analysis().temp_size_in_bytes < smallest * 4

    monkeypatch.setattr(quant, "REDUCE_ROWS", 0)
    control = compiled(pk.load("demo", dtype="bfloat16", quantize=scheme, verbose=False))
    assert len([n for n, _ in _entry_float_arrays(control.as_text()) if n >= smallest]) >= 10


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_cpu_prefill_dequantizes_one_matrix_at_a_time(scheme, monkeypatch):
    # The compiled prefill (image + prompt, CPU layout) dequantizes a matrix for
    # its product only; its temporaries hold about one matrix of float weights
    # plus activations, not the float copies of all of them (the control: without
    # the dependence on the product's input, XLA puts every dequantization first).
    import pali_kit as pk
    from pali_kit.model import PaliGemma

    def temp_bytes():
        model = pk.load("demo", quantize=scheme, verbose=False)
        cfg, res = model.config, model.config.resolution
        prefill = jax.jit(lambda p, *a: PaliGemma(cfg).apply(
            {"params": p}, *a, 128, jnp.float32, method=PaliGemma.prefill))  # fmt: skip
        program = prefill.lower(model.run_params, jnp.zeros((1, res, res, 3)),
                                jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), bool))  # fmt: skip
        return program.compile().memory_analysis().temp_size_in_bytes, model.params

    temp, params = temp_bytes()
    table = params["llm"]["embedder"]["input_embedding"]  # looked up by rows, never whole
    matrices = [q for q in jax.tree.leaves(params, is_leaf=quant.is_quantized)
                if isinstance(q, quant.QArray) and q is not table]  # fmt: skip
    float_bytes = sum(4 * q.size for q in matrices)  # the demo stands for float32
    largest = max(4 * q.size // len(q) for q in matrices if q.ndim > 2)  # one layer's
    assert temp < min(float_bytes / 3, 3 * largest), (temp, float_bytes, largest)
    monkeypatch.setattr(quant, "_after", lambda x2, scales: scales)
    assert temp_bytes()[0] >= float_bytes


def test_rejects_a_mismatched_equation():
    # (a plain QArray is dequantized and multiplied as the array it stands for;
    # the CPU form computes from its contraction axes, so it checks them)
    q = quant.for_cpu(quant.quantize(jnp.ones((4, 64, 8)), "int8", (-2,)))
    with pytest.raises(ValueError, match="contracts axes"):
        q.einsum("btn,ndh->btdh", jnp.ones((1, 1, 4)))


def test_layer_indexing_and_embedding_rows():
    w = np.random.default_rng(3).standard_normal((3, 2, 64, 8)).astype(np.float32)
    q = quant.quantize(w, "int4", (-2,))
    layer = q[1]
    assert isinstance(layer, quant.QArray) and layer.shape == (2, 64, 8)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(layer)), quant.dequantize(q)[1])
    with pytest.raises(IndexError, match="first 2 axes"):
        q[0, 0, 0]
    table = quant.quantize(w.reshape(-1, 8), "int8", (-1,))  # (V=384, W=8)
    tokens = np.array([[3, 0], [383, 7]])
    rows = table[(tokens,)]
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(quant.dequantize(table))[tokens])
    # layer slices of a stack through jax.tree.map (what lax.scan does) stay QArrays
    sliced = jax.tree.map(lambda a: a[2], q)
    assert isinstance(sliced, quant.QArray) and sliced.shape == (2, 64, 8)


def test_quantize_argument_is_checked():
    for bad in ("int2", "fp8", 8, True):
        with pytest.raises(ValueError, match=re.escape(f"quantize={bad!r}") + ".*'int8'.*'int4'"):
            quant.check_scheme(bad)
    assert quant.check_scheme(None) is None and quant.check_scheme("int4") == "int4"


def _cuda_main(fn, *args) -> str:
    text = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args).mlir_module()
    return text[text.index("func.func public @main") :]


@pytest.mark.parametrize("rows", [2304, 9216])  # 9216: stored in column blocks
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_decode_product_reads_the_integers_in_one_reduction(scheme, rows):
    # What XLA:GPU is given for one row (decoding): the integers converted
    # elementwise right into a multiply and one sum, which XLA emits as a single
    # reduction reading each byte once. A dot whose weight operand is scaled was
    # written out as a float matrix first (compiled on an H200: temporaries of
    # one float matrix per product); no dot may take a float weight here.
    q = quant.quantize(jnp.ones((rows, 512)), scheme)
    x = jax.ShapeDtypeStruct((1, rows), jnp.float32)
    main = _cuda_main(lambda x, q: q.einsum("bd,df->bf", x, jnp.bfloat16), x, q)
    assert "stablehlo.dot_general" not in main
    assert not [ln for ln in main.splitlines() if "stablehlo.transpose" in ln and "xi8>" in ln]
    assert "stablehlo.reduce" in main and "xi8>) -> tensor<" in main
    # the check can fail: the dequantized weight as a matmul operand is a dot
    dense = _cuda_main(lambda x, w: jnp.einsum("bd,df->bf", x, w), x, quant.dequantize(q))
    assert "stablehlo.dot_general" in dense


@pytest.mark.parametrize("rows, stored", [(2304, "512x2304"), (9216, "4x512x2304")])
def test_cuda_prefill_product_converts_the_int8_values_only(rows, stored):
    # Several rows (prefill, training): the int8 values enter the dot through a
    # plain conversion (exact: |q| <= 127), the channel scales multiply the
    # result. XLA:GPU's matmul fusion reads a converted operand in place; no
    # float copy of the weight is a program input.
    # (column blocks of a wide matrix are joined by a transpose of the integers.)
    q = quant.quantize(jnp.ones((rows, 512)), "int8")
    x = jax.ShapeDtypeStruct((256, rows), jnp.float32)
    main = _cuda_main(lambda x, q: q.einsum("bd,df->bf", x, jnp.bfloat16), x, q)
    assert f"tensor<{stored}xi8>" in main.split("\n")[0]
    assert f"512x{rows}xbf16" not in main.split("\n")[0] and "optimization_barrier" not in main
    dots = [ln for ln in main.splitlines() if "stablehlo.dot_general" in ln]
    assert len(dots) == 1
    weight = dots[0].split("stablehlo.dot_general")[1].split(",")[1].strip()  # e.g. %0
    producer = next(ln for ln in main.splitlines() if ln.strip().startswith(f"{weight} ="))
    assert "stablehlo.convert %" in producer and "xi8>) -> tensor<" in producer  # the int8 values


# --- loading ----------------------------------------------------------------------------


def _random_checkpoint(path, width=1024, mlp=4096, depth=4, vocab=16000):
    """A ~200 MB float32 .npz with PaliGemma key names (written one array at a time)."""
    from pali_kit import checkpoints

    rng = np.random.default_rng(0)
    shapes = {
        "llm/layers/mlp/gating_einsum": (depth, 2, width, mlp),
        "llm/embedder/input_embedding": (vocab, width),
        "llm/layers/pre_ffw_norm/scale": (depth, width),
        "img/head/kernel": (256, width),
    }

    def arrays():
        for key, shape in shapes.items():
            yield key, rng.standard_normal(shape, dtype=np.float32)

    checkpoints.save_arrays(arrays(), path)
    return sum(4 * np.prod(s) for s in shapes.values())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_slices_quantized_on_threads_give_the_whole_arrays_integers(scheme):
    """Loading quantizes slices on a few threads while it reads the next: the same
    integers and scales as quantizing the array at once, in the slices' places,
    and a reader that fails part way raises its own error."""
    w = np.random.default_rng(7).standard_normal((40, 96, 64)).astype(np.float32)  # (L, F, W)
    whole = quant.quantize(w, scheme, (-2,))
    sizes = [1, 3, 2, 5, 1, 4, 7, 2, 6, 9]  # more slices than threads, uneven
    starts = np.cumsum([0, *sizes[:-1]])
    rows = ((int(a), w[a : a + n]) for a, n in zip(starts, sizes))
    streamed = quant.quantize_rows_of(rows, w.shape, w.dtype, scheme, (-2,))
    np.testing.assert_array_equal(streamed.values, whole.values)
    np.testing.assert_array_equal(streamed.scales, whole.scales)
    assert streamed.in_shape == whole.in_shape and streamed.dtype == whole.dtype

    def failing():
        yield 0, w[:4]
        yield 4, w[4:8]
        raise OSError("the file ends early")

    with pytest.raises(OSError, match="ends early"):
        quant.quantize_rows_of(failing(), w.shape, w.dtype, scheme, (-2,))


def test_quantized_loading_peaks_near_the_quantized_size(tmp_path):
    # numpy registers its buffers with tracemalloc, so the traced peak is the host
    # memory the loader holds at once (the quantized arrays are adopted by JAX
    # without a copy). Quantizing while streaming: quantized bytes plus a few
    # 4 MiB slices with their float temporaries (bounded here by 40 MB), and one
    # more slice in flight per quantizing thread: its bytes S, the out-major and
    # float32 copies (S each, float32 here), the integers and packing temporaries
    # (under 2S), the finished result (under S): under 6S per thread. Reading the
    # float weights needs all of them (~200 MB) at once.
    import tracemalloc

    from pali_kit import checkpoints

    path = tmp_path / "ckpt.npz"
    float_bytes = _random_checkpoint(path)
    peaks, trees = {}, {}
    for scheme in (None, "int8", "int4"):
        tracemalloc.start()
        trees[scheme] = checkpoints.load_params(path, quantize=scheme)
        peaks[scheme] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[None] >= float_bytes
    for scheme in ("int8", "int4"):
        size = quant.tree_nbytes(trees[scheme])
        assert size < {"int8": 0.26, "int4": 0.15}[scheme] * float_bytes
        threads = thread_pool()._max_workers * 6 * checkpoints.QUANT_CHUNK_BYTES
        assert peaks[scheme] < size + 40e6 + threads, (scheme, peaks[scheme], size)
        table = trees[scheme]["llm"]["embedder"]["input_embedding"]
        assert isinstance(table, quant.QArray) and table.shape == (16000, 1024)
        # the same integers as quantizing the float array in one go
        whole = quant.quantize(np.asarray(trees[None]["llm"]["embedder"]["input_embedding"]),
                               scheme, (-1,))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(table.values), whole.values)
    norm = trees["int8"]["llm"]["layers"]["pre_ffw_norm"]["scale"]
    assert not isinstance(norm, quant.QArray)  # norms stay float


def test_load_rejects_an_unknown_scheme():
    import pali_kit as pk

    with pytest.raises(ValueError, match="quantize='int3'.*use 'int8'"):
        pk.load("demo", quantize="int3", verbose=False)


# --- the model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    from pali_kit.data import ShapesDataset

    ds = ShapesDataset(2, size=64, seed=12345, tasks=["caption", "detect"])
    return [ds[i].image for i in range(2)], [ds[i].prefix for i in range(2)]


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_quantized_decode_equals_dequantized_reference(scheme, scenes):
    # The quantized model (CPU: prefill dequantizes in front of the product,
    # decode reads the integers inside the product loops) and a float model holding
    # the dequantized weights compute the same products of the same numbers,
    # in another summation order: float32 re-association, ~K * eps relative
    # per product (K <= 512 here: 6e-5), a few layers deep. Greedy tokens are
    # equal; log-probabilities agree within 1e-3 (absolute, they are O(1)).
    import pali_kit as pk

    model = pk.load("demo", quantize=scheme, verbose=False)
    reference = pk.Model(quant.dequantize_params(model.params), model.config, model.tokenizer)
    assert isinstance(model.run_params["llm"]["layers"]["mlp"]["linear"][0], quant.CpuQArray)
    images, prompts = scenes
    got = model.generate(images, prompts, max_new_tokens=12)
    want = reference.generate(images, prompts, max_new_tokens=12)
    for g, w in zip(got, want):
        assert g.text == w.text and len(g.text) > 3
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-3)


def test_model_quantize_reports_quantized_leaves_honestly():
    import pali_kit as pk

    model = pk.load("demo", verbose=False)
    small = model.quantize("int4")
    flat = dict(jax.tree_util.tree_flatten_with_path(small.params, is_leaf=quant.is_quantized)[0])
    quantized = {
        "/".join(p.key for p in path): leaf for path, leaf in flat.items()
        if isinstance(leaf, quant.QArray)
    }  # fmt: skip
    assert "llm/embedder/input_embedding" in quantized
    assert all(quant.contraction_axes(k) is not None for k in quantized)
    assert len(quantized) == 13  # the demo's matrices; patch and position embeddings stay float
    assert small.num_params() == model.num_params() and small.quantization == "int4"
    assert small.dtype == np.float32 and "int4" in small.summary()
    assert quant.tree_nbytes(small.params) < 0.2 * quant.tree_nbytes(model.params)
    with pytest.raises(ValueError, match="already quantized"):
        small.quantize("int8")
    with pytest.raises(ValueError, match="quantize='int16'"):
        model.quantize("int16")
    with pytest.raises(ValueError, match="quantized"):
        pk.save(small, "/nonexistent/never_written.npz")


def test_fine_tuning_with_int8_frozen_weights(demo_tokenizer):
    # frozen weights int8, the trainable subset (attention) float32: the loss is
    # finite and falls, only the trainable subset moves and gets optimizer state.
    from pali_kit import checkpoints
    from pali_kit import data as pdata
    from pali_kit import train as pt
    from pali_kit.model import init_params

    from .conftest import tiny_config
    from .test_train import _examples

    config = tiny_config()
    params = quant.quantize_params(init_params(config, 0), "int8")
    batches = pdata.Batcher(_examples(), demo_tokenizer, batch_size=8, text_len=16,
                            image_size=28, seed=0, prefetch=0)  # fmt: skip
    trainer = pt.Trainer(params, config, trainable="attention", optimizer="adamw", lr=3e-3,
                         num_steps=8)  # fmt: skip
    history = trainer.fit(batches, progress=False)
    assert np.all(np.isfinite(history.loss))
    assert np.mean(history.loss[-3:]) < np.mean(history.loss[:3]) - 0.1, history.loss
    trained = checkpoints.flatten(trainer.state.params)
    assert set(trained) == {
        "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w",
        "llm/layers/attn/attn_vec_einsum/w",
    }  # fmt: skip
    assert all(v.dtype == np.float32 and not isinstance(v, quant.QArray) for v in trained.values())
    before = checkpoints.flatten(params)
    for key, value in checkpoints.flatten(trainer.frozen).items():
        assert isinstance(value, quant.QArray) == isinstance(before[key], quant.QArray), key
        for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), key)
    opt = [x.size for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim]
    assert sum(opt) == 2 * sum(v.size for v in trained.values())  # Adam mu + nu, trainable only


def test_plan_counts_int8_frozen_weights():
    from pali_kit import train as pt

    from .conftest import tiny_config

    config = tiny_config()
    base = pt.plan(config, batch_size=2, text_len=8, tpu=False)
    q8 = pt.plan(config, batch_size=2, text_len=8, tpu=False, frozen_dtype="int8")
    assert q8.frozen_dtype == "int8" and q8.num_params == base.num_params
    assert q8.frozen_bytes < base.frozen_bytes and q8.trainable_bytes == base.trainable_bytes


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_stacked_tree_forward_equals_dequantized(scheme):
    # The official stacked tree (what GPUs/TPUs run):
    # each QArray is dequantized in front of its product, so the forward pass is
    # the dequantized model's up to float32 summation order (K <= 64 terms per
    # product here; logits O(1)): 1e-4 absolute.
    from pali_kit.model import PaliGemma, init_params

    from .conftest import tiny_config

    config = tiny_config()
    params = quant.quantize_params(init_params(config, 0), scheme)
    reference = quant.dequantize_params(params)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    text = rng.integers(0, config.llm.vocab_size, (2, 6)).astype(np.int32)
    mask_ar = np.array([[0, 0, 0, 1, 1, 1]] * 2, np.int32)
    module = PaliGemma(config)  # (lax.scan over the stack: the fine-tuning test)
    got = module.apply({"params": params}, images, text, mask_ar)
    want = module.apply({"params": reference}, images, text, mask_ar)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


@pytest.mark.parametrize("cpu", [False, True])
def test_output_layer_dequantizes_in_chunks(monkeypatch, cpu):
    # Tables with over CHUNK_ROWS rows (the 257152-row output layer) are
    # dequantized chunk by chunk: the same logits, and the same gradient for the
    # activations (a training step through a frozen quantized table), as one
    # dequantized table; float32 re-association over K = 40 terms.
    monkeypatch.setattr(quant, "CHUNK_ROWS", 100)
    rng = np.random.default_rng(4)
    q = quant.quantize(rng.standard_normal((1000, 40)).astype(np.float32), "int4", (-1,))
    assert quant._chunks(q) == 10
    q = quant.for_cpu(q) if cpu else q
    table = np.asarray(quant.dequantize(q))
    x = jnp.asarray(rng.standard_normal((2, 5, 40)).astype(np.float32))

    def loss(x, product):
        return jnp.sum(jnp.sin(product(x)))

    got = jax.jit(lambda x: q.einsum("...d,vd->...v", x))(x)
    want = jnp.einsum("btd,vd->btv", x, table)
    bound = 4 * 40 * EPS32 * np.einsum("btd,vd->btv", np.abs(x), np.abs(table))
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= bound)
    g = jax.grad(loss)(x, lambda x: q.einsum("...d,vd->...v", x))
    g_ref = jax.grad(loss)(x, lambda x: jnp.einsum("btd,vd->btv", x, table))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4 * 40)
