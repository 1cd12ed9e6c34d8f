"""What an accelerator runs: compiled programs, quantized products, decode speed, vs transformers.

    python bench/gpu_check.py --out DIR           # PaliGemma 2 3B-224, random weights, default device
    python bench/gpu_check.py --small --out DIR   # a quick check of the script itself (any device)

Meant for a GPU (it runs anywhere). To hold JAX to a T4's memory on a larger
GPU, start it with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` set to 15 GB / the GPU's
memory. Every section runs on its own (one failing does not stop the others);
results go to DIR/gpu_check.json, compiled programs to DIR/*.hlo.txt.

1. ``programs``: the forward of the official stacked tree compiled for the
   device, float16 weights: counts of optimization barriers (the CPU layout's
   tool; none may reach an accelerator), matrix-unit calls and fusions.
2. ``products``: one quantized matrix (the 3B and 10B MLP shapes) times 1 and
   256 rows: compiled temporaries against the float matrix's bytes (a float
   copy of the weight would show there), and the time per product as the
   bandwidth of the bytes the weight is stored in, against float16 and bfloat16.
   int4 at 256 rows in three forms: "int4" (the group-scaled levels as the dot's
   operand, ``quant._int4_product``), "int4-dequantize" (the float matrix
   written first) and "int4-unscaled" (a diagnostic: the first without its
   scales, wrong values); each quantized product's difference to the
   dequantized weight's product.
3. ``f32_matmul``: the fixture model's float32 logits under the device's
   default matmul precision and under "highest" (TF32 on Ampere and newer).
4. ``decode``: the whole model per weight format (float16, bfloat16, int8,
   int4, and float16 with ``compute_dtype="float16"``, the opt-in without the
   numerics policy's range scaling, as "float16-fast"): prefill and per-token decode, against the floor (weight bytes / the
   memory bandwidth measured here); then transformers in float16 on the same
   shapes in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pali_kit as pk  # noqa: E402
from pali_kit import checkpoints, decode, quant  # noqa: E402
from pali_kit.configs import resolve_config  # noqa: E402
from pali_kit.model import PaliGemma, accel, param_shapes  # noqa: E402

PROMPT = "answer en what is in the picture"
RESULTS: dict = {}
OUT = Path(".")


def section(fn):
    """Run one section; record its result or its error, never stop the script."""

    def run(*args, **kw):
        print(f"\n=== {fn.__name__}", flush=True)
        start = time.perf_counter()
        try:
            RESULTS[fn.__name__] = fn(*args, **kw)
        except Exception:  # a bench: report and go on to the next section
            RESULTS[fn.__name__] = {"error": traceback.format_exc()[-3000:]}
            print(RESULTS[fn.__name__]["error"], flush=True)
        print(f"({fn.__name__}: {time.perf_counter() - start:.1f} s)", flush=True)
        save()

    return run


def save():
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def timed(fn, *args, repeat: int = 20) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def std_of(key: str, shape) -> float:
    """1/sqrt(fan-in) for matrices, 0 for norms and biases (random weights of a sane scale)."""
    if key.endswith(("scale", "bias")):
        return 0.0
    if key.endswith("input_embedding"):
        return shape[-1] ** -0.5
    axes = quant.contraction_axes(key) or (-2,)
    return float(np.prod([shape[a] for a in axes])) ** -0.5


def random_params(config, dtype) -> dict:
    """Random weights made on the device, leaf by leaf (no host copy)."""
    out = {}
    for i, (key, s) in enumerate(checkpoints.flatten(param_shapes(config)).items()):
        std = np.float32(std_of(key, s.shape))
        make = jax.jit(lambda k, shape=s.shape, std=std: jax.random.normal(k, shape) * std)
        out[key] = make(jax.random.key(i)).astype(dtype)
    return checkpoints.unflatten(out)


def quantize_on_device(params: dict, scheme: str) -> dict:
    """``quant.quantize_params`` done on the device, one layer of a stack at a time."""
    flat = {}
    for key, a in checkpoints.flatten(params).items():
        axes = quant.contraction_axes(key)
        if axes is None:  # a copy: the result's stacks may be freed on their own
            flat[key] = jnp.copy(a)
            continue
        one = jax.jit(lambda w, axes=axes: quant.quantize(w, scheme, axes))
        if a.ndim >= 3 and 0 not in [x % a.ndim for x in axes]:  # a layer stack
            parts = [one(a[i]) for i in range(a.shape[0])]
            q = parts[0]
            values = jnp.stack([p.values for p in parts])
            scales = jnp.stack([p.scales for p in parts])
            flat[key] = quant.QArray(values, scales, scheme, axes, q.in_shape, q.dtype)
        else:
            flat[key] = one(a)
    return checkpoints.unflatten(flat)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def bandwidth() -> float:
    """Bytes per second of a large reduction: the device's memory read rate."""
    big = jnp.ones((1 << 28 if jax.default_backend() == "cpu" else 1 << 30,), jnp.float32)
    return big.nbytes / timed(jax.jit(jnp.sum), big, repeat=10)


