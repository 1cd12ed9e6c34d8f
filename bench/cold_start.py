"""Where a cold process spends its time before the first token, phase by phase.

    python bench/cold_start.py [--name paligemma-3b-pt-224] [--dtype bfloat16] [--quantize int4]

Two fresh processes share one new persistent compilation cache: the first
starts with it empty, the second finds it warm. Each prints the wall time at
the end of every phase (import, load, CPU layout, first token, three more
tokens), the peak RSS so far, and JAX's own compile timers summed over the
process (tracing, lowering to MLIR, XLA compilation or cache retrieval).
Both processes read the checkpoint from the page cache (it is read once before each).

    python bench/cold_start.py --trees OLD_TREE NEW_TREE [--rounds 2]

compares two source trees (folders holding ``pali_kit/``) in one run: per tree
one process with an empty cache of its own, then ``--rounds`` rounds of warm
processes, the trees alternating. ``--hf`` adds, to every round, a cold
process of transformers on the same weights (the folder bench/generate.py
exports), with the same phases: import (torch, transformers), load
(``from_pretrained``), first token (``generate``, one image, the same prompt).

    python bench/cold_start.py --weights-cache [--rounds 3] [--hf]

measures the weights cache (on by default in ``pk.load``; here each process
turns it on or off with ``weights_cache=``): one process with an empty
compilation cache and no weights cache (the first-ever cold start), one with
the compilation cache warm that reads the .npz and writes the weights cache
(what the first load pays: the write runs in the background and the process
exits when it is done, the "process s" column), then ``--rounds`` rounds of a warm
process without the weights cache, one that maps it, and (``--hf``) a cold
process of transformers, in that order. Each process finds its files in the
page cache (the .npz, the weights cache, the transformers folder). The weights
cache lives in a new folder beside the checkpoint, removed at the end.

    python bench/cold_start.py --fault-rate

prints how fast a process gets fresh memory: 2 GiB mapped and touched once
per 4 KiB page, in a new mapping after the previous one was freed and the
machine left idle for 3 s (on a VM that hands freed memory back to its host,
each page is then a fault the host serves), right after a free, and with
transparent huge pages asked for (``MADV_HUGEPAGE``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import random_checkpoint, table, warm_page_cache  # noqa: E402

CHILD = r"""
import collections, json, sys, time
T0 = time.perf_counter()
sys.path.insert(0, {here!r})
import numpy as np
import jax
from jax import monitoring
from common import peak_rss_gb

SECONDS = collections.defaultdict(float)
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: SECONDS.__setitem__(event, SECONDS[event] + duration))
phases = {{}}
def mark(name):
    phases[name] = (time.perf_counter() - T0, peak_rss_gb())

import pali_kit as pk
from pali_kit import decode
mark("import")
model = pk.load({path!r}, dtype={dtype!r}, quantize={quantize!r}, verbose=False,
                weights_cache={weights_cache!r})
mark("load")
run = model.run_params
mark("layout")
tok = pk.Tokenizer.demo()
image = np.random.default_rng(0).integers(0, 255, (model.resolution,) * 2 + (3,), dtype=np.uint8)
enc = tok.encode_prompts([{prompt!r}], bucket=None)
tokens = decode.iter_tokens(model.config, run, model.preprocess(image), enc["text"],
                            enc["mask_input"], max_new_tokens=4)
next(tokens)
mark("first token")
for _ in tokens:
    pass
mark("3 more tokens")
timers = {{k.rsplit("/", 1)[-1]: v for k, v in SECONDS.items()}}
anon = dict(line.split(":", 1) for line in open("/proc/self/status"))["RssAnon"].split()[0]
print("RESULT " + json.dumps(dict(phases=phases, timers=timers, anon_gb=int(anon) * 1024 / 1e9)))
"""

HF_CHILD = r"""
import json, sys, time
T0 = time.perf_counter()
sys.path.insert(0, {here!r})
import numpy as np
import torch
from transformers import PaliGemmaForConditionalGeneration
from common import peak_rss_gb

phases = {{}}
def mark(name):
    phases[name] = (time.perf_counter() - T0, peak_rss_gb())

