"""Generation speed: pali_kit vs transformers vs the hardware floors, same weights, same run.

    python bench/generate.py                       # PaliGemma-3B-224, random weights, f32 + bf16
    python bench/generate.py --dtypes bfloat16 --skip-hf
    python bench/generate.py --llm-depth 2         # a quick check of the script itself

Every measurement runs in a fresh process (cold start, own peak RSS), its weights
read just before from the page cache. The kit's cold starts run as a user's
would by default: a new persistent compilation cache and a new weights cache
per dtype; the first process starts with both empty (and writes the weights
cache, waiting for that write after its cold first token, before the steady-state
timings), the second ("warm cache") finds both filled and maps the weights:
  kit:  pk.load -> model.generate/stream path (prefill + cached decode), timed per token
  hf:   transformers PaliGemmaForConditionalGeneration on the same weights
        (exported with pk.export_hf), default sdpa attention, token_type_ids given
Floors, measured in the same process as the kit run:
  decode  = bytes of LLM weights read per token / memory read bandwidth
  prefill = 2 * params * tokens / matmul rate (same shape class, same dtype)
Runs unchanged on a GPU (floors then use HBM bandwidth and the GPU's matmul rate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import BENCH_DIR, child_result, random_checkpoint, table, warm_page_cache  # noqa: E402

PROMPT = "answer en what is in the picture"
NEW_TOKENS = 24

KIT_CHILD = r"""
import json, os, statistics, sys, time
T0 = time.perf_counter()
sys.path.insert(0, {here!r})
import numpy as np
import jax, jax.numpy as jnp
import pali_kit as pk
from pali_kit import decode
from common import peak_rss_gb

args = json.loads({args!r})
quantize = args["dtype"] if args["dtype"] in ("int8", "int4") else None  # bf16 + int weights
model = pk.load(args["path"], dtype="bfloat16" if quantize else args["dtype"], quantize=quantize,
                verbose=False, **args["overrides"])
model.tokenizer = pk.Tokenizer.demo() if model.tokenizer is None else model.tokenizer
res = model.resolution
image = np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)
enc = model.tokenizer.encode_prompts([args["prompt"]], bucket=None)
pixels = model.preprocess(image)

def run_once():
    stamps = []
    t = time.perf_counter()
    it = decode.iter_tokens(model.config, model.run_params, pixels, enc["text"], enc["mask_input"],
                            max_new_tokens=args["new_tokens"], logit_mask=args_mask)
    for _ in it:
        stamps.append(time.perf_counter())
    return t, stamps

vocab = model.config.llm.vocab_size
args_mask = np.ones(vocab, bool); args_mask[decode.EOS_ID] = False  # never stop early
t, stamps = run_once()
ttft_cold = stamps[0] - T0
compiles_first = decode.compile_count()
mapped = ".weights" in open("/proc/self/maps").read() if sys.platform == "linux" else None
if args.get("only_cold"):
    print("RESULT " + json.dumps(dict(ttft_cold=ttft_cold, peak_rss=peak_rss_gb(), mapped=mapped)))
    sys.exit(0)
from pali_kit import weights_cache
weights_cache.wait()  # a weights cache being written: done before the steady-state timings
# steady state
ttfts, steps = [], []
for _ in range(2):
    t, stamps = run_once()
    ttfts.append(stamps[0] - t)
    steps += list(np.diff(stamps))
embed = jax.jit(lambda p, x: pk.model.PaliGemma(model.config).apply({{"params": p}}, x, method="embed_image"))
embed(model.run_params, pixels).block_until_ready()
enc_times = []
for _ in range(3):
    t = time.perf_counter(); embed(model.run_params, pixels).block_until_ready(); enc_times.append(time.perf_counter() - t)

peak_rss = peak_rss_gb()  # before the floors: their 1 GiB probe array would count
# floors, measured here
dev = jax.devices()[0]
big = jnp.ones((1 << 28,), jnp.float32) if dev.platform == "cpu" else jnp.ones((1 << 30,), jnp.float32)
rd = jax.jit(lambda a: jnp.sum(a)); rd(big).block_until_ready()
bw = []
for _ in range(5):
    t = time.perf_counter(); rd(big).block_until_ready(); bw.append(big.nbytes / (time.perf_counter() - t))
bandwidth = max(bw)
# sizes from the shapes: model.params may be rebuilt on access (CPU layout, bf16)
wdt = jnp.dtype("bfloat16" if quantize else args["dtype"] or "float32")
shapes = pk.param_shapes(model.config)
llm = jax.tree.leaves(shapes["llm"])
llm_bytes = sum(x.size for x in llm) * wdt.itemsize
if quantize:  # bytes held: integer values, float32 scales, float norms
    llm_bytes = pk.quant.tree_nbytes(model.params["llm"])
