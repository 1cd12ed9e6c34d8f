"""Weight-only int8 / int4: kernel speed, the lowered GPU program, and quality.

    python bench/quantize.py --kernels      # one-token products at PaliGemma-3B shapes (CPU)
    python bench/quantize.py --hlo          # the program XLA:GPU is given for a quantized matmul
    python bench/quantize.py --quality      # demo model: held-out scores f32 / bf16 / int8 / int4
    python bench/quantize.py --3b           # random 3B: logit error, greedy agreement vs bf16

--kernels times, in one process and interleaved, the product of one token with
a 2304 x 9216 matrix (the 3B MLP) in every form the kit uses for decoding:
float32 (in, out), bfloat16 (out, in) (the CPU layout's form), and the
quantized fused reduce over int8 / packed int4 values (``quant.CpuQArray``).
GB/s = weight bytes read per product / time: the bandwidth floor says how fast
each form could be at most.
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


def kernels(k: int = 2304, n: int = 9216, repeat: int = 40) -> None:
    import jax
    import jax.numpy as jnp

    from pali_kit import quant

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n), dtype=np.float32) * k**-0.5).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((1, k), dtype=np.float32))
    w32 = jnp.asarray(w)
    w16t = jnp.asarray(w.T.copy(), jnp.bfloat16)
    forms = {
        "float32 (in, out)": (lambda x, w: x @ w, w32, 4 * k * n),
        "bfloat16 (out, in)": (
            lambda x, w: jax.lax.dot_general(  # x @ w.T: the CPU layout's one-row form
                x.astype(jnp.bfloat16),
                w.T,
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            ),  # fmt: skip
            w16t,
            2 * k * n,
        ),  # fmt: skip
    }
    for scheme in quant.SCHEMES:
        q = quant.cpu_layout({"w": quant.quantize(w32, scheme)})["w"]
        forms[f"{scheme} fused reduce"] = (lambda x, q: q.einsum("bd,df->bf", x), q, q.nbytes)
    ref = np.asarray(x) @ w
    jitted = {name: jax.jit(f) for name, (f, _, _) in forms.items()}
    for name, (_, weight, _) in forms.items():
        jitted[name](x, weight).block_until_ready()
    times = {name: [] for name in forms}
    for _ in range(repeat):  # interleaved: the machine's load affects every form alike
        for name, (_, weight, _) in forms.items():
            start = time.perf_counter()
            jitted[name](x, weight).block_until_ready()
            times[name].append(time.perf_counter() - start)
    bf16 = float(np.median(times["bfloat16 (out, in)"]))
    rows = []
    for name, (_, weight, nbytes) in forms.items():
        t = float(np.median(times[name]))
        err = np.abs(np.asarray(jitted[name](x, weight)) - ref).max() / np.abs(ref).max()
        rows.append({"form": name, "weight MB": f"{nbytes / 1e6:.1f}", "ms": f"{t * 1e3:.2f}",
                     "GB/s": f"{nbytes / t / 1e9:.1f}", "time vs bf16": f"{t / bf16:.2f}x",
                     "max rel err": f"{err:.4f}"})  # fmt: skip
    title = f"one token x ({k} x {n}) on {jax.devices()[0].device_kind}, median of {repeat}"
    table(rows, title)


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
    ap.add_argument("--n", type=int, default=100, help="held-out scenes per task (--quality)")
    args = ap.parse_args(argv)
    if not (args.kernels or args.hlo or args.quality or args.big):
        args.kernels = args.hlo = args.quality = True
    if args.kernels:
        kernels()
    if args.hlo:
        hlo()
    if args.quality:
        quality(args.n)
    if args.big:
        big()


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
