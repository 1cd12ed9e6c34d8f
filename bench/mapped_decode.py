"""Decode and prefill on weights mapped from the weights cache against the same weights
read from the ``.npz``, in one process, calls interleaved.

    python bench/mapped_decode.py [--name paligemma-3b-pt-224] [--rounds 5] [--tokens 16]

A later process maps the weights cache (page-cache pages of a file, 4 KiB each)
where the first process read the ``.npz`` into fresh anonymous memory; this checks
that generating from the mapping is as fast. A child process writes the cache
first (in a new folder beside the checkpoint, removed at the end); then this
process loads the model twice (``weights_cache=False``, then the mapping) and
times, round by round, one generation of each: the first token (encode +
prefill) and the median decode step. Medians over the rounds, and mapped / read.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import random_checkpoint, table, warm_page_cache  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    path = random_checkpoint(args.name, "bfloat16")
    folder = Path(tempfile.mkdtemp(prefix="weights_cache_", dir=path.parent))
    try:
        write = f"import pali_kit as pk; pk.load({str(path)!r}, verbose=False, weights_cache={str(folder)!r})"
        subprocess.run([sys.executable, "-c", write], check=True)
        run(path, folder, args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(path: Path, folder: Path, args) -> None:
    import pali_kit as pk
    from pali_kit import decode, weights_cache

    warm_page_cache(path)
    warm_page_cache(weights_cache.cache_file(folder, path))
    models = {"read": pk.load(path, verbose=False, weights_cache=False),
              "mapped": pk.load(path, verbose=False, weights_cache=folder)}  # fmt: skip
    assert models["mapped"]._run_replaced and models["read"]._run_replaced
    tok = pk.Tokenizer.demo()
    m = models["read"]
    image = np.random.default_rng(0).integers(0, 255, (m.resolution, m.resolution, 3), np.uint8)
    pixels = m.preprocess(image)
    enc = tok.encode_prompts(["caption en"], bucket=None)
    never_stop = np.ones(m.config.llm.vocab_size, bool)
    never_stop[decode.EOS_ID] = False

    def once(model):
        stamps, t = [], time.perf_counter()
        for _ in decode.iter_tokens(model.config, model.run_params, pixels, enc["text"],
                                    enc["mask_input"], max_new_tokens=args.tokens,
                                    logit_mask=never_stop):  # fmt: skip
            stamps.append(time.perf_counter())
        return stamps[0] - t, statistics.median(np.diff(stamps))

    for model in models.values():
        once(model)  # compile, first runs
    got = {k: {"first": [], "step": []} for k in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            first, step = once(model)
            got[name]["first"].append(first)
            got[name]["step"].append(step)
    med = {k: {q: statistics.median(v) for q, v in d.items()} for k, d in got.items()}
    rows = [{"weights": k, "first token s": f"{d['first']:.3f}",
             "decode s/token": f"{d['step']:.4f}"} for k, d in med.items()]  # fmt: skip
    rows.append({"weights": "mapped / read",
                 "first token s": f"{med['mapped']['first'] / med['read']['first']:.3f}x",
                 "decode s/token": f"{med['mapped']['step'] / med['read']['step']:.3f}x"})  # fmt: skip
    table(rows, f"{args.name}, bfloat16: weights read from the .npz vs mapped from the "
                f"weights cache, one process, {args.rounds} interleaved rounds (medians)")  # fmt: skip
    for k, d in got.items():
        print(k, "first token s:", " ".join(f"{x:.3f}" for x in d["first"]),
              "| decode s/token:", " ".join(f"{x:.4f}" for x in d["step"]))  # fmt: skip


if __name__ == "__main__":
    main()