m, k, n = 512, model.config.llm.width, model.config.llm.mlp_dim
a = jnp.ones((m, k), jnp.float32); w = jnp.ones((k, n), wdt)
mmf = jax.jit(lambda a, w: pk.model.common.mm("mk,kn->mn", a, w)); mmf(a, w).block_until_ready()
rates = []
for _ in range(5):
    t = time.perf_counter(); mmf(a, w).block_until_ready(); rates.append(2 * m * k * n / (time.perf_counter() - t))
rate = max(rates)
n_img = model.config.vision.num_tokens
text_len = int(enc["mask_input"].sum())
img_params = sum(x.size for x in jax.tree.leaves(shapes["img"]))
emb_params = shapes["llm"]["embedder"]["input_embedding"].size
llm_params = sum(x.size for x in llm) - emb_params
prefill_flops = 2 * img_params * n_img + 2 * llm_params * (n_img + text_len) + 2 * emb_params
print("RESULT " + json.dumps(dict(
    ttft_cold=ttft_cold, ttft=min(ttfts), encode=statistics.median(enc_times),
    decode=statistics.median(steps), compiles_first=compiles_first,
    compiles_after=decode.compile_count() - compiles_first, peak_rss=peak_rss,
    bandwidth=bandwidth, decode_floor=llm_bytes / bandwidth, matmul_rate=rate,
    prefill_floor=prefill_flops / rate, device=str(dev.device_kind),
    params=sum(x.size for x in jax.tree.leaves(shapes)), weight_bytes=pk.quant.tree_nbytes(model.params) if quantize else model.num_params() * wdt.itemsize,
)))
"""

HF_CHILD = r"""
import json, statistics, sys, time
T0 = time.perf_counter()
sys.path.insert(0, {here!r})
import numpy as np
import torch
from transformers import PaliGemmaForConditionalGeneration, LogitsProcessor
from common import peak_rss_gb

args = json.loads({args!r})
dtype = {{"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}}[args["dtype"] or "float32"]
device = "cuda" if torch.cuda.is_available() else "cpu"
model = PaliGemmaForConditionalGeneration.from_pretrained(args["folder"], dtype=dtype).to(device).eval()
cfg = model.config
res = cfg.vision_config.image_size
n_img = (res // cfg.vision_config.patch_size) ** 2
ids = [cfg.image_token_index] * n_img + args["prompt_ids"]
input_ids = torch.tensor([ids], device=device)
token_type_ids = torch.zeros_like(input_ids)
pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, res, res)).astype(np.float32)).to(device, dtype)

class Stamp(LogitsProcessor):
    def __init__(self): self.t = []
    def __call__(self, input_ids, scores):
        if device == "cuda": torch.cuda.synchronize()
        self.t.append(time.perf_counter()); return scores

def run_once():
    s = Stamp()
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, pixel_values=pixels, token_type_ids=token_type_ids,
                       attention_mask=torch.ones_like(input_ids), max_new_tokens=args["new_tokens"],
                       min_new_tokens=args["new_tokens"], do_sample=False, logits_processor=[s])
    return t, s.t

t, stamps = run_once()
ttft_cold = stamps[0] - T0
ttfts, steps = [], []
for _ in range(2):
    t, stamps = run_once()
    ttfts.append(stamps[0] - t)
    steps += list(np.diff(stamps))
with torch.inference_mode():
    enc = []
    for _ in range(3):
        t = time.perf_counter(); model.get_image_features(pixels); enc.append(time.perf_counter() - t)
