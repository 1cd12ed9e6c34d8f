"""The kit from two source trees, in alternating fresh processes: did a change regress?

    python bench/before_after.py OLD_TREE NEW_TREE [--rounds 2] [--dtype bfloat16]

Each process imports ``pali_kit`` from its tree, loads the random 3B checkpoint,
and prints its cold start (each tree has its own compilation cache, empty in
the first round), prefill to first token (best of 2), median decode step and
image encode, and peak RSS. On a shared machine compare the pairs of a round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import random_checkpoint, table  # noqa: E402

CHILD = r"""
import json, statistics, sys, time
T0 = time.perf_counter()
sys.path.insert(0, {here!r})
import numpy as np, jax
import pali_kit as pk
from pali_kit import decode
from pali_kit.model import PaliGemma
from common import peak_rss_gb

model = pk.load({path!r}, dtype={dtype!r}, verbose=False)
run = model.run_params
tok = pk.Tokenizer.demo()
image = np.random.default_rng(0).integers(0, 255, (model.resolution,) * 2 + (3,), dtype=np.uint8)
enc = tok.encode_prompts(["answer en what is in the picture"], bucket=None)
pixels = model.preprocess(image)
mask = np.ones(model.config.llm.vocab_size, bool)
mask[decode.EOS_ID] = False  # never stop early

def once(n):
    stamps, t = [], time.perf_counter()
    for _ in decode.iter_tokens(model.config, run, pixels, enc["text"], enc["mask_input"],
                                max_new_tokens=n, logit_mask=mask):
        stamps.append(time.perf_counter())
    return stamps[0] - t, list(np.diff(stamps))

once(2)
cold = time.perf_counter() - T0
ttfts, steps = [], []
for _ in range(2):
    first, rest = once(12)
    ttfts.append(first)
    steps += rest
embed = jax.jit(lambda p, x: PaliGemma(model.config).apply({{"params": p}}, x, method="embed_image"))
embed(run, pixels).block_until_ready()
times = []
for _ in range(3):
    t = time.perf_counter()
    embed(run, pixels).block_until_ready()
    times.append(time.perf_counter() - t)
print("RESULT " + json.dumps(dict(cold=cold, prefill=min(ttfts), decode=statistics.median(steps),
                                  encode=statistics.median(times), peak_rss=peak_rss_gb())))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs=2, help="two source trees (folders holding pali_kit/)")
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = random_checkpoint(args.name, "bfloat16")
    caches = {tree: tempfile.mkdtemp(prefix="pk_cache_") for tree in args.trees}
    code = CHILD.format(here=str(HERE), path=str(path), dtype=args.dtype)
    rows = []
    for round_ in range(1, args.rounds + 1):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=tree, JAX_COMPILATION_CACHE_DIR=caches[tree])
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=env, cwd=tree)  # fmt: skip
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            r = json.loads(line[0][len("RESULT ") :])
            rows.append({"round": round_, "tree": tree, "cold s": f"{r['cold']:.1f}",
                         "prefill s": f"{r['prefill']:.2f}", "decode s/tok": f"{r['decode']:.3f}",
                         "encode s": f"{r['encode']:.2f}", "peak RSS GB": f"{r['peak_rss']:.2f}"})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    table(rows, f"{args.name}, {args.dtype}: old and new tree, alternating")


if __name__ == "__main__":
    main()
