"""Load time and peak host memory for a full-size random PaliGemma-3B checkpoint.

    python bench/load.py [--name paligemma-3b-pt-224]

Each load runs in a fresh process so its peak RSS is its own. Target: peak RSS
at most 1.15x the size of the loaded weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_checkpoint, table  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import jax
from pali_kit.checkpoints import load_params
from pali_kit.model import count_params
sys.path.insert(0, {bench!r})
from common import peak_rss_gb
base = peak_rss_gb()
t = time.perf_counter()
params = load_params({path!r}, dtype={dtype!r}, progress=False)
jax.block_until_ready(params)
load_s = time.perf_counter() - t
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps(dict(load_s=load_s, peak=peak_rss_gb(), base=base, weights=nbytes / 1e9,
                      params=count_params(params))))
"""


def run(path: Path, dtype):
    code = CHILD.format(path=str(path), dtype=dtype, bench=str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    args = ap.parse_args()
    rows = []
    for stored, requested in [("float32", None), ("bfloat16", None), ("float32", "bfloat16")]:
        path = random_checkpoint(args.name, stored)
        r = run(path, requested)
        rows.append({
            "file": path.name,
            "loaded as": requested or stored,
            "file GB": f"{path.stat().st_size / 1e9:.2f}",
            "weights GB": f"{r['weights']:.2f}",
            "load s": f"{r['load_s']:.1f}",
            "GB/s": f"{path.stat().st_size / 1e9 / r['load_s']:.2f}",
            "peak RSS GB": f"{r['peak']:.2f}",
            "peak / weights": f"{r['peak'] / r['weights']:.3f}",
            "RSS before load": f"{r['base']:.2f}",
        })  # fmt: skip
    table(rows, f"pk.load_params on a random {args.name} (fresh process each)")


if __name__ == "__main__":
    main()
