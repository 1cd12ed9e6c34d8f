"""Where one generated token's time goes in ``decode.iter_tokens``, one model per process.

    python bench/decode_loop.py --dtype int4 [--tokens 24] [--rounds 3]

Full-size random PaliGemma 2 3B-224 weights, loaded as ``bench/generate.py``'s
child loads them (one model in the process). Per token (medians over the rounds):

- ``token``: ``decode.iter_tokens`` as it is (the generate benchmark's loop);
- ``call``: the compiled step-and-sample call until it returns (dispatch, and
  the run itself where XLA:CPU runs it in the calling thread);
- ``wait``: from there until the token is on the host;
- ``step``: the compiled step alone (``block_until_ready``), its calls alternating
  token by token with those of the loop's call (``call`` and ``wait``);
- ``same, jnp.argmax``: call + wait of the same call compiled with greedy's token
  taken by ``jnp.argmax`` (as ``decode.sample`` did before ``decode.first_max``), its
  calls alternating with the others;
- ``flatten``: flattening the step's arguments (``jax.tree.flatten``), and
  ``leaves``: how many arrays the step takes.
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
from common import random_checkpoint, table  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="paligemma2-3b-pt-224")
    ap.add_argument("--dtype", default="int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import pali_kit as pk
    from pali_kit import decode

    quantize = args.dtype if args.dtype in ("int8", "int4") else None
    model = pk.load(random_checkpoint(args.name, "bfloat16"), dtype="bfloat16",
                    quantize=quantize, verbose=False)  # fmt: skip
    tok = pk.Tokenizer.demo()
    enc = tok.encode_prompts(["answer en what is in the picture"], bucket=None)
    res = model.resolution
    image = np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8)
    pixels = model.preprocess(image)
    cfg = model.config
    mask = np.ones(cfg.llm.vocab_size, bool)
    mask[decode.EOS_ID] = False  # never stop early
    run = model.run_params
    llm = decode._step_params(run)
    n = args.tokens

    def by_kit():
        stamps = []
        for _ in decode.iter_tokens(cfg, run, pixels, enc["text"], enc["mask_input"],
                                    max_new_tokens=n, logit_mask=mask):  # fmt: skip
            stamps.append(time.perf_counter())
        return list(np.diff(stamps))

    def split():
        """The loop of iter_tokens, timed in parts; its calls alternate, token by token,
        with calls of the step alone (the same cache), so that both see the same machine."""
        tt = decode.bucket_length(enc["text"].shape[1])
        size = decode.bucket_cache(cfg.vision.num_tokens, tt, n)
        prefill, step, sas = decode._jitted(cfg, size, "float32", decode.cache_form(run))
        text = np.pad(enc["text"], ((0, 0), (0, tt - enc["text"].shape[1])))
        m = np.pad(enc["mask_input"], ((0, 0), (0, tt - enc["text"].shape[1])))
        logits, cache, valid, pos = prefill(run, np.asarray(pixels)[None], text, m)
        slot = cfg.vision.num_tokens + tt
        sampler = decode.parse_sampler("greedy")
        choose, fn = decode._sampler_fn(sampler), sas(sampler)
        rng, done, jm = jax.random.key(0), np.zeros(1, bool), jnp.asarray(mask)
        t_, logp, done = choose(logits, rng, jnp.int32(0), done, jm)
        calls, waits, steps, before = [], [], [], []
        for i in range(1, n):  # n - 1 slots: the cache holds n new tokens
            a = time.perf_counter()
            if i % 3 == 0:  # the same call, greedy by jnp.argmax (as before decode.first_max)
                t_, logp, done, cache, valid = with_argmax(llm, t_, cache, valid, pos + (i - 1),
                                                          jnp.int32(slot + i - 1), rng,
                                                          jnp.int32(i), done, jm)  # fmt: skip
                np.asarray(t_), np.asarray(logp), bool(np.all(np.asarray(done)))
                before.append(time.perf_counter() - a)
            elif i % 3 == 1:
                t_, logp, done, cache, valid = fn(llm, t_, cache, valid, pos + (i - 1),
                                                  jnp.int32(slot + i - 1), rng, jnp.int32(i),
                                                  done, jm)  # fmt: skip
                b = time.perf_counter()
                np.asarray(t_), np.asarray(logp), bool(np.all(np.asarray(done)))
                calls.append(b - a)
                waits.append(time.perf_counter() - b)
            else:
                logits, cache, valid = step(llm, t_, cache, valid, pos + (i - 1),
                                            jnp.int32(slot + i - 1))  # fmt: skip
                logits.block_until_ready()
                steps.append(time.perf_counter() - a)
        fl = []
        for _ in range(20):
            a = time.perf_counter()
            jax.tree.flatten(llm)
            fl.append(time.perf_counter() - a)
        return statistics.median(calls), statistics.median(waits), statistics.median(steps), \
            statistics.median(fl), statistics.median(before)  # fmt: skip

    # the step-and-sample call compiled afresh with greedy = jnp.argmax (decode.sample before)
    tt = decode.bucket_length(enc["text"].shape[1])
    size = decode.bucket_cache(cfg.vision.num_tokens, tt, n)
    fresh = decode._jitted.__wrapped__(cfg, size, "float32", decode.cache_form(run))[2]
    argmax_fn = fresh(decode.parse_sampler("greedy")).jitted

    def with_argmax(*call_args):
        if argmax_fn._cache_size():
            return argmax_fn(*call_args)
        first_max = decode.first_max  # traced (on the first call) with jnp.argmax instead
        decode.first_max = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
        try:
            return argmax_fn(*call_args)
        finally:
            decode.first_max = first_max

    tokens, parts = [], []
    for r in range(args.rounds + 1):  # round 0 compiles
        dts, p = by_kit(), split()
        if r:
            tokens += dts
            parts.append(p)
    call, wait, step, flat, old = (statistics.median(p[k] for p in parts) for k in range(5))
    table([{"weights": args.dtype, "token ms": f"{1e3 * statistics.median(tokens):.1f}",
            "call ms": f"{1e3 * call:.2f}", "wait ms": f"{1e3 * wait:.1f}",
            "call+wait ms": f"{1e3 * (call + wait):.1f}",
            "same, jnp.argmax ms": f"{1e3 * old:.1f}",
            "step ms": f"{1e3 * step:.1f}", "flatten ms": f"{1e3 * flat:.2f}",
            "leaves": len(jax.tree.leaves(llm))}])  # fmt: skip


if __name__ == "__main__":
    main()
