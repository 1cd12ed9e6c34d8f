"""Train the embedded demo model: a tiny PaliGemma 2 on synthetic shapes, from scratch.

Builds: ``data/demo_model.npz``. Takes hours: the stored model is 7,500 steps at
0.8-1.5 steps/s on a shared 2-core CPU (about 1.4-2.6 h; data/README.md).
Deterministic inputs: data seed 0, init seed 0, evaluation seed 12345, and a
resumed run continues the same data stream (``start_step``). The stored file came
from a run resumed once with a new learning-rate schedule (data/README.md), so
the default command gives a model of the same kind, not the same bytes.

    python scripts/train_demo.py --steps 40000            # resumes from out/demo/state.npz
    python scripts/train_demo.py --steps 60000 --segment  # add `segment` once data/vae.npz exists

Writes ``data/demo_model.npz`` (official layout, loads with ``pk.load("demo")``)
at every evaluation, and a resumable state (params + Adam moments + step) to
``out/demo/state.npz``. Tricks that matter on a CPU budget (see the kit's notes):
sin-cos initialised ``<loc>`` embeddings, Gaussian label smoothing over
neighbouring location bins, detection weighted up, no absent-object prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pali_kit import checkpoints, data
from pali_kit.api import Model, demo_config
from pali_kit.model import PaliGemma, init_params
from pali_kit.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo"
TEXT_LEN = 32
TASKS = ("caption", "count", "color", "detect", "detect", "detect_all")


def loc_init(params, tok: Tokenizer, scale: float):
    """Give the 1024 <loc> rows a smooth sin-cos code of the bin index (ordinal structure)."""
    table = np.array(params["llm"]["embedder"]["input_embedding"])
    width = table.shape[1]
    bins = np.arange(1024)[:, None]
    freqs = np.exp(-np.log(1024.0) * np.arange(width // 2) / (width // 2))[None] * np.pi
    code = np.concatenate([np.sin(bins * freqs), np.cos(bins * freqs)], axis=1)
    table[tok.loc_offset : tok.loc_offset + 1024] = code * scale
    params["llm"]["embedder"]["input_embedding"] = jnp.asarray(table)
    return params


def make_loss(config, loc_offset: int, sigma: float):
    model = PaliGemma(config)
    bins = jnp.arange(1024, dtype=jnp.float32)

    def loss_fn(params, batch):
        text, mask_ar, mask_loss = batch["text"], batch["mask_ar"], batch["mask_loss"]
        logits = model.apply({"params": params}, batch["image"], text[:, :-1], mask_ar[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = text[:, 1:]
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        # <loc> targets: a Gaussian over neighbouring bins instead of one bin.
        is_loc = (target >= loc_offset) & (target < loc_offset + 1024)
        # clip: non-loc positions must stay finite (a NaN in the unused branch of
        # `where` still poisons the gradient)
        centre = jnp.clip(target - loc_offset, 0, 1023).astype(jnp.float32)[..., None]
        soft = jnp.exp(-0.5 * ((bins - centre) / sigma) ** 2)
        soft = soft / soft.sum(-1, keepdims=True)
        loc_nll = -jnp.sum(soft * logp[..., loc_offset : loc_offset + 1024], axis=-1)
        per_token = jnp.where(is_loc, loc_nll, nll)
        weights = mask_loss[:, 1:].astype(jnp.float32)
        per_example = jnp.sum(per_token * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1)
        return jnp.mean(per_example)

    return loss_fn


def make_optimizer(steps: int, lr: float):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(1000, steps // 10), steps, lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def save_state(params, opt_state, step: int, path: Path):
    leaves = jax.tree.leaves(opt_state)
    extra = {f"opt/{i}": np.asarray(x) for i, x in enumerate(leaves)}
    extra["train/step"] = np.asarray(step)
    checkpoints.save_arrays(
        [(f"params/{k}", v) for k, v in checkpoints.flatten(params).items()] + list(extra.items()),
        path,
    )


def load_state(path: Path, params, opt_state):
    with np.load(path, allow_pickle=False) as z:
        step = int(z["train/step"])
        leaves, treedef = jax.tree.flatten(opt_state)
        opt_leaves = [jnp.asarray(z[f"opt/{i}"]) for i in range(len(leaves))]
    params = checkpoints.load_params(path)
    return params, jax.tree.unflatten(treedef, opt_leaves), step


def evaluate(params, config, tok, vae, n: int = 150):
    """Greedy answers on held-out scenes (seed 12345): per-task scores (``data.score_shapes``)."""
    tasks = ["caption", "count", "color", "detect"] + (["segment"] * (vae is not None))
    return data.score_shapes(Model(params, config, tok), n, seed=12345, tasks=tasks, vae=vae)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sigma", type=float, default=6.0, help="loc label smoothing, in bins")
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument(
        "--segment", action="store_true", help="add the segment task (needs data/vae.npz)"
    )
    args = ap.parse_args()

    tok = Tokenizer.demo()
    config = demo_config(tok.vocab_size)
    vae = None
    tasks = TASKS
    if args.segment:
        from pali_kit.segmentation import load_vae

        vae = load_vae("demo")
        tasks = TASKS + ("segment", "segment")
    train = data.ShapesDataset(2_000_000, size=config.resolution, seed=0, tasks=tasks, vae=vae)

    opt = make_optimizer(args.steps, args.lr)
    params = init_params(config, 0)
    params = loc_init(params, tok, scale=config.llm.width**-0.5)
    opt_state = opt.init(params)
    start = 0
    state_path = OUT / "state.npz"
    if state_path.exists():
        params, opt_state, start = load_state(state_path, params, opt_state)
        print(f"resumed at step {start}")

    loss_fn = make_loss(config, tok.loc_offset, args.sigma)

    @jax.jit
    def step_fn(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = data.Batcher(
        train, tok, batch_size=args.batch, text_len=TEXT_LEN, image_size=config.resolution,
        seed=0, start_step=start, prefetch=4,
    )  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    log = (OUT / "log.jsonl").open("a")
    t0, losses = time.time(), []
    for step, batch in zip(range(start, args.steps), batches):
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(float(loss))
        done = step + 1
        if done % 100 == 0:
            rate = 100 / (time.time() - t0)
            print(f"step {done} loss {np.mean(losses):.4f} ({rate:.2f} steps/s)", flush=True)
            log.write(json.dumps({"step": done, "loss": float(np.mean(losses))}) + "\n")
            log.flush()
            t0, losses = time.time(), []
        if done % args.save_every == 0 or done == args.steps:
            save_state(params, opt_state, done, state_path)
        if done % args.eval_every == 0 or done == args.steps:
            scores = evaluate(params, config, tok, vae)
            print(f"eval step {done}: {scores}", flush=True)
            log.write(json.dumps({"step": done, "eval": scores}) + "\n")
            log.flush()
            checkpoints.save_params(params, ROOT / "data" / "demo_model.npz")


if __name__ == "__main__":
    main()
