"""Weight-only int8 / int4: kernel speed, the lowered GPU program, and quality.

    python bench/quantize.py --kernels      # one-token products per 3B matrix kind (CPU)
    python bench/quantize.py --hlo          # the program XLA:GPU is given for a quantized matmul
    python bench/quantize.py --quality      # demo model: held-out scores f32 / bf16 / int8 / int4
    python bench/quantize.py --3b           # random 3B: logit error, greedy agreement vs bf16
    python bench/quantize.py --forms        # int4 one-row loop: the emitted form vs its bounds
    python bench/quantize.py --native-decode  # 3B decode: bf16, int4 XLA loop, int4 native kernel

--kernels times, in one process and interleaved, the product of one token with
each matrix of a PaliGemma-3B layer and with the output layer, in the forms
the kit decodes with on a CPU: bfloat16 (out, in) blocks (``model.cpu``) and
the int8 / int4 loops over the integers (``quant.CpuQArray``). GB/s = weight
bytes read per product / time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import table  # noqa: E402

# One-token products of a PaliGemma-3B layer and its output layer, as the model
# writes them: (einsum, x shape, official weight shape, contracted axes, group axes).
W, F, NH, K, H, V = 2304, 9216, 8, 4, 256, 257152
KINDS = {
    "q_einsum": ("btd,ndh->btnh", (1, 1, W), (NH, W, H), (-2,), 1),
    "kv_einsum": ("btd,ckdh->cbtkh", (1, 1, W), (2, K, W, H), (-2,), 2),
    "attn_vec_einsum": ("btnh,nhd->btd", (1, 1, NH, H), (NH, H, W), (-3, -2), 0),
    "gating_einsum": ("btd,cdf->cbtf", (1, 1, W), (2, W, F), (-2,), 1),
    "linear": ("btf,fd->btd", (1, 1, F), (F, W), (-2,), 0),
    "output layer": ("...d,vd->...v", (1, W), (V, W), (-1,), None),
}


def kernels(repeat: int = 7, stream_mb: int = 256) -> None:
    """Time each matrix kind in its CPU-layout form: bfloat16, int8, int4, interleaved.

    Each form cycles through copies of its matrix (at least ``stream_mb`` MB of
    weights in all) so that, as in decoding, the weights come from memory, not
    from a cache that one repeated matrix would fit in.
    """
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from pali_kit import quant
    from pali_kit.model import cpu

    rng = np.random.default_rng(0)
    rows = []
    for kind, (eq, xs, ws, axes, n_group) in KINDS.items():
        w = (rng.standard_normal(ws, dtype=np.float32) * ws[axes[0]] ** -0.5).astype(
            ml_dtypes.bfloat16
        )
        x = jnp.asarray(rng.standard_normal(xs, dtype=np.float32))
        copies = max(1, -(-stream_mb * 2**20 // w.nbytes))

        def bf16_form(w=w, n_group=n_group):
            if n_group is None:  # the table: (V, W) is already (out, in)
                return cpu.Matrix([[jnp.asarray(w)]], (), True, w.shape[:1])
            return cpu._out_in_matrix(jnp.asarray(w), n_group)

        forms = {"bfloat16": [bf16_form() for _ in range(copies)]}
        for scheme in quant.SCHEMES:
            forms[scheme] = [quant.for_cpu(quant.quantize_leaf(w, scheme, axes))
                             for _ in range(copies)]  # fmt: skip
        product = jax.jit(lambda x, m, eq=eq: m.einsum(eq, x))
        for ms in forms.values():
            product(x, ms[0]).block_until_ready()
        times = {name: [] for name in forms}
        for _ in range(repeat):  # interleaved: the machine's load affects every form alike
            for name, ms in forms.items():
                start = time.perf_counter()
                for m in ms:
                    product(x, m).block_until_ready()
                times[name].append((time.perf_counter() - start) / len(ms))
        bf16 = float(np.median(times["bfloat16"]))
        for name, ms in forms.items():
            t = float(np.median(times[name]))
            nbytes = w.nbytes if name == "bfloat16" else quant.QArray.nbytes.fget(ms[0])
            rows.append({"matrix": kind, "shape": "x".join(map(str, ws)), "form": name,
                         "MB": f"{nbytes / 1e6:.1f}", "ms": f"{t * 1e3:.2f}",
                         "GB/s": f"{nbytes / t / 1e9:.1f}", "time vs bf16": f"{t / bf16:.2f}x"})  # fmt: skip
        del forms
    title = (f"one token, CPU layout, on {jax.devices()[0].device_kind}, median of {repeat} "
             f"passes over >= {stream_mb} MB of copies per form")  # fmt: skip
    table(rows, title)


def forms(repeat: int = 7, stream_mb: int = 256) -> None:
    """The int4 one-row product of one 3B MLP matrix in several forms, timed interleaved.

    ``xla loop``: what ``quant._reduce_matvec`` emits (sign-extend, ``b << 28`` and
    ``b & -16`` converts, the group scale in the multiply-add). Two forms that are
    not products of the stored levels bound what an XLA:CPU loop over the bytes
    can reach: ``(bound) no scale`` leaves out the group scale, ``(bound) one
    convert`` converts each byte once (as int8 does). ``native (kit)``: the package's kernel
    (``pali_kit/native/int4_cpu.cc``, what decoding uses where it builds), on XLA's
    intra-op threads. bfloat16 / int8: the kit's CPU forms of the same matrix.
    Each form cycles through copies (>= ``stream_mb`` MB).
    """
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from pali_kit import native as native_kit
    from pali_kit import quant
    from pali_kit.model import cpu

    dims = (((1,), (0,)), ((), ()))

    def xla_loop(xe, xo, v, s):  # the kit's loop, as _reduce_matvec calls it
        m = quant._materialized  # as there: not fused into (recomputed in) the loop
        return quant._int4_bytes(m(xe[None] * quant.LOW), m(xo[None] * quant.HIGH), v, s)

    def no_scale(xe, xo, v, s):
        b = v.astype(jnp.int32)
        f = xe * (b << 28).astype(jnp.float32) + xo * (b & -16).astype(jnp.float32)
        return jax.lax.dot_general(jnp.ones((1, v.shape[1])), f.T, dims)

    def one_convert(xe, xo, v, s):
        f = xe * v.astype(jnp.float32) * quant._per_byte(s, v.shape)
        return jax.lax.dot_general(jnp.ones((1, v.shape[1])), f.T, dims)

    kit = jax.jit(lambda x, m: m.einsum("bk,ko->bo", x))  # the kit's CPU product of a form
    rng = np.random.default_rng(0)
    rows = []
    for kind, (o, k) in {"gating half": (F, W), "linear block": (W, 2 * W)}.items():
        w = (rng.standard_normal((k, o), dtype=np.float32) * k**-0.5).astype(ml_dtypes.bfloat16)
        x = jnp.asarray(rng.standard_normal((1, k), dtype=np.float32))
        q = quant.quantize(w, "int4", (-2,))  # values int8[o, k / 2], scales [o, k / 64]
        nbytes = {"int4": q.nbytes, "int8": quant.quantize(w, "int8", (-2,)).nbytes,
                  "bfloat16": w.nbytes}  # fmt: skip
        copies = max(1, -(-stream_mb * 2**20 // q.nbytes))
        ints = [(jnp.array(q.values), jnp.array(q.scales)) for _ in range(copies)]
        xe, xo = x[0, 0::2], x[0, 1::2]
        calls = {"xla loop": (jax.jit(xla_loop), ints), "(bound) no scale": (jax.jit(no_scale), ints),
                 "(bound) one convert": (jax.jit(one_convert), ints)}  # fmt: skip
        if native_kit.int4_available():  # the package's kernel (pali_kit/native/int4_cpu.cc)
            calls["native (kit)"] = (jax.jit(lambda xe, xo, v, s: native_kit.int4_row_product(
                jnp.stack([xe, xo], 1).reshape(-1).astype(jnp.bfloat16), [v], s)), ints)  # fmt: skip
        bf = [cpu._out_in_matrix(jnp.asarray(w), 0) for _ in range(max(1, copies // 4))]
        i8 = [quant.for_cpu(quant.quantize_leaf(w, "int8", (-2,))) for _ in range(copies // 2)]
        calls["bfloat16 (kit)"] = (lambda _e, _o, m, x=x: kit(x, m), [(m,) for m in bf])
        calls["int8 (kit)"] = (lambda _e, _o, m, x=x: kit(x, m), [(m,) for m in i8])
        times = {name: [] for name in calls}
        for fn, data in calls.values():
            fn(xe, xo, *data[0]).block_until_ready()
        for _ in range(repeat):
            for name, (fn, data) in calls.items():
                start = time.perf_counter()
                for d in data:
                    fn(xe, xo, *d).block_until_ready()
                times[name].append((time.perf_counter() - start) / len(data))
        bf16 = float(np.median(times["bfloat16 (kit)"]))
        for name, ts in times.items():
            t = float(np.median(ts))
            nb = nbytes["bfloat16" if "bfloat16" in name else "int8" if "int8" in name else "int4"]
            rows.append({"matrix": f"{kind} {o}x{k}", "form": name, "MB": f"{nb / 1e6:.1f}",
                         "ms": f"{t * 1e3:.3f}", "GB/s": f"{nb / t / 1e9:.1f}",
                         "time vs bf16": f"{t / bf16:.2f}x"})  # fmt: skip
        del calls, ints, bf, i8
    table(rows, f"int4 one-row product forms, median of {repeat} interleaved passes")


def native_decode(rounds: int = 2, new_tokens: int = 16, name: str = "paligemma2-3b-pt-224"):
    """Decode s/token, one process: bfloat16, int4 with XLA's loop, int4 with the native kernel.

    Full-size random weights (``common.random_checkpoint``), both models in
    memory (~9 GB: run it alone). ``quant.NATIVE_INT4`` switches the one-row
    int4 products between XLA's loop (``_reduce_matvec``) and the package's
    kernel (``pali_kit/native/int4_cpu.cc``); the forms alternate in ``rounds``
    rounds (recompiling the int4 step each time), so a change in the machine's
    load affects them alike.
    """
    import statistics

    import jax
    from common import random_checkpoint

    import pali_kit as pk
    from pali_kit import decode, native, quant

    if not native.int4_available():
        print("native int4 kernel not available here (see pali_kit.native)")
        return
    path = random_checkpoint(name, "bfloat16")
    models = {
        "bfloat16": pk.load(path, dtype="bfloat16", verbose=False),
        "int4": pk.load(path, dtype="bfloat16", quantize="int4", verbose=False),
    }
    tok = pk.Tokenizer.demo()
    enc = tok.encode_prompts(["caption en"], bucket=None)
    mask = np.ones(models["int4"].config.llm.vocab_size, bool)
    mask[decode.EOS_ID] = False  # never stop early

    def per_token(model, n):
        res = model.resolution
        image = np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)
        pixels = model.preprocess(image)
        stamps, tokens = [], []
        for t in decode.iter_tokens(model.config, model.run_params, pixels, enc["text"],
                                    enc["mask_input"], max_new_tokens=n, logit_mask=mask):  # fmt: skip
            stamps.append(time.perf_counter())
            tokens.append(int(np.asarray(t[0]).reshape(-1)[0]))
        return list(np.diff(stamps)), tokens

    forms = {"bfloat16": ("bfloat16", None), "int4 (XLA loop)": ("int4", False),
             "int4 (native kernel)": ("int4", True)}  # fmt: skip
    times = {f: [] for f in forms}
    tokens = {}
    try:
        for _ in range(rounds):
            for form, (m, on) in forms.items():
                if on is not None:  # retrace the step with this form
                    quant.NATIVE_INT4 = on
                    decode._jitted.cache_clear()
                    jax.clear_caches()
                per_token(models[m], 4)  # compile
                dt, tokens[form] = per_token(models[m], new_tokens)
                times[form] += dt
    finally:
        quant.NATIVE_INT4 = True
    bf16 = statistics.median(times["bfloat16"])
    rows = [{"weights": f, "decode s/token": f"{statistics.median(t):.4f}",
             "vs bfloat16": f"{statistics.median(t) / bf16:.2f}x", "tokens": str(len(t))}
            for f, t in times.items()]  # fmt: skip
    table(rows, f"{name}, random weights, decode, {rounds} interleaved rounds, one process")
    same = tokens["int4 (XLA loop)"] == tokens["int4 (native kernel)"]
    print(f"greedy tokens, int4 native vs XLA loop: {'same' if same else 'DIFFERENT'}")


def hlo() -> None:
    import jax
    import jax.numpy as jnp

    from pali_kit import quant

    for scheme in quant.SCHEMES:
        q = quant.quantize(jnp.zeros((2304, 9216)), scheme)
        fn = jax.jit(lambda x, q: q.einsum("bd,df->bf", x, jnp.bfloat16))
        x = jax.ShapeDtypeStruct((8, 2304), jnp.bfloat16)
        text = jax.export.export(fn, platforms=("cuda",))(x, q).mlir_module()
        body = text[text.index("func.func public @main") :]
        print(f"--- {scheme}: StableHLO given to XLA:GPU (main) ---")
        for line in body.splitlines()[:40]:
            if "loc(" in line:
                line = line[: line.index("loc(")].rstrip()
            print(line)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--hlo", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--3b", dest="big", action="store_true")
    ap.add_argument("--forms", action="store_true")
    ap.add_argument("--native-decode", action="store_true")
    ap.add_argument("--n", type=int, default=100, help="held-out scenes per task (--quality)")
    args = ap.parse_args(argv)
    if not (
        args.kernels or args.hlo or args.quality or args.big or args.forms or args.native_decode
    ):
        args.kernels = args.hlo = args.quality = True
    if args.kernels:
        kernels()
    if args.hlo:
        hlo()
    if args.quality:
        quality(args.n)
    if args.big:
        big()
    if args.forms:
        forms()
    if args.native_decode:
        native_decode()


def quality(n: int) -> None:
    """Held-out scores of the demo model per task, for each weight format, in one table."""
    import pali_kit as pk
    from pali_kit import data, quant
    from pali_kit.segmentation import load_vae

    vae = load_vae("demo")
    tasks = ("caption", "count", "color", "detect", "segment")
    variants = {
        "float32": pk.load("demo", verbose=False),
        "bfloat16": pk.load("demo", dtype="bfloat16", verbose=False),
        "int8": pk.load("demo", quantize="int8", verbose=False),
        "int4": pk.load("demo", quantize="int4", verbose=False),
    }
    rows = []
    for name, model in variants.items():
        start = time.perf_counter()
        scores = data.score_shapes(model, n, seed=12345, tasks=tasks, vae=vae)
        row = {"weights": name, "MB": f"{quant.tree_nbytes(model.params) / 1e6:.2f}"}
        row.update({t: f"{scores[t]:.2f}" for t in tasks})
        row["s"] = f"{time.perf_counter() - start:.0f}"
        rows.append(row)
        print(row, flush=True)
    table(rows, f"demo model, held-out scenes (seed 12345), {n} per task, greedy")


def big(name: str = "paligemma2-3b-pt-224", n_images: int = 3, n_text: int = 32, path=None) -> None:
    """Full-size random weights: int8 / int4 logits vs bfloat16 on the same forward passes.

    Each image is followed by "caption en" and ``n_text`` random tokens
    (teacher forcing, causal): at every text position we compare the logits
    (relative L2 error ||l_q - l_bf16|| / ||l_bf16||) and the greedy choice
    (argmax agreement). Forward passes use the official stacked tree, one
    model in memory at a time; quantized models are loaded from the same
    bfloat16 file with ``pk.load(..., quantize=...)`` (streamed).
    """
    import jax
    from common import peak_rss_gb, random_checkpoint

    import pali_kit as pk
    from pali_kit import quant
    from pali_kit.model import PaliGemma

    path = path or random_checkpoint(name, "bfloat16")
    tok = pk.Tokenizer.demo()
    prompt = [tok.bos_id] + tok.encode("caption en") + list(tok.newline_ids)
    logits = {}
    for variant in ("bfloat16", "int8", "int4"):
        start = time.perf_counter()
        quantize = None if variant == "bfloat16" else variant
        model = pk.load(path, dtype="bfloat16", quantize=quantize, verbose=False)
        load_s = time.perf_counter() - start
        res, vocab = model.resolution, model.config.llm.vocab_size
        rng = np.random.default_rng(0)  # the same inputs for every variant
        images = rng.uniform(-1, 1, (n_images, res, res, 3)).astype(np.float32)
        text = np.concatenate(
            [np.tile(prompt, (n_images, 1)), rng.integers(3, vocab, (n_images, n_text))], axis=1
        ).astype(np.int32)
        mask_ar = np.concatenate(
            [np.zeros((n_images, len(prompt))), np.ones((n_images, n_text))], axis=1
        ).astype(np.int32)
        module = PaliGemma(model.config)
        out = jax.jit(lambda p, *a, m=module: m.apply({"params": p}, *a))(
            model.params, images, text, mask_ar
        )
        logits[variant] = np.asarray(out[:, len(prompt) - 1 :], np.float32)
        print(f"{variant}: load {load_s:.0f} s, weights {quant.tree_nbytes(model.params) / 1e9:.2f}"
              f" GB, forward {time.perf_counter() - start - load_s:.0f} s, peak RSS so far "
              f"{peak_rss_gb():.1f} GB", flush=True)  # fmt: skip
        del model, out
        jax.clear_caches()
    ref = logits["bfloat16"]
    rows = []
    for variant in ("int8", "int4"):
        got = logits[variant]
        rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        agree = np.mean(np.argmax(got, -1) == np.argmax(ref, -1))
        rows.append({"weights": variant, "relative logit error (median)": f"{np.median(rel):.4f}",
                     "(max)": f"{rel.max():.4f}", "greedy agreement": f"{agree:.3f}",
                     "positions": str(rel.size)})  # fmt: skip
    table(rows, f"{name}, random weights, vs bfloat16, {n_images} images x {n_text + 1} positions")


if __name__ == "__main__":
    main()