def hlo_counts(text: str) -> dict:
    return {
        "optimization_barrier": text.count("opt-barrier") + text.count("optimization_barrier"),
        "custom_call_gemm": sum(
            "custom-call" in ln and "gemm" in ln.lower() for ln in text.splitlines()
        ),  # fmt: skip
        "triton_gemm_fusions": text.count("__triton_gemm") + text.count("__triton_nested_gemm"),
        "fusions": sum(" fusion(" in ln for ln in text.splitlines()),
    }


# ----------------------------------------------------------------------------- sections
@section
def env():
    import flax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    info = {
        "jax": jax.__version__, "flax": flax.__version__, "platform": dev.platform,
        "device": dev.device_kind, "devices": len(jax.devices()),
        "memory_limit_gb": stats.get("bytes_limit", 0) / 1e9,
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "default_dtype": pk.device_dtype(),
    }  # fmt: skip
    print(info)
    return info


@section
def programs(config):
    """The official-tree forward, compiled for this device, float16 weights."""
    cfg = config.replace(llm_depth=2, img_depth=2)  # the same per-layer program, faster compile
    params = random_params(cfg, jnp.float16)
    res, t = cfg.resolution, 16
    images = jnp.zeros((1, res, res, 3), jnp.float32)
    text = jnp.ones((1, t), jnp.int32)
    mask_ar = jnp.zeros((1, t), jnp.int32)
    fn = jax.jit(lambda p, i, x, m: PaliGemma(cfg).apply({"params": p}, i, x, m))
    compiled = fn.lower(params, images, text, mask_ar).compile()
    text_hlo = compiled.as_text()
    (OUT / "forward_f16.hlo.txt").write_text(text_hlo)
    logits = compiled(params, images, text, mask_ar)
    out = hlo_counts(text_hlo) | {"logits_finite": bool(jnp.isfinite(logits).all())}
    print(out)
    return out


@section
def products(small: bool):
    """One quantized matrix times 1 and 256 rows: compiled temporaries and time."""
    shapes = {"3B mlp (2304, 9216)": (2304, 9216), "10B mlp (3584, 14336)": (3584, 14336),
              "3B mlp linear (9216, 2304)": (9216, 2304)}  # fmt: skip  # int4: 2 column blocks
    if small:
        shapes = {"small (256, 512)": (256, 512)}
    rows_out = []
    chosen = quant.INT4_PRODUCT
    written = set()  # formats whose HLO file was begun
    for name, (k, n) in shapes.items():
        w16 = jax.jit(lambda key, k=k, n=n: jax.random.normal(key, (k, n)) * k**-0.5)(
            jax.random.key(0)
        )
        weights = {
            "float16": w16.astype(jnp.float16),
            "bfloat16": w16.astype(jnp.bfloat16),
            "int8": jax.jit(lambda w: quant.quantize(w, "int8", (-2,)))(w16.astype(jnp.float16)),
            "int4": jax.jit(lambda w: quant.quantize(w, "int4", (-2,)))(w16.astype(jnp.float16)),
        }
        # int4 at many rows: each form of quant.INT4_PRODUCT ("int4": the default), and a
        # diagnostic (values not the product's): the default with scales of 1.0, which
        # XLA folds away: is the group scales' broadcast what a fusion refuses?
        forms = {"int4": chosen, "int4-shifts": "shifts", "int4-s4": "s4",
                 "int4-dequantize": "dequantize",
                 "int4-unscaled": chosen}  # fmt: skip
        for fmt in list(forms)[1:]:
            weights[fmt] = weights["int4"]
        del w16
        float_bytes = k * n * 2
        for rows in (1, 256):
            x = jax.random.normal(jax.random.key(1), (rows, k), jnp.float32)
            for fmt, w in weights.items():
                if fmt in forms and fmt != "int4" and rows <= quant.REDUCE_ROWS:
                    continue  # the same reduction as "int4"
                quant.INT4_PRODUCT = forms.get(fmt, chosen)
                fn = jax.jit(lambda x, w: quant.einsum("bd,df->bf", x, w))
                if fmt == "int4-unscaled":
                    fn = jax.jit(lambda x, w: quant._int4_product(
                        x, w._replace(w.values, jnp.ones_like(w.scales))))  # fmt: skip
                compiled = fn.lower(x, w).compile()
                hlo = compiled.as_text()
                if fmt.startswith(("int8", "int4")):  # one file per format (few files)
                    mode = "a" if fmt in written else "w"
                    written.add(fmt)
                    with open(OUT / f"products_{fmt}.hlo.txt", mode) as f:
                        f.write(f"// ===== {name}, {rows} rows, {fmt}\n{hlo}\n")
                temp = compiled.memory_analysis().temp_size_in_bytes
                sec = timed(compiled, x, w)
                stored = nbytes(w)
                err = None
                if quant.is_quantized(w) and fmt != "int4-unscaled":  # vs the dequantized weight
                    ref = quant.einsum("bd,df->bf", x, quant.dequantize(w))
                    y = compiled(x, w)
                    err = float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
                row = {
                    "matrix": name, "rows": rows, "weights": fmt, "stored MB": stored / 1e6,
                    "temp MB": temp / 1e6, "temp / float matrix": temp / float_bytes,
                    "us": sec * 1e6, "GB/s of stored bytes": stored / sec / 1e9,
                    "max|y - y_dequantized| / max|y|": err,
                } | hlo_counts(hlo)  # fmt: skip
                rows_out.append(row)
                print({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()},
                      flush=True)  # fmt: skip
    quant.INT4_PRODUCT = chosen
    return rows_out


