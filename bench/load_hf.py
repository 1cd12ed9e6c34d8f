"""Host memory of loading a transformers folder (``pk.hf.load_hf``), full-size PaliGemma 3B.

    python bench/load_hf.py [--name paligemma-3b-pt-224]

Exports the cached random bf16 checkpoint with ``pk.export_hf`` once (beside it,
as bench/generate.py does), then loads it in a fresh process while a thread
samples ``/proc/self/status`` every 2 ms. Peak RSS alone would count the file
pages the safetensors library maps (clean page cache the OS can drop), so the
table splits the peak into anonymous memory (what the process owns) and mapped
file pages. Target: anonymous peak near one copy of the weights.
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
import json, threading, time
import jax
from pali_kit import hf

def field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name):
                return int(line.split()[1]) * 1024

peak = {{"anon": 0, "file": 0}}
done = threading.Event()
def sample():
    while not done.is_set():
        peak["anon"] = max(peak["anon"], field("RssAnon:"))
        peak["file"] = max(peak["file"], field("RssFile:"))
        time.sleep(0.002)

base = field("RssAnon:")
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t = time.perf_counter()
params, _ = hf.load_hf({folder!r}, progress=False)
jax.block_until_ready(params)
load_s = time.perf_counter() - t
done.set()
thread.join()
weights = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps(dict(load_s=load_s, base=base, anon=peak["anon"], file=peak["file"],
                      weights=weights)))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    args = ap.parse_args()
    source = random_checkpoint(args.name, "bfloat16")
    folder = source.with_suffix(".hf")
    if not folder.exists():
        code = "import pali_kit as pk; pk.export_hf(pk.load({!r}, verbose=False), {!r})"
        subprocess.run([sys.executable, "-c", code.format(str(source), str(folder))], check=True)
    out = subprocess.run([sys.executable, "-c", CHILD.format(folder=str(folder))],
                         capture_output=True, text=True, check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    w = r["weights"]
    table([{
        "folder": folder.name,
        "weights GB": f"{w / 1e9:.2f}",
        "load s": f"{r['load_s']:.1f}",
        "peak anonymous GB": f"{r['anon'] / 1e9:.2f}",
        "(peak anonymous - before) / weights": f"{(r['anon'] - r['base']) / w:.2f}x",
        "peak mapped file pages GB": f"{r['file'] / 1e9:.2f}",
    }], f"pk.hf.load_hf on a random {args.name} folder (fresh process)")  # fmt: skip


if __name__ == "__main__":
    main()