print("RESULT " + json.dumps(dict(ttft_cold=ttft_cold, ttft=min(ttfts), encode=statistics.median(enc),
                                  decode=statistics.median(steps), peak_rss=peak_rss_gb(),
                                  attn=str(model.config._attn_implementation))))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated: float32, bfloat16, int8, int4 (bf16 + quantized matrices)",
    )
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--llm-depth", type=int, default=None, help="shallower model, to test the script"
    )
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = ap.parse_args()

    import pali_kit as pk

    # One set of random weights, stored in bf16; the f32 runs upcast the same values.
    source = random_checkpoint(args.name, "bfloat16")
    overrides = {}
    if args.llm_depth:
        source = _shallow(source, args.llm_depth)
    tok = pk.Tokenizer.demo()
    prompt_ids = [tok.bos_id] + tok.encode(PROMPT) + list(tok.newline_ids)
    hf_folder = None
    if not args.skip_hf:
        hf_folder = source.with_suffix(".hf")
        if not hf_folder.exists():
            print(f"exporting {hf_folder} for transformers ...", flush=True)
            # in a child process: this one should not hold the weights during the runs
            code = "import pali_kit as pk; pk.export_hf(pk.load({!r}, verbose=False), {!r})"
            subprocess.run(
                [sys.executable, "-c", code.format(str(source), str(hf_folder))], check=True
            )

    rows = []
    for dtype in args.dtypes.split(","):
        spec = dict(path=str(source), dtype=dtype, overrides=overrides, prompt=PROMPT,
                    new_tokens=args.new_tokens)  # fmt: skip
        # A fresh persistent compilation cache: the first process starts with it
        # empty, a second one (cold process, warm cache) only measures its first token.
        # And a new weights cache (pk.load's default keeps one; only half-precision
        # weights read as stored use it, so not the float32 or quantized runs).
        weights = tempfile.mkdtemp(prefix="weights_cache_", dir=source.parent)
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="pk_cache_"),
                   PALI_KIT_WEIGHTS_CACHE=weights)  # fmt: skip
        # every cold process reads its weights from the page cache, not the disk
        warm_page_cache(source)
        kit = child_result(KIT_CHILD.format(here=str(HERE), args=json.dumps(spec)), env)
        warm_page_cache(source)
        warm = child_result(
            KIT_CHILD.format(here=str(HERE), args=json.dumps({**spec, "only_cold": 1})), env
        )
        kit["ttft_cold_warm_cache"] = warm["ttft_cold"]
        kit["warm_cache_mapped"] = warm["mapped"]
        shutil.rmtree(weights, ignore_errors=True)
        hf = None
        if hf_folder is not None and dtype not in ("int8", "int4"):  # no CPU int8 in transformers
            hspec = dict(folder=str(hf_folder), dtype=dtype, prompt_ids=prompt_ids,
                         new_tokens=args.new_tokens)  # fmt: skip
            warm_page_cache(hf_folder)
            hf = child_result(HF_CHILD.format(here=str(HERE), args=json.dumps(hspec)))
        rows.append(_row(dtype, kit, hf))
        print(json.dumps({"dtype": dtype, "kit": kit, "hf": hf}), flush=True)
    table(rows, f"{args.name} ({'random weights'}), {len(prompt_ids)} prompt tokens, "
                f"{args.new_tokens} new tokens, device: {rows[0]['device']}, "
                f"avx512_bf16: {_cpu_flag('avx512_bf16')}")  # fmt: skip


def _cpu_flag(name: str) -> str:
    """Whether /proc/cpuinfo lists a CPU flag ('n/a' where there is no such file)."""
    try:
        return "yes" if name in Path("/proc/cpuinfo").read_text().split() else "no"
    except OSError:
        return "n/a"


def _row(dtype, kit, hf):
    def ratio(a, b):
        return f"{a / b:.2f}x" if b else "-"

    return {
        "dtype": dtype,
        "device": kit["device"],
        "encode s": f"{kit['encode']:.2f}" + (f" (hf {hf['encode']:.2f})" if hf else ""),
        "prefill->1st tok s": f"{kit['ttft']:.2f}" + (f" (hf {hf['ttft']:.2f})" if hf else ""),
        "prefill floor s": f"{kit['prefill_floor']:.2f}",
        "prefill/floor": ratio(kit["ttft"], kit["prefill_floor"]),
        "decode s/tok": f"{kit['decode']:.3f}" + (f" (hf {hf['decode']:.3f})" if hf else ""),
        "decode floor": f"{kit['decode_floor']:.3f}",
        "decode/floor": ratio(kit["decode"], kit["decode_floor"]),
        "vs hf decode": ratio(hf["decode"], kit["decode"]) if hf else "-",
        "cold TTFT s (empty cache)": f"{kit['ttft_cold']:.1f}"
        + (f" (hf {hf['ttft_cold']:.1f})" if hf else ""),
        "cold TTFT s (warm cache)": f"{kit['ttft_cold_warm_cache']:.1f}"
        + (" (weights mapped)" if kit.get("warm_cache_mapped") else ""),
        "compiles": f"{kit['compiles_first']} (+{kit['compiles_after']})",
        "peak RSS GB": f"{kit['peak_rss']:.1f}" + (f" (hf {hf['peak_rss']:.1f})" if hf else ""),
        "RSS / weights": ratio(kit["peak_rss"] * 1e9, kit["weight_bytes"])
        + (f" (hf {hf['peak_rss'] * 1e9 / kit['weight_bytes']:.2f}x)" if hf else ""),
        "GB/s": f"{kit['bandwidth'] / 1e9:.0f}",
        "GFLOP/s": f"{kit['matmul_rate'] / 1e9:.0f}",
    }


def _shallow(source: Path, depth: int) -> Path:
    """The same random weights with only the first ``depth`` LLM layers (script testing)."""
    from pali_kit.checkpoints import iter_arrays, save_arrays

    out = BENCH_DIR / f"{source.stem}.depth{depth}.npz"
    if not out.exists():
        items = (
            (k, a[:depth] if k.startswith("llm/layers/") else a) for k, a in iter_arrays(source)
        )
        save_arrays(items, out)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