@section
def f32_matmul():
    """Fixture model (big_vision reference outputs) in float32 on this device."""
    fixtures = ROOT / "tests" / "fixtures"
    out = {}
    for name in ("pub_gemma1", "pub_gemma2"):
        path = fixtures / f"{name}.params.npz"
        expect = dict(np.load(fixtures / f"{name}.expect.npz"))
        params = checkpoints.load_params(path)
        model = pk.Model(jax.device_put(params), checkpoints.infer_config(params, str(path)))
        for precision in ("default", "highest"):
            with jax.default_matmul_precision(precision):
                zimg = model.embed_image(expect["image"])
                logits = model.logits(expect["image"], expect["text"], expect["mask_ar"])
            for what, got, want in (("image embeddings", zimg, expect["zimg"]),
                                    ("text logits", logits, expect["text_logits"])):  # fmt: skip
                got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
                err = np.abs(got - want).max() / np.abs(want).max()
                out[f"{name} {what}, precision {precision}: max|diff| / max|ref|"] = float(err)
    print(out)
    return out


def kit_decode(config, run, new_tokens: int) -> dict:
    """Prefill + decode timings of one run tree (the layout ``Model.run_params`` hands over)."""
    tok = pk.Tokenizer.demo()
    res = config.resolution
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, res, res, 3)).astype(np.float32)
    enc = tok.encode_prompts([PROMPT], bucket=None)
    mask = np.ones(config.llm.vocab_size, bool)
    mask[decode.EOS_ID] = False  # never stop early: every run decodes the same count

    def run_once():
        stamps = []
        start = time.perf_counter()
        for _ in decode.iter_tokens(config, run, pixels, enc["text"], enc["mask_input"],
                                    max_new_tokens=new_tokens, logit_mask=mask):  # fmt: skip
            stamps.append(time.perf_counter())
        return start, stamps

    start, stamps = run_once()
    first = stamps[0] - start
    ttfts, steps = [], []
    for _ in range(2):
        start, stamps = run_once()
        ttfts.append(stamps[0] - start)
        steps += list(np.diff(stamps))
    return {"first call s": first, "prefill s": min(ttfts), "decode s/token": statistics.median(steps),
            "prompt ids": [int(t) for t, m in zip(enc["text"][0], enc["mask_input"][0]) if m]}  # fmt: skip


def prefill_temp_gb(config, tree) -> float:
    """XLA's temporaries of the compiled prefill for a tree of shapes (nothing allocated)."""
    res = config.resolution
    fn = jax.jit(lambda p, i, t, m: PaliGemma(config).apply(
        {"params": p}, i, t, m, 512, method=PaliGemma.prefill))  # fmt: skip
    args = (jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 32), jnp.int32), jax.ShapeDtypeStruct((1, 32), bool))  # fmt: skip
    return fn.lower(tree, *args).compile().memory_analysis().temp_size_in_bytes / 1e9


