"""Where a CPU decode step's time goes outside the weight products, bf16 and int4.

    python bench/decode_step.py [--rounds 3] [--tokens 24]

One process, full-size random PaliGemma 2 3B-224 weights (``common.random_checkpoint``),
the bfloat16 and int4 models both in memory (~9 GB: run it alone). For each
model and each KV-cache form (``official``: ``gemma.KVCache`` [B, S, K, H], as
the kit decoded before ``model.cpu.HeadMajorCache``; ``head-major``: the CPU
layout's cache), in interleaved rounds so that a change in the machine's load
affects all alike, it times:

- ``token``: one generated token in ``decode.iter_tokens`` (step + sampler + the
  Python loop), the median over the tokens;
- ``step``: the compiled one-token step alone, called back to back;
- ``sampler``: the compiled greedy sampler alone (``decode._sampler_fn``);
- ``loop``: token - step - sampler (dispatch and the loop's own work).

It also checks that both cache forms give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import random_checkpoint, table  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="paligemma2-3b-pt-224")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--dtypes", default="bfloat16,int4")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import pali_kit as pk
    from pali_kit import decode
    from pali_kit.model import KVCache
    from pali_kit.model.cpu import HeadMajorCache

    path = random_checkpoint(args.name, "bfloat16")
    models = {}
    for dt in args.dtypes.split(","):
        quantize = dt if dt in ("int8", "int4") else None
        models[dt] = pk.load(path, dtype="bfloat16", quantize=quantize, verbose=False)
    tok = pk.Tokenizer.demo()
    enc = tok.encode_prompts(["caption en"], bucket=None)
    forms = {"official": KVCache, "head-major": HeadMajorCache}
    chosen = decode.cache_form

    def run(model, form, n):
        decode.cache_form = lambda params: form  # the form iter_tokens compiles for
        try:
            res = model.resolution
            image = np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)
            pixels = model.preprocess(image)
            mask = np.ones(model.config.llm.vocab_size, bool)
            mask[decode.EOS_ID] = False  # never stop early
            stamps, tokens = [], []
            steps = decode.iter_tokens(model.config, model.run_params, pixels, enc["text"],
                                       enc["mask_input"], max_new_tokens=n, logit_mask=mask)  # fmt: skip
            for t, _ in steps:
                stamps.append(time.perf_counter())
                tokens.append(int(t[0]))
            return list(np.diff(stamps)), tokens, (pixels, mask)
        finally:
            decode.cache_form = chosen

    def parts(model, form, pixels, mask, n):
        """The compiled step alone and the sampler alone, s per call (medians)."""
        cfg = model.config
        tt = decode.bucket_length(enc["text"].shape[1])
        size = decode.bucket_cache(cfg.vision.num_tokens, tt, args.tokens)
        prefill, step = decode._jitted(cfg, size, "float32", form)
        text = np.pad(enc["text"], ((0, 0), (0, tt - enc["text"].shape[1])))
        m = np.pad(enc["mask_input"], ((0, 0), (0, tt - enc["text"].shape[1])))
        images = np.asarray(pixels, np.float32).reshape(1, *np.shape(pixels)[-3:])
        logits, cache, valid, pos = prefill(model.run_params, images, text, m)
        slot = cfg.vision.num_tokens + tt
        tok_ = jnp.zeros((1,), jnp.int32)
        step_t = []
        for i in range(n):
            t = time.perf_counter()
            logits, cache, valid = step(model.run_params, tok_, cache, valid, pos + i,
                                        jnp.int32(slot + i))  # fmt: skip
            logits.block_until_ready()
            step_t.append(time.perf_counter() - t)
        choose = decode._sampler_fn(decode.parse_sampler("greedy"))
        rng, done, jmask = jax.random.key(0), np.zeros(1, bool), jnp.asarray(mask)
        sample_t = []
        for i in range(n):
            t = time.perf_counter()
            out = choose(logits, rng, jnp.int32(i), done, jmask)
            np.asarray(out[0])
            sample_t.append(time.perf_counter() - t)
        return statistics.median(step_t), statistics.median(sample_t)

    times = {(d, f): {"token": [], "step": [], "sampler": []} for d in models for f in forms}
    tokens = {}
    for _ in range(args.rounds):
        for dt, model in models.items():
            for fname, form in forms.items():
                run(model, form, 3)  # compile
                dts, tokens[dt, fname], (pixels, mask) = run(model, form, args.tokens)
                s, c = parts(model, form, pixels, mask, args.tokens)
                times[dt, fname]["token"] += dts
                times[dt, fname]["step"].append(s)
                times[dt, fname]["sampler"].append(c)
    rows, med = [], {}
    for (dt, fname), t in times.items():
        m = {k: statistics.median(v) for k, v in t.items()}
        m["loop"] = m["token"] - m["step"] - m["sampler"]
        med[dt, fname] = m
        rows.append({"weights": dt, "cache": fname,
                     **{f"{k} ms": f"{1e3 * m[k]:.1f}" for k in ("token", "step", "sampler", "loop")}})  # fmt: skip
    dts = list(models)
    if "bfloat16" in models:
        for dt in dts:
            for fname in forms:
                ratio = med[dt, fname]["token"] / med["bfloat16", fname]["token"]
                next(r for r in rows if r["weights"] == dt and r["cache"] == fname)[
                    "token vs bf16"
                ] = f"{ratio:.3f}x"
    table(rows)
    for dt in dts:
        same = tokens[dt, "official"] == tokens[dt, "head-major"]
        print(f"{dt}: greedy tokens identical across cache forms: {same}")


if __name__ == "__main__":
    main()
