"""Prefill and decode speed with the C heap's arenas capped (``pk.load``'s default)
or left at glibc's default, in alternating fresh processes (each first in turn).

    python bench/arenas_speed.py --name paligemma2-3b-pt-224 --rounds 3

Each process loads the bfloat16 model (one compilation cache shared by all, so
only the first compiles), generates 24 tokens four times and reports the median
prefill and per-token decode of the last three.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import BF16_PROMPT_SETUP, child_result, random_checkpoint, table, warm_page_cache  # noqa: E402

CHILD = (
    r"""
import json, statistics, sys, time
import numpy as np
import pali_kit as pk
from pali_kit import decode
"""
    + BF16_PROMPT_SETUP
    + """
prefill, steps = [], []
for r in range(4):
    t, stamps = time.perf_counter(), []
    for _ in decode.iter_tokens(model.config, model.run_params, pixels, enc["text"],
                                enc["mask_input"], max_new_tokens=24, logit_mask=mask):
        stamps.append(time.perf_counter())
    if r:
        prefill.append(stamps[0] - t)
        steps += list(np.diff(stamps))
print("RESULT " + json.dumps(dict(prefill=statistics.median(prefill),
                                  decode=statistics.median(steps))))
"""
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma2-3b-pt-224")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    source = random_checkpoint(args.name, "bfloat16")
    default_arenas = str(8 * (os.cpu_count() or 1))  # glibc's default on 64-bit
    cache = tempfile.mkdtemp(prefix="pk_cache_")
    rows = []
    for r in range(args.rounds):
        pair = [("capped (kit)", {}),
                (f"glibc default ({default_arenas})", {"MALLOC_ARENA_MAX": default_arenas})]  # fmt: skip
        for label, extra in pair[:: 1 if r % 2 == 0 else -1]:  # each goes first in turn
            warm_page_cache(source)
            env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, **extra)
            res = child_result(CHILD.format(path=str(source)), env)
            rows.append({"round": r + 1, "heap arenas": label, "prefill s": f"{res['prefill']:.3f}",
                         "decode s/token": f"{res['decode']:.4f}"})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    table(rows, f"{args.name}, bfloat16, alternating processes")


if __name__ == "__main__":
    main()
