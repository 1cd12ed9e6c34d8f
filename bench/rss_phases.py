"""Where a bfloat16 process's peak resident memory comes from, phase by phase.

    python bench/rss_phases.py                                  # PaliGemma 3B-224
    python bench/rss_phases.py --name paligemma2-3b-pt-224 --rounds 2

Each process (fresh, with an empty persistent compilation cache, as in
``bench/generate.py``'s first process) loads the model and generates 24 tokens
three times, then encodes an image; a thread samples VmRSS / RssAnon / RssFile
every 10 ms. Per phase: the largest RSS seen, its anonymous and file-backed
parts, and the peak so far (VmHWM), all in GB; then the peak over the weights'
bytes. The process then drops every compiled program and prints how much
memory that frees (what the programs and their kernels' state hold).

Rounds alternate the kit as it is with the C heap's arenas left at glibc's
default (``MALLOC_ARENA_MAX`` = 8 per core, which ``pk.load`` then leaves alone).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import BF16_PROMPT_SETUP, child_result, random_checkpoint, table, warm_page_cache  # noqa: E402

CHILD = (
    r"""
import ctypes, gc, json, sys, threading, time
T0 = time.perf_counter()
samples, phase, stop = [], ["import"], threading.Event()

def status():
    d = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                d[k] = int(v.split()[0]) * 1024 / 1e9
    return d

def sampler():
    while not stop.is_set():
        samples.append((phase[0], status()))
        time.sleep(0.01)

threading.Thread(target=sampler, daemon=True).start()
import numpy as np, jax
import pali_kit as pk
from pali_kit import decode

phase[0] = "load"
"""
    + BF16_PROMPT_SETUP
    + """
for run in (1, 2, 3):
    phase[0] = f"prefill {{run}}"
    it = decode.iter_tokens(model.config, model.run_params, pixels, enc["text"], enc["mask_input"],
                            max_new_tokens=24, logit_mask=mask)
    next(it)
    phase[0] = f"decode {{run}}"
    for _ in it:
        pass
phase[0] = "encode"
embed = jax.jit(lambda p, x: pk.model.PaliGemma(model.config).apply({{"params": p}}, x, method="embed_image"))
for _ in range(3):
    embed(model.run_params, pixels).block_until_ready()
phase[0] = "end"
time.sleep(0.05)
stop.set()
before = status()["RssAnon"]
del embed
decode._jitted.cache_clear(); decode._sampler_fn.cache_clear(); jax.clear_caches(); gc.collect()
try:
    ctypes.CDLL(None).malloc_trim(0)
except (OSError, AttributeError):
    pass
rows = {{}}
for p, d in samples:
    r = rows.setdefault(p, dict(rss=0.0))
    if d["VmRSS"] >= r["rss"]:
        r.update(rss=d["VmRSS"], anon=d["RssAnon"], file=d["RssFile"], hwm=d["VmHWM"])
print("RESULT " + json.dumps(dict(rows=rows, hwm=status()["VmHWM"], weights=model.num_params() * 2,
                                  programs=before - status()["RssAnon"])))
"""
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    source = random_checkpoint(args.name, "bfloat16")
    default_arenas = str(8 * (os.cpu_count() or 1))  # glibc's default on 64-bit
    summary = []
    for r in range(args.rounds):
        for label, extra in (("arenas capped (kit)", {}),
                             (f"glibc default ({default_arenas})", {"MALLOC_ARENA_MAX": default_arenas})):  # fmt: skip
            env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="pk_cache_"),
                       **extra)  # fmt: skip
            warm_page_cache(source)
            res = child_result(CHILD.format(path=str(source)), env)
            rows = [{"phase": p, "max RSS": f"{v['rss']:.3f}", "anon": f"{v['anon']:.3f}",
                     "file": f"{v['file']:.3f}", "peak so far": f"{v['hwm']:.3f}"}
                    for p, v in res["rows"].items()]  # fmt: skip
            table(rows, f"round {r + 1}, {label}: weights {res['weights'] / 1e9:.3f} GB")
            ratio = res["hwm"] * 1e9 / res["weights"]
            print(f"peak {res['hwm']:.3f} GB = {ratio:.3f}x the weights; dropping the compiled "
                  f"programs frees {res['programs']:.3f} GB\n", flush=True)  # fmt: skip
            summary.append({"round": r + 1, "heap": label, "peak GB": f"{res['hwm']:.3f}",
                            "peak / weights": f"{ratio:.3f}x",
                            "held by programs GB": f"{res['programs']:.3f}"})  # fmt: skip
    table(summary, f"{args.name}, bfloat16, load + 3 x generate + encode, empty compilation cache")


if __name__ == "__main__":
    main()
