"""Helpers shared by the benchmarks: random full-size checkpoints, timers, floors."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(os.environ.get("PALI_KIT_BENCH_DIR", "/tmp/pali_kit_bench"))
# The benchmarks measure reading the checkpoint unless one asks for the weights cache
# (on by default in pk.load; bench/cold_start.py --weights-cache measures it).
os.environ.setdefault("PALI_KIT_WEIGHTS_CACHE", "0")


def random_leaf(rng: np.random.Generator, key: str, shape, dtype) -> np.ndarray:
    """Random weights of a sensible scale (norm scales 0, biases 0, matrices 1/sqrt(fan_in))."""
    if key.endswith(("scale", "bias")):
        return np.zeros(shape, dtype)
    if key.endswith("input_embedding"):
        std = shape[-1] ** -0.5
    elif "attn_vec_einsum" in key or key.endswith("out/kernel"):
        std = (shape[-3] * shape[-2]) ** -0.5
    elif key.endswith("mlp/linear"):
        std = shape[-2] ** -0.5
    elif key.endswith("embedding/kernel"):
        std = (shape[0] * shape[1] * shape[2]) ** -0.5
    elif "einsum" in key:  # q (L, N, W, H), kv (L, 2, K, W, H), gating (L, 2, W, F)
        std = shape[-2] ** -0.5
    else:  # ViT kernels (L, in, ...) and the head (in, out)
        std = (
            shape[-3 if key.endswith(("query/kernel", "key/kernel", "value/kernel")) else -2]
            ** -0.5
        )
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    step = 1 << 26
    for i in range(0, flat.size, step):  # chunks keep the float64 scratch small
        n = min(step, flat.size - i)
        flat[i : i + n] = rng.standard_normal(n, dtype=np.float32) * std
    return out.astype(dtype)


def random_checkpoint(name: str, dtype: str = "float32", folder: Path = BENCH_DIR) -> Path:
    """A full-size random checkpoint of a registry model in the official layout (cached)."""
    import ml_dtypes

    from pali_kit.checkpoints import flatten, save_arrays
    from pali_kit.model import param_shapes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    path = folder / f"{name}.{dtype}.npz"
    if path.exists():
        return path
    shapes = flatten(param_shapes(name))
    rng = np.random.default_rng(0)
    items = ((k, random_leaf(rng, k, s.shape, np_dtype)) for k, s in shapes.items())
    print(f"writing {path} ...", flush=True)
    return save_arrays(items, path)


def warm_page_cache(path: Path) -> None:
    """Read a file (or every file in a folder) once, so that the next process reads it
    from the page cache rather than the disk (when memory allows)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else [path]
    buf = bytearray(1 << 24)
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (10^9 bytes).

    Reads VmHWM (Linux), which starts afresh at exec; ru_maxrss would carry the
    parent's peak into a child process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# A child process's setup for the bf16 decode benchmarks (``str.format`` with ``path``):
# the model, one random image, one prompt, and a logit mask without EOS so every run
# decodes the same number of tokens.
BF16_PROMPT_SETUP = """
model = pk.load({path!r}, dtype="bfloat16", verbose=False)
tok = pk.Tokenizer.demo()
res = model.resolution
pixels = model.preprocess(np.random.default_rng(0).integers(0, 255, (res, res, 3), dtype=np.uint8))
enc = tok.encode_prompts(["answer en what is in the picture"], bucket=None)
mask = np.ones(model.config.llm.vocab_size, bool)
mask[decode.EOS_ID] = False
"""


def child_result(code: str, env=None, cwd=None) -> dict:
    """Run ``python -c code`` (in ``cwd``: first on its path) and return the JSON of
    its ``RESULT {...}`` line."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd)  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"benchmark child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def memory_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Read bandwidth measured with a large reduction (what decoding does to weights)."""
    a = np.ones(nbytes // 4, np.float32)
    a.sum()
    t = median_time(lambda: a.sum(), repeat=5)
    return nbytes / t / 1e9


def table(rows: list[dict], title: str = "") -> str:
    """Format rows of dicts as a fixed-width text table."""
    if title:
        print(f"\n{title}")
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(width[c]) for c in cols)
    out = [line, "  ".join("-" * width[c] for c in cols)]
    out += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    text = "\n".join(out)
    print(text)
    return text
