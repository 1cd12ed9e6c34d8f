"""int4 products of many rows (prefill, training) on GPU/TPU: the generic QArray path.

What XLA:GPU/TPU are given is checked on the exported CUDA program (``jax.export``
lowers on a CPU machine); whether the matmul fusion reads the operand in place is
measured by ``bench/gpu_check.py --sections products`` on a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_kit import quant
from pali_kit.model.common import policy_einsum

EPS = {jnp.float32: 2.0**-24, jnp.float16: 2.0**-11, jnp.bfloat16: 2.0**-8}  # unit roundoff


def _bound(x, q, operand_dtype):
    """Per output, the argued bound on |int4 product - dequantized-reference product|.

    Both products round x to the operand dtype alike (the same exact power-of-two
    row scaling); they differ in (a) the weight operand: levels * scale rounded
    to the operand dtype after the scale was rounded to it, against the float32
    product rounded once: |dw| <= 3u |w| (u the dtype's unit roundoff; 0 in
    float32); and (b) float32 accumulation order over K terms: K * 2^-24 *
    sum |x w|. Both scale with sum_k |x_k| |w_k|.
    """
    w = np.abs(np.asarray(quant.dequantize(q), np.float64))
    mag = np.abs(np.asarray(x, np.float64)) @ w
    u = 0.0 if operand_dtype == jnp.float32 else EPS[operand_dtype]
    k = w.shape[0]
    return (3 * u + 2 * k * 2.0**-24) * mag + 1e-30


@pytest.mark.parametrize(
    "k, n, dtype",
    [(256, 96, jnp.float32), (200, 64, jnp.float32), (9216, 64, jnp.float16),
     (2304, 128, jnp.bfloat16), (4680, 32, jnp.bfloat16)],
)  # fmt: skip  # 9216, 4680: stored in column blocks; 200, 4680: padded groups
@pytest.mark.parametrize("form", ["shifts", "s4"])
def test_int4_many_rows_equals_dequantized_reference(k, n, dtype, form):
    w = jax.random.normal(jax.random.key(0), (k, n)).astype(dtype)
    q = quant.quantize(w, "int4")
    x = jax.random.normal(jax.random.key(1), (8, k)) * 3.0
    # (on CPU quant.einsum takes the dequantize-first form: the GPU/TPU form directly)
    got = np.asarray(jax.jit(lambda x, q: quant._int4_product(x, q, None, form))(x, q))
    want = np.asarray(policy_einsum("bd,df->bf", x, quant.dequantize(q)))
    assert np.all(np.abs(got - want) <= _bound(x, q, dtype))
    assert np.abs(got - want).max() > 0 or dtype == jnp.float32 or k < 1000  # not vacuous
    # and with the opt-in half-precision compute
    got = np.asarray(quant._int4_product(x, q, "bfloat16", form))
    want = np.asarray(policy_einsum("bd,df->bf", x, quant.dequantize(q), "bfloat16"))
    assert np.all(np.abs(got - want) <= _bound(x, q, jnp.bfloat16))
    # the CPU branch of quant.einsum is the former form: the dequantized weight itself
    # (the same operand as the reference: only the float32 summation order differs)
    got = np.asarray(quant.einsum("bd,df->bf", x, q))
    want = np.asarray(policy_einsum("bd,df->bf", x, quant.dequantize(q)))
    assert np.all(np.abs(got - want) <= _bound(x, q, jnp.float32))


def test_int4_output_layer_chunks_and_gradient(monkeypatch):
    # the embedding table as output layer ("bd,vd->bv"), dequantized chunk by chunk
    monkeypatch.setattr(quant, "CHUNK_ROWS", 64)
    table = jax.random.normal(jax.random.key(2), (256, 128)).astype(jnp.bfloat16)
    q = quant.quantize(table, "int4", (-1,))
    assert quant._chunks(q) > 1
    x = jax.random.normal(jax.random.key(3), (6, 128))
    got = np.asarray(quant._int4_chunks(x, q, None))
    want = np.asarray(policy_einsum("bd,vd->bv", x, quant.dequantize(q)))
    tol = _bound(x, quant.quantize(table.T, "int4"), jnp.bfloat16)  # same |w|, (in, out)
    assert np.all(np.abs(got - want) <= tol)
    # training: d/dx through the frozen int4 weight, against the dequantized weight's
    g = np.asarray(jax.grad(lambda x: jnp.sum(jnp.sin(quant._int4_chunks(x, q, None))))(x))
    ref = jax.grad(lambda x: jnp.sum(jnp.sin(policy_einsum("bd,vd->bv", x, quant.dequantize(q)))))
    ref = np.asarray(ref(x))
    # |d sin(y)/dy| <= 1 and |dy| is bounded as above; d/dx sums 256 outputs of
    # |w| <= max|w|, each off by |cos(y) - cos(y')| <= |dy| plus the weight's rounding
    wmax = float(np.abs(np.asarray(quant.dequantize(q), np.float64)).max())
    assert np.abs(g - ref).max() <= 256 * wmax * (tol.max() + 3 * 2.0**-8)


def _program(fn, *args) -> dict:
    """The exported CUDA program's main function: {name: (op, operands, result type)}."""
    text = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args).mlir_module()
    main = text[text.index("func.func public @main") :]
    main = main[: main.index("\n  }")]
    ops = {}
    for line in main.splitlines()[1:]:
        m = re.match(r"\s*(%[\w#]+) = (?:stablehlo\.)?([\w.]+)(.*)", line)
        if m:
            name, op, rest = m.groups()
            body = rest.split(" : ")[0]
            ops[name] = (op, re.findall(r"%[\w#]+", body), rest.split(" -> ")[-1].split(" loc(")[0])
    return ops


