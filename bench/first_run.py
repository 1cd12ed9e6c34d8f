"""A compiled program's first run: how much slower than its second, and why.

    python bench/first_run.py [--trees TREE ...] [--rounds 2] [--name paligemma-3b-pt-224]

XLA:CPU hands matrix products (and some reductions) to a kernel library whose
kernels are built the first time the program runs, one per product in the
program: the first generation after a load pays for all of them. Per source
tree (default: this one), fresh processes with that tree's own compilation
cache (warmed by one process first) load the random bf16 checkpoint, wait for
the compile ahead, then time the same first token (prefill and greedy choice)
twice: the first call (kernels built) and the second (kernels reused). Each
process also counts the library kernels (``kind`` ``__ynn_fusion`` or
``__xnn_fusion`` in the compiled prefill) and the products (``dot`` ops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import child_result, random_checkpoint, table, warm_page_cache  # noqa: E402

CHILD = r"""
import json, re, sys, time
import numpy as np, jax, jax.numpy as jnp
import pali_kit as pk
from pali_kit import decode

model = pk.load({path!r}, dtype="bfloat16", verbose=False)
run = model.run_params
model._compiled_ahead.result()  # compiled (or fetched) on its thread while loading
tok = pk.Tokenizer.demo()
image = np.random.default_rng(0).integers(0, 255, (model.resolution,) * 2 + (3,), dtype=np.uint8)
enc = tok.encode_prompts(["answer en what is in the picture"], bucket=None)
pixels = model.preprocess(image)
seconds = []
for _ in range(2):
    t = time.perf_counter()
    next(decode.iter_tokens(model.config, run, pixels, enc["text"], enc["mask_input"],
                            max_new_tokens=1))
    seconds.append(time.perf_counter() - t)
# the prefill's compiled text (the compilation cache holds it: fetched, not compiled)
bb, tt, r = decode.bucket_batch(1), decode.bucket_length(enc["text"].shape[1]), model.resolution
size = decode.bucket_cache(model.config.vision.num_tokens, tt, 64)
prefill = decode._jitted(model.config, size, "float32", decode.cache_form(run))[0]
shapes = (jax.ShapeDtypeStruct((bb, r, r, 3), jnp.float32), jax.ShapeDtypeStruct((bb, tt), jnp.int32),
          jax.ShapeDtypeStruct((bb, tt), bool))
hlo = prefill.jitted.lower(run, *shapes).compile().as_text()
kernels = len(re.findall(r'"kind":"__[xy]nn_fusion"', hlo))
dots = len(re.findall(r"= \S+ dot\(", hlo))
print("RESULT " + json.dumps(dict(first=seconds[0], second=seconds[1], kernels=kernels, dots=dots)))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", nargs="+", default=[str(HERE.parent)])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    args = ap.parse_args()
    path = random_checkpoint(args.name, "bfloat16")
    code = CHILD.format(path=str(path))
    caches = {t: tempfile.mkdtemp(prefix="pk_cache_") for t in args.trees}
    rows, firsts = [], {t: [] for t in args.trees}
    for r in range(args.rounds + 1):  # round 0 fills each tree's cache
        for tree in args.trees:
            warm_page_cache(path)
            env = dict(os.environ, PYTHONPATH=tree, JAX_COMPILATION_CACHE_DIR=caches[tree])
            res = child_result(code, env, cwd=tree)
            if r == 0:
                continue
            firsts[tree].append(res["first"] - res["second"])
            rows.append({"round": r, "tree": tree, "library kernels": res["kernels"],
                         "dots": res["dots"], "first call s": f"{res['first']:.2f}",
                         "second call s": f"{res['second']:.2f}",
                         "first - second s": f"{res['first'] - res['second']:.2f}"})  # fmt: skip
            print(rows[-1], flush=True)
    table(rows, f"{args.name}, bfloat16: the first token's first and second call, warm cache")
    for tree, extra in firsts.items():
        print(f"{tree}: the first call's extra seconds, median {statistics.median(extra):.2f}")


if __name__ == "__main__":
    main()