@section
def decode_speed(config, new_tokens: int, formats: list[str]):
    """Each format's run tree as ``Model.run_params`` makes it on a GPU (stacks split per
    layer, each stack freed once split), float16 last since the others are made from it."""
    bw = bandwidth()
    dev = jax.devices()[0]
    rows = []
    base = random_params(config, jnp.float16)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), base)
    temps = {layout: prefill_temp_gb(config, tree) for layout, tree in
             (("stacked", shapes), ("split", jax.eval_shape(accel.split_stacks, shapes)))}  # fmt: skip
    print("prefill temporaries GB (float16):", temps, flush=True)
    order = [f for f in formats if f not in ("float16", "float16-fast")]
    order += [f for f in formats if f in ("float16", "float16-fast")]
    run_f16 = None
    for fmt in order:
        cfg = config.replace(compute_dtype="float16") if fmt == "float16-fast" else config
        if fmt in ("float16", "float16-fast"):
            if run_f16 is None:
                run_f16, base = accel.split_stacks(base, release=True), None
            run = run_f16
        elif fmt == "bfloat16":
            run = accel.split_stacks(jax.tree.map(lambda a: a.astype(jnp.bfloat16), base), True)
        else:
            run = accel.split_stacks(quantize_on_device(base, fmt), release=True)
        llm_bytes = nbytes(run["llm"])
        r = kit_decode(cfg, run, new_tokens)
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9
        row = {"weights": fmt, "weights GB": nbytes(run) / 1e9, **r,
               "decode floor s": llm_bytes / bw, "decode / floor": r["decode s/token"] * bw / llm_bytes,
               "device peak GB so far": peak}  # fmt: skip
        rows.append(row)
        print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items() if a != "prompt ids"},
              flush=True)  # fmt: skip
        del run
    return {"bandwidth GB/s": bw / 1e9, "prefill temp GB": temps, "rows": rows}


HF_CHILD = r"""
import json, statistics, sys, time
import numpy as np, torch
from transformers import LogitsProcessor, PaliGemmaConfig, PaliGemmaForConditionalGeneration
args = json.loads(sys.argv[1])
dtype = getattr(torch, args["dtype"])
torch.set_default_dtype(dtype)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig(**args["config"])).eval()
device = next(model.parameters()).device
cfg = model.config
res = cfg.vision_config.image_size
n_img = (res // cfg.vision_config.patch_size) ** 2
ids = torch.tensor([[cfg.image_token_index] * n_img + args["prompt_ids"]], device=device)
pixels = torch.rand((1, 3, res, res), device=device, dtype=dtype) * 2 - 1
class Stamp(LogitsProcessor):
    def __init__(self): self.t = []
    def __call__(self, input_ids, scores):
        torch.cuda.synchronize() if device.type == "cuda" else None
        self.t.append(time.perf_counter()); return scores
def run_once():
    s = Stamp(); start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, pixel_values=pixels, token_type_ids=torch.zeros_like(ids),
                       attention_mask=torch.ones_like(ids), max_new_tokens=args["new_tokens"],
                       min_new_tokens=args["new_tokens"], do_sample=False, logits_processor=[s])
    return start, s.t
run_once()
ttfts, steps = [], []
for _ in range(2):
    start, t = run_once(); ttfts.append(t[0] - start); steps += list(np.diff(t))
peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0
print("RESULT " + json.dumps({"prefill s": min(ttfts), "decode s/token": statistics.median(steps),
      "device peak GB": peak, "attn": str(cfg._attn_implementation)}))
"""


@section
def transformers_speed(config, new_tokens: int, prompt_ids: list[int]):
    from pali_kit.hf.config import hf_config

    hf = hf_config(config, "float16")
    args = {"dtype": "float16", "config": hf, "new_tokens": new_tokens, "prompt_ids": prompt_ids}
    out = subprocess.run([sys.executable, "-c", HF_CHILD, json.dumps(args)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            print(r)
            return r
    raise RuntimeError(f"transformers child failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--name", default="paligemma2-3b-pt-224")
    ap.add_argument("--small", action="store_true", help="2-layer narrow model: checks the script")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--formats", default="float16,bfloat16,int8,int4")
    ap.add_argument("--sections", default="env,programs,products,f32_matmul,decode,transformers")
    args = ap.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    config = resolve_config(args.name)
    if args.small:
        config = config.replace(llm_depth=2, img_depth=1, llm_width=256, llm_mlp_dim=512,
                                llm_num_heads=2, num_kv_heads=1, img_width=128, img_mlp_dim=256,
                                img_num_heads=2, vocab_size=4096)  # fmt: skip
    todo = args.sections.split(",")
    if "env" in todo:
        env()
    if "programs" in todo:
        programs(config)
    if "products" in todo:
        products(args.small)
    if "f32_matmul" in todo:
        f32_matmul()
    if "decode" in todo:
        decode_speed(config, args.new_tokens, args.formats.split(","))
    if "transformers" in todo:
        rows = RESULTS.get("decode_speed", {}).get("rows") or [{}]
        ids = rows[0].get("prompt ids") or list(range(2, 11))
        transformers_speed(config, args.new_tokens, ids)
    print("\nsummary written to", OUT / "gpu_check.json")


if __name__ == "__main__":
    main()