def _weight_operand_ops(ops: dict) -> list[list[tuple[str, str]]]:
    """For each dot, the ops (op, result type) that produce its weight (second) operand."""
    chains = []
    for op, args, _ in ops.values():
        if op != "dot_general":
            continue
        seen, todo, chain = set(), [args[1]], []
        while todo:
            name = todo.pop()
            if name in seen or name not in ops:  # %argN: a program input
                continue
            seen.add(name)
            chain.append((ops[name][0], ops[name][2]))
            todo += ops[name][1]
        chains.append(chain)
    return chains


@pytest.mark.parametrize("form, dots_per_block", [("shifts", 2), ("s4", 1)])
@pytest.mark.parametrize("k", [2304, 9216])  # 9216: stored in two column blocks
def test_cuda_int4_prefill_dequantizes_inside_the_dot_operand(k, form, dots_per_block,
                                                              monkeypatch):  # fmt: skip
    # 256 rows (prefill, training): each dot's weight operand is an elementwise
    # function of the stored bytes (shifts or a bitcast to int4, a conversion, a
    # product with the broadcast group scales), which a matmul fusion reads in place. Nothing of
    # the weight's size is reshaped, concatenated, transposed or padded in
    # floating point (a matmul fusion does not take those: the float matrix
    # would be written out first, as the former form did).
    q = quant.quantize(jnp.ones((k, 512)), "int4")
    x = jax.ShapeDtypeStruct((256, k), jnp.float32)

    def float_layout_ops(form):
        monkeypatch.setattr(quant, "INT4_PRODUCT", form)
        ops = _program(lambda x, q: q.einsum("bd,df->bf", x, jnp.bfloat16), x, q)
        chains = _weight_operand_ops(ops)
        assert chains and all(any(op == "convert" for op, _ in c) for c in chains)
        bad = []
        for chain in chains:
            for op, ty in chain:
                m = re.search(r"tensor<([\dx]+)x(bf16|f16|f32)>", ty)
                big = m and np.prod([int(d) for d in m.group(1).split("x")]) >= k * 512 // 4
                if big and op not in ("multiply", "convert", "broadcast_in_dim"):
                    bad.append(op)
        return bad, chains

    bad, chains = float_layout_ops(form)
    assert bad == [], bad
    # each dot contracts the weight's last two axes, in order (no transpose to make a matrix)
    text = jax.export.export(
        jax.jit(lambda x, q: q.einsum("bd,df->bf", x, jnp.bfloat16)), platforms=("cuda",)
    )(x, q).mlir_module()
    dims = re.findall(r"dot_general .*contracting_dims = \[[\d, ]+\] x \[([\d, ]+)\]", text)
    assert dims and set(dims) == {"2, 3"}, dims
    assert len(chains) == dots_per_block * q.blocks  # shifts: one dot per nibble
    # the check can fail: the former form's operand is the reshaped float matrix
    bad, _ = float_layout_ops("dequantize")
    assert bad, "the dequantize-first form should show a float reshape of the weight"


def test_default_int4_form_is_s4_on_cuda_and_the_former_form_on_tpu():
    # "auto": the bitcast to XLA's int4 in the program given to XLA:GPU (measured there);
    # a TPU, not measured, gets the dequantize-first form (a float reshape of the weight)
    assert quant.INT4_PRODUCT == "auto"
    q = quant.quantize(jnp.ones((2304, 512)), "int4")
    x = jax.ShapeDtypeStruct((256, 2304), jnp.float32)
    fn = jax.jit(lambda x, q: q.einsum("bd,df->bf", x, jnp.bfloat16))
    cuda = jax.export.export(fn, platforms=("cuda",))(x, q).mlir_module()
    tpu = jax.export.export(fn, platforms=("tpu",))(x, q).mlir_module()
    assert "xi4>" in cuda and "xi4>" not in tpu


def test_gpu_check_products_runs_small(tmp_path):
    # the GPU check's products section, on CPU at its small size (also times the forms)
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_check.py"), "--small", "--sections",
         "products", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    rows = json.loads((tmp_path / "gpu_check.json").read_text())["products"]
    assert not isinstance(rows, dict), rows  # a dict: the section's error
    forms = {r["weights"] for r in rows}
    assert {"int4", "int4-dequantize"} <= forms


def test_int4_model_forward_with_the_accelerator_form(monkeypatch):
    # Every product shape of the model (heads, kv pairs, the attention output over
    # two contracted axes, the vision tower, the output layer) through the GPU/TPU
    # form (forced here on CPU): float32 weights make the operand exact, so the
    # logits agree with the dequantized tree's to float32 summation order
    # (FORWARD_REL, conftest).
    import pali_kit as pk
    from pali_kit.model import PaliGemma

    from .conftest import FORWARD_REL, assert_close_to_scale, tiny_config

    config = tiny_config(llm_width=128, llm_mlp_dim=192)  # some products span groups
    q = quant.quantize_params(pk.init_params(config, 0), "int4")
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    text = rng.integers(0, config.llm.vocab_size, (2, 8)).astype(np.int32)
    fn = jax.jit(lambda p: PaliGemma(config).apply({"params": p}, image, text, text * 0))
    want = fn(quant.dequantize_params(q))
    used = []

    def accelerator_form(x2, q, compute_dtype, product=None):
        used.append(q.shape)
        return quant._int4_product(x2, q, compute_dtype)

    monkeypatch.setattr(quant, "_int4_rows", accelerator_form)
    assert_close_to_scale(fn(q), want, FORWARD_REL)
    assert len(used) >= 8, used  # vision and language products took the form
