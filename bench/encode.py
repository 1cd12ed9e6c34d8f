"""Image encoding alone: the kit's SigLIP + projector vs transformers', same weights, same run.

    python bench/encode.py                          # bfloat16, the kit from this tree
    python bench/encode.py --dtype float32 --reps 9
    python bench/encode.py --kit before=/path/to/old/tree --kit after=.

Only the vision weights of the random PaliGemma 3B-224 checkpoint are read
(``bench/common.py``; its transformers export for the other side), so this runs
in a fraction of the memory of ``bench/generate.py``. Each contender lives in
its own process (a kit per source tree, transformers), started once and warmed
up; the parent then asks them for one encode at a time, in turn, ``--reps``
rounds, and prints each one's median and its ratio to transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import random_checkpoint, table  # noqa: E402

KIT_CHILD = r"""
import json, sys, time
sys.path.insert(0, {here!r})
import numpy as np, jax, jax.numpy as jnp
from pali_kit import checkpoints
from pali_kit.model import cpu
from pali_kit.model.common import to_device
from pali_kit.model.siglip import SigLIP
from common import peak_rss_gb

args = json.loads({args!r})
dtype = np.dtype(jnp.dtype(args["dtype"]))
header = checkpoints.checkpoint_keys(args["path"])
config = checkpoints.infer_config({{k: s for k, (s, _) in header.items()}}, args["path"])
if args["full"]:  # the whole model, as pk.load makes it
    import pali_kit as pk
    whole = pk.load(args["path"], dtype=args["dtype"], verbose=False)
    run = whole.run_params["img"]
else:
    flat = {{}}
    with checkpoints._open_zip(args["path"]) as zf:  # the image encoder's arrays only
        for member in zf.namelist():
            key = checkpoints._canonical_key(member)
            if key.startswith("img/"):
                info = zf.getinfo(member)
                flat[key] = to_device(checkpoints._read_member(zf, info, args["path"], key, dtype))
    img = checkpoints.unflatten(flat)["img"]
    # its CPU layout as pk.load makes it (the LLM part: a stub without layers)
    stub = {{"final_norm": {{"scale": jnp.zeros((1,), dtype)}},
             "embedder": {{"input_embedding": jnp.zeros((1, 1), dtype)}}, "layers": {{}}}}
    run = cpu.cpu_layout({{"img": img, "llm": stub}}, in_place=True)["img"]
    del img, flat
model = SigLIP(config.vision, config.llm.width)
encode = jax.jit(lambda p, x: model.apply({{"params": p}}, x))
res = config.vision.image_size
pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, res, res, 3)), jnp.float32)
out = encode(run, pixels).block_until_ready()
print("READY " + json.dumps(dict(shape=list(out.shape), rss=peak_rss_gb())), flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    encode(run, pixels).block_until_ready()
    print("TIME " + json.dumps(time.perf_counter() - t), flush=True)
"""

HF_CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {here!r})
import numpy as np, torch
from safetensors import safe_open
from transformers import PaliGemmaConfig, SiglipVisionModel
from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector
from common import peak_rss_gb

args = json.loads({args!r})
dtype = getattr(torch, args["dtype"])
cfg = PaliGemmaConfig.from_pretrained(args["folder"])
tower = SiglipVisionModel(cfg.vision_config).to(dtype)
proj = PaliGemmaMultiModalProjector(cfg).to(dtype)
state = {{}}
for f in sorted(Path(args["folder"]).glob("*.safetensors")):
    with safe_open(str(f), "pt") as s:
        for k in s.keys():
            if k.startswith(("vision_tower.", "multi_modal_projector.")):
                state[k] = s.get_tensor(k).to(dtype)
mine = set(tower.state_dict())
# the tower's own names start with or without "vision_model." (transformers versions differ)
strip = "vision_tower." if any(k.startswith("vision_model.") for k in mine) else "vision_tower.vision_model."
tower.load_state_dict({{k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}})
proj.load_state_dict({{k[len("multi_modal_projector."):]: v for k, v in state.items()
                      if k.startswith("multi_modal_projector.")}})
del state
tower.eval(); proj.eval()
res = cfg.vision_config.image_size
pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, res, res))).to(dtype)

def encode():  # as PaliGemmaModel.get_image_features
    with torch.inference_mode():
        return proj(tower(pixels).last_hidden_state) / cfg.text_config.hidden_size ** 0.5

out = encode()
print("READY " + json.dumps(dict(shape=list(out.shape), rss=peak_rss_gb())), flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    encode()
    print("TIME " + json.dumps(time.perf_counter() - t), flush=True)
"""


class Child:
    """A contender's process: ``ready`` after its first (compiling) encode, ``time()`` per call."""

    def __init__(self, name, code, env=None):
        self.name, self.times = name, []
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        self.info = json.loads(self._expect("READY "))

    def _expect(self, tag):
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :]
        raise RuntimeError(f"{self.name}: the process ended (exit {self.proc.wait()})")

    def time(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.times.append(json.loads(self._expect("TIME ")))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="paligemma-3b-pt-224")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kit", action="append", default=[],
                    help="NAME=TREE: a kit from source tree TREE (default: this tree)")  # fmt: skip
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--full", action="store_true",
                    help="kits load the whole model with pk.load (~6.5 GB each), not just "
                         "the image encoder")  # fmt: skip
    args = ap.parse_args()
    source = random_checkpoint(args.name, "bfloat16")
    kits = [k.split("=", 1) for k in args.kit] or [["kit", str(HERE.parent)]]
    children = []
    for name, tree in kits:
        spec = json.dumps(dict(path=str(source), dtype=args.dtype, full=args.full))
        env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
        children.append(Child(name, KIT_CHILD.format(here=str(HERE), args=spec), env))
    if not args.skip_hf:
        folder = source.with_suffix(".hf")
        spec = json.dumps(dict(folder=str(folder), dtype=args.dtype))
        children.append(Child("transformers", HF_CHILD.format(here=str(HERE), args=spec)))
    for _ in range(args.reps):
        for child in children:
            time.sleep(0.2)  # let the previous process's threads go idle
            child.time()
    for child in children:
        child.close()
    hf = statistics.median(children[-1].times) if not args.skip_hf else None
    rows = [
        {
            "encoder": c.name,
            "median s": f"{statistics.median(c.times):.3f}",
            "min s": f"{min(c.times):.3f}",
            "vs transformers": f"{statistics.median(c.times) / hf:.3f}x" if hf else "-",
            "peak RSS GB": f"{c.info['rss']:.2f}",
        }
        for c in children
    ]
    table(rows, f"{args.name} image encoding, {args.dtype}, {args.reps} interleaved rounds")
    print(json.dumps({c.name: c.times for c in children}))


if __name__ == "__main__":
    main()