mark("import")
model = PaliGemmaForConditionalGeneration.from_pretrained({folder!r}, dtype=torch.{dtype}).eval()
mark("load")
cfg = model.config
res = cfg.vision_config.image_size
ids = [cfg.image_token_index] * (res // cfg.vision_config.patch_size) ** 2 + {prompt_ids!r}
input_ids = torch.tensor([ids])
image = np.random.default_rng(0).integers(0, 255, (1, 3, res, res)).astype(np.float32)
pixels = torch.from_numpy(image / 127.5 - 1).to(torch.{dtype})
with torch.inference_mode():
    model.generate(input_ids=input_ids, pixel_values=pixels, token_type_ids=torch.zeros_like(input_ids),
                   attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False)
mark("first token")
anon = dict(line.split(":", 1) for line in open("/proc/self/status"))["RssAnon"].split()[0]
print("RESULT " + json.dumps(dict(phases=phases, timers={{}}, anon_gb=int(anon) * 1024 / 1e9)))
"""

PROMPT = "answer en what is in the picture"  # as bench/generate.py's

TIMERS = {
    "jaxpr_trace_duration": "trace s",
    "jaxpr_to_mlir_module_duration": "lower s",
    "backend_compile_duration": "compile or fetch s",
    "cache_retrieval_time_sec": "of which cache fetch s",
}


def crc_rates(nbytes: int = 1 << 28) -> dict:
    """GB/s of the CRC-32 the .npz reader checks: zlib's and ISA-L's (when installed)."""
    import zlib

    data = os.urandom(nbytes)
    fns = {"zlib": zlib.crc32}
    try:
        from isal.isal_zlib import crc32

        fns["isal"] = crc32
    except ImportError:
        pass
    rates = {}
    for name, fn in fns.items():
        best = min(_seconds(fn, data) for _ in range(3))
        rates[name] = round(nbytes / best / 1e9, 1)
    return rates


def _seconds(fn, data) -> float:
    t = time.perf_counter()
    fn(data)
    return time.perf_counter() - t


def child_code(path: Path, args, weights_cache) -> str:
    """The kit's cold process for ``path`` with the command line's dtype and quantization."""
    return CHILD.format(here=str(HERE), path=str(path), dtype=args.dtype, prompt=PROMPT,
                        quantize=args.quantize, weights_cache=weights_cache)  # fmt: skip


def what(args) -> str:
    """The model and weights a run measures, for its tables' titles."""
    return ", ".join(x for x in (args.name, args.dtype, args.quantize) if x)


def run_child(code: str, path: Path, env: dict, cwd=None, also_warm=()) -> dict:
    for p in (path, *also_warm):
        warm_page_cache(p)  # the files from the page cache in every process
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd)  # fmt: skip
    wall = time.perf_counter() - start  # to the process's exit (e.g. a cache written meanwhile)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return {**json.loads(line[0][len("RESULT ") :]), "process_s": wall}


def row_of(res: dict, **first) -> dict:
    row, before = dict(first), 0.0
    for name, (at, _rss) in res["phases"].items():
        row[f"{name} s"] = f"{at - before:.1f}"
        before = at
    row["total s"] = f"{before:.1f}"
    row["to 1st token s"] = f"{res['phases']['first token'][0]:.2f}"
    if "process_s" in res:  # start to exit, seen from the parent
        row["process s"] = f"{res['process_s']:.1f}"
    row["peak RSS GB"] = f"{max(r for _, r in res['phases'].values()):.2f}"
    if "anon_gb" in res:  # memory of the process's own (not mapped file pages), at its end
        row["own memory GB"] = f"{res['anon_gb']:.2f}"
    for key, label in TIMERS.items():
        row[label] = f"{res['timers'].get(key, 0.0):.1f}"
    return row


