"""Where a CPU decode step's time goes outside the weight products, bf16 and int4.

    python bench/decode_step.py [--rounds 3] [--tokens 24]

One process, full-size random PaliGemma 2 3B-224 weights (``common.random_checkpoint``),
the bfloat16 and int4 models both in memory (~9 GB: run it alone). For each
model and each variant (``before``: the official ``gemma.KVCache`` [B, S, K, H]
and a sampler call after each step call, as the kit decoded before;
``head-major cache``: the CPU layout's ``model.cpu.HeadMajorCache`` instead;
``after``: that cache and the sampler inside the step), in interleaved rounds so
that a change in the machine's load affects all alike, it times:

- ``token``: one generated token (median over the tokens): ``before`` and
  ``head-major cache`` in the loop ``decode.iter_tokens`` ran before the step
  sampled (a step call, then a sampler call), ``after`` in ``decode.iter_tokens``
  as it is (one call per token: the step samples);
- ``step``: the compiled one-token step alone, called back to back;
- ``sampler``: the compiled greedy sampler alone (``decode._sampler_fn``);
- ``rest``: token - step - sampler (dispatch and the loop's own work).

It also checks that every variant gives the same greedy tokens.
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
    variants = {  # name: (cache form, the step samples in the same compiled call)
        "before": (KVCache, False),
        "head-major cache": (HeadMajorCache, False),
        "after": (HeadMajorCache, True),
    }

    def inputs(model):
        res = model.resolution
        image = np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)
        pixels = np.asarray(model.preprocess(image), np.float32).reshape(1, res, res, 3)
        mask = np.ones(model.config.llm.vocab_size, bool)
        mask[decode.EOS_ID] = False  # never stop early
        return pixels, mask

    def prefilled(model, form, n):
        """The prefill of the prompt (cache form ``form``, room for ``n`` tokens), and the
        step: ``(step, logits, cache, valid, pos, first slot, mask)``."""
        cfg = model.config
        pixels, mask = inputs(model)
        tt = decode.bucket_length(enc["text"].shape[1])
        size = decode.bucket_cache(cfg.vision.num_tokens, tt, n)
        prefill, step, _ = decode._jitted(cfg, size, "float32", form)
        text = np.pad(enc["text"], ((0, 0), (0, tt - enc["text"].shape[1])))
        m = np.pad(enc["mask_input"], ((0, 0), (0, tt - enc["text"].shape[1])))
        logits, cache, valid, pos = prefill(model.run_params, pixels, text, m)
        return step, logits, cache, valid, pos, cfg.vision.num_tokens + tt, mask

    def tokens_by_loop(model, form, n):
        """``decode.iter_tokens`` as it was: a step call, then a sampler call, per token."""
        step, logits, cache, valid, pos, slot, mask = prefilled(model, form, n)
        choose = decode._sampler_fn(decode.parse_sampler("greedy"))
        rng, done, jmask = jax.random.key(0), np.zeros(1, bool), jnp.asarray(mask)
        stamps, tokens, tok_ = [], [], None
        for i in range(n):
            if i > 0:
                logits, cache, valid = step(model.run_params, tok_, cache, valid, pos + (i - 1),
                                            jnp.int32(slot + i - 1))  # fmt: skip
            tok_, logp, done = choose(logits, rng, jnp.int32(i), done, jmask)
            tokens.append(int(np.asarray(tok_)[0]))
            np.asarray(logp)
            bool(np.all(np.asarray(done)))
            stamps.append(time.perf_counter())
        return list(np.diff(stamps)), tokens

    def tokens_by_kit(model, n):
        """``decode.iter_tokens`` now."""
        pixels, mask = inputs(model)
        stamps, tokens = [], []
        for t, _ in decode.iter_tokens(model.config, model.run_params, pixels, enc["text"],
                                       enc["mask_input"], max_new_tokens=n, logit_mask=mask):  # fmt: skip
            stamps.append(time.perf_counter())
            tokens.append(int(t[0]))
        return list(np.diff(stamps)), tokens

    def parts(model, form, n):
        """The compiled step alone and the sampler alone, s per call (medians)."""
        step, logits, cache, valid, pos, slot, mask = prefilled(model, form, n)
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

    times = {(d, v): {"token": [], "step": [], "sampler": []} for d in models for v in variants}
    tokens = {}
    for _ in range(args.rounds):
        for dt, model in models.items():
            for name, (form, fused) in variants.items():
                if fused:
                    tokens_by_kit(model, 3)  # compile
                    dts, tokens[dt, name] = tokens_by_kit(model, args.tokens)
                else:
                    tokens_by_loop(model, form, 3)
                    dts, tokens[dt, name] = tokens_by_loop(model, form, args.tokens)
                    s, c = parts(model, form, args.tokens)
                    times[dt, name]["step"].append(s)
                    times[dt, name]["sampler"].append(c)
                times[dt, name]["token"] += dts
    rows, med = [], {}
    for (dt, name), t in times.items():
        m = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
        med[dt, name] = m
        row = {"weights": dt, "decode": name, "token ms": f"{1e3 * m['token']:.1f}",
               "step ms": f"{1e3 * m['step']:.1f}", "sampler ms": f"{1e3 * m['sampler']:.1f}",
               "rest ms": f"{1e3 * (m['token'] - m['step'] - m['sampler']):.1f}"}  # fmt: skip
        if "bfloat16" in models:
            row["token vs bf16"] = f"{m['token'] / med.get(('bfloat16', name), m)['token']:.3f}x"
        rows.append(row)
    table(rows)
    for dt in models:
        same = len({tuple(tokens[dt, v]) for v in variants}) == 1
        print(f"{dt}: greedy tokens identical in every variant: {same}")


if __name__ == "__main__":
    main()