def fault_rates(gib: int = 2, rounds: int = 2) -> dict:
    """GB/s of first touches of fresh anonymous memory: after an idle pause, at once, huge pages."""
    import mmap

    import numpy as np

    n = gib << 30

    def touch(huge: bool) -> float:
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            m.madvise(mmap.MADV_HUGEPAGE)
        a = np.frombuffer(m, np.uint8)
        t = time.perf_counter()
        a[::4096] = 1  # one write per 4 KiB page: the faults, not the copying
        dt = time.perf_counter() - t
        del a
        m.close()
        return n / dt / 1e9

    rates = {"after 3 s idle": [], "right after a free": [], "huge pages, after 3 s idle": []}
    for _ in range(rounds):
        time.sleep(3)
        rates["after 3 s idle"].append(touch(False))
        rates["right after a free"].append(touch(False))
        time.sleep(3)
        rates["huge pages, after 3 s idle"].append(touch(True))
    return {k: [round(v, 2) for v in vs] for k, vs in rates.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", choices=["int8", "int4"], help="pk.load(..., quantize=)")
    ap.add_argument("--trees", nargs=2, help="compare two source trees (OLD NEW)")
    ap.add_argument("--rounds", type=int, default=2, help="warm rounds with --trees")
    ap.add_argument("--hf", action="store_true", help="a transformers cold process per round")
    ap.add_argument("--fault-rate", action="store_true", help="only: how fast fresh memory comes")
    ap.add_argument("--weights-cache", action="store_true",
                    help="rounds with and without the weights cache (pk.load weights_cache=)")  # fmt: skip
    args = ap.parse_args()
    if args.fault_rate:
        print(json.dumps({"fresh memory, GB/s": fault_rates()}), flush=True)
        return
    path = random_checkpoint(args.name, "bfloat16")
    print(json.dumps({"crc32 GB/s": crc_rates()}), flush=True)
    code = child_code(path, args, weights_cache=False)
    hf_code = _hf_child(path, args.dtype) if args.hf else None
    if args.weights_cache:
        return weights_cache_rounds(args, path, hf_code)
    rows = []
    if args.trees:
        caches = {t: tempfile.mkdtemp(prefix="pk_cache_") for t in args.trees}
        plan = [("empty", t) for t in args.trees]
        plan += [(f"warm {r}", t) for r in range(1, args.rounds + 1) for t in args.trees]
        for i, (cache, tree) in enumerate(plan):
            env = dict(os.environ, PYTHONPATH=tree, JAX_COMPILATION_CACHE_DIR=caches[tree])
            res = run_child(code, path, env, cwd=tree)
            rows.append(row_of(res, tree=Path(tree).name, cache=cache))
            print(json.dumps({"tree": tree, "cache": cache, **res}), flush=True)
            if hf_code is not None and i % 2 == 1:  # after each pair of trees
                res = run_child(hf_code, path.with_suffix(".hf"), dict(os.environ))
                rows.append(row_of(res, tree="transformers", cache="-"))
                print(json.dumps({"tree": "transformers", **res}), flush=True)
        cols = {c: None for r in rows for c in r}  # transformers' rows have fewer phases
        rows = [{c: r.get(c, "-") for c in cols} for r in rows]
        table(rows, f"{what(args)}: seconds per phase of a cold process, two trees")
        return
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="pk_cache_"))
    for cache in ("empty", "warm"):
        res = run_child(code, path, env)
        rows.append(row_of(res, cache=cache))
        print(json.dumps({"cache": cache, **res}), flush=True)
    table(rows, f"{what(args)}: seconds per phase of a cold process")


def weights_cache_rounds(args, path: Path, hf_code: str | None) -> None:
    """The ``--weights-cache`` runs (see the module's docstring)."""
    import shutil

    from pali_kit import weights_cache

    folder = Path(tempfile.mkdtemp(prefix="weights_cache_", dir=path.parent))
    env = {k: v for k, v in os.environ.items() if k != weights_cache.ENV}
    env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pk_cache_")
    plain = child_code(path, args, weights_cache=False)
    cached = child_code(path, args, weights_cache=str(folder))
    from pali_kit.checkpoints import quantized_variant

    variant = quantized_variant(args.quantize, args.dtype) if args.quantize else ""
    file = weights_cache.cache_file(folder, path, variant)
    plan = [("kit", "empty", "-", plain), ("kit", "warm", "written", cached)]
    for r in range(1, args.rounds + 1):
        plan += [("kit", f"warm {r}", "-", plain), ("kit", f"warm {r}", "mapped", cached)]
        if hf_code is not None:
            plan.append(("transformers", "-", "-", hf_code))
    rows = []
    try:
        for who, cache, weights, code in plan:
            if who == "transformers":
                res = run_child(code, path.with_suffix(".hf"), dict(os.environ))
            else:
                if weights == "mapped" and not file.is_file():
                    raise RuntimeError(f"no weights cache at {file} after the writing process")
                res = run_child(code, path, env, also_warm=[file] if weights == "mapped" else [])
            rows.append(row_of(res, who=who, cache=cache, weights_cache=weights))
            print(json.dumps({"who": who, "cache": cache, "weights_cache": weights, **res}),
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cols = {c: None for r in rows for c in r}
    rows = [{c: r.get(c, "-") for c in cols} for r in rows]
    table(rows, f"{what(args)}: cold processes with and without the weights cache")
    for who, weights in (("kit", "-"), ("kit", "mapped"), ("transformers", "-")):
        times = [float(r["to 1st token s"]) for r in rows
                 if r["who"] == who and r["weights_cache"] == weights and r["cache"] != "empty"]  # fmt: skip
        if times:
            print(f"{who:<12} weights cache {weights:<6} to 1st token: "
                  + " ".join(f"{t:.2f}" for t in times) + f"  (median {statistics.median(times):.2f} s)")  # fmt: skip


def _hf_child(path: Path, dtype: str) -> str:
    """The transformers cold process's code, on the folder bench/generate.py exports."""
    import pali_kit as pk

    folder = path.with_suffix(".hf")
    if not folder.exists():
        code = "import pali_kit as pk; pk.export_hf(pk.load({!r}, verbose=False), {!r})"
        subprocess.run([sys.executable, "-c", code.format(str(path), str(folder))], check=True)
    tok = pk.Tokenizer.demo()
    prompt_ids = [tok.bos_id] + tok.encode(PROMPT) + list(tok.newline_ids)
    return HF_CHILD.format(here=str(HERE), folder=str(folder), dtype=dtype, prompt_ids=prompt_ids)


if __name__ == "__main__":
    main()
