"""Train-step time and peak memory: pali_kit's step vs the reference colab's update.

    python bench/train.py            # PaliGemma 2 3B at full width, 2 + 2 layers (CPU-sized)
    python bench/train.py --full     # the full PaliGemma 2 3B at 224 px (what a GPU runs)

Both implementations train the attention weights only (``llm/layers/attn/*``)
with plain SGD, frozen weights in float16 on a T4 (the colab), bfloat16 on
newer GPUs, float32 on CPU (see --frozen-dtype), trainable ones in float32, batch 8,
text 128, random weights, the same batch; each runs in a fresh process so its
peak memory is its own:

- ``kit``: ``pali_kit.train.make_train_step`` (frozen weights outside the
  donated state, logsumexp loss, NaN guard, lr schedule inside the step).
- ``colab``: the reference colab's ``update_fn`` written here in plain JAX
  (spec 9.1): ``log_softmax`` + one-hot loss, ``jax.value_and_grad`` over the
  trainable leaves, ``p - lr * g`` on those, the whole tree donated.

Reported: compile time, median step time (wall, and the process's CPU time,
which a busy shared machine disturbs less), peak memory (peak RSS on CPU,
``memory_stats()["peak_bytes_in_use"]`` on a GPU/TPU), XLA's temporaries of
the compiled step, the first loss (both must agree), and ``train.plan()``'s
estimate for the same setup.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_gb, table  # noqa: E402

NAME = "paligemma2-3b-pt-224"


def bench_config(full: bool):
    from pali_kit.configs import resolve_config

    config = resolve_config(NAME)
    return config if full else config.replace(llm_depth=2, img_depth=2)


def _std(key: str, shape) -> float:
    """A sensible scale for random weights: 0 for norms and biases, else 1/sqrt(fan-in)."""
    if key.endswith(("scale", "bias")):
        return 0.0
    if key.endswith("input_embedding"):
        return shape[-1] ** -0.5
    return shape[-3 if key.endswith(("query/kernel", "key/kernel", "value/kernel")) else -2] ** -0.5


def random_params(config, mask_flat: dict, frozen_dtype):
    """Random weights made on the device leaf by leaf (trainable float32, frozen
    ``frozen_dtype``): host memory stays small, so peak RSS shows the step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pali_kit.checkpoints import flatten, unflatten
    from pali_kit.model import param_shapes

    out = {}
    for i, (key, shape) in enumerate(flatten(param_shapes(config)).items()):
        dtype = jnp.float32 if mask_flat[key] else jnp.dtype(frozen_dtype)
        std = np.float32(_std(key, shape.shape))
        make = jax.jit(lambda k, s=shape.shape, d=dtype, std=std: jax.random.normal(k, s, d) * std)
        out[key] = make(jax.random.key(i, impl="rbg"))
    return unflatten(out)


def random_batch(config, batch_size: int, text_len: int):
    """A training batch like data.Batcher's: 32 prompt tokens, then answer, EOS, padding."""
    import numpy as np

    rng = np.random.default_rng(1)
    s, t = config.resolution, text_len + 1
    text = rng.integers(3, 256_000, (batch_size, t)).astype(np.int32)
    prefix, length = 32, np.full(batch_size, t - 16)
    pos = np.arange(t)[None]
    real = pos < length[:, None]
    text = np.where(real, text, 0)
    return {
        "image": rng.uniform(-1, 1, (batch_size, s, s, 3)).astype(np.float32),
        "text": text,
        "mask_ar": (pos >= prefix).astype(np.int32).repeat(batch_size, 0),
        "mask_loss": ((pos >= prefix) & real).astype(np.int32),
        "mask_input": real,
    }


def colab_update_fn(config, mask_flat: dict):
    """The reference colab's update, in plain JAX: ``(params, batch, lr) -> (params, loss)``."""
    import jax
    import jax.numpy as jnp

    from pali_kit.checkpoints import flatten, unflatten
    from pali_kit.model import PaliGemma

    model = PaliGemma(config, scan=True, remat=True)  # big_vision: scan + nothing_saveable

    def update_fn(params, batch, learning_rate):
        imgs, txts, mask_ar = batch["image"], batch["text"], batch["mask_ar"]
        flat = flatten(params)
        trainable = {k: v for k, v in flat.items() if mask_flat[k]}
        frozen = {k: v for k, v in flat.items() if not mask_flat[k]}

        def loss_fn(trainable):
            p = unflatten({**frozen, **trainable})
            text_logits = model.apply({"params": p}, imgs, txts[:, :-1], mask_ar[:, :-1])
            logp = jax.nn.log_softmax(text_logits, axis=-1)
            mask_loss = batch["mask_loss"][:, 1:]
            targets = jax.nn.one_hot(txts[:, 1:], text_logits.shape[-1])
            token_pplx = jnp.sum(logp * targets, axis=-1)
            example_loss = -jnp.sum(token_pplx * mask_loss, axis=-1)
            example_loss /= jnp.clip(jnp.sum(mask_loss, -1), 1)
            return jnp.mean(example_loss)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        trainable = {k: v - learning_rate * grads[k] for k, v in trainable.items()}
        return unflatten({**frozen, **trainable}), loss

    return jax.jit(update_fn, donate_argnums=(0,))


def resolve_frozen(name: str):
    from pali_kit import checkpoints
    from pali_kit import train as pt

    if name == "auto":
        return pt.default_frozen_dtype()
    return checkpoints.as_dtype(name)


def device_peak_gb():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def run_child(impl: str, full: bool, steps: int, batch_size: int, text_len: int, frozen: str):
    """Build, compile and time one implementation; print one JSON line."""
    import jax
    import numpy as np

    from pali_kit import checkpoints
    from pali_kit import train as pt
    from pali_kit.model import param_shapes

    config = bench_config(full)
    frozen_dtype = resolve_frozen(frozen)
    mask, _ = pt.trainable_mask(param_shapes(config), "attention")
    mask_flat = checkpoints.flatten(mask)
    params = random_params(config, mask_flat, frozen_dtype)
    host_batch = random_batch(config, batch_size, text_len)
    base_rss = peak_rss_gb()

    if impl == "kit":
        mesh = pt.make_mesh()
        trainable, frozen_params = pt.split_params(params, mask)
        del params
        tx, schedule = pt.make_optimizer("sgd", num_steps=100, lr=0.03)
        state = pt.init_state(trainable, tx)
        step = pt.make_train_step(config, tx, schedule=schedule, remat=True)
        batch = pt.shard_batch(host_batch, mesh)
        start = time.perf_counter()
        compiled = step.lower(state, frozen_params, batch).compile()
        compile_s = time.perf_counter() - start

        def run(state):
            state, metrics = compiled(state, frozen_params, batch)
            return state, metrics["loss"]

        carry = state
    else:
        update = colab_update_fn(config, mask_flat)
        batch = {k: jax.device_put(v) for k, v in host_batch.items()}
        lr = np.float32(0.005)
        start = time.perf_counter()
        compiled = update.lower(params, batch, lr).compile()
        compile_s = time.perf_counter() - start

        def run(params):
            return compiled(params, batch, lr)

        carry = params

    temp = compiled.memory_analysis().temp_size_in_bytes / 1e9
    times, cpu_times, losses = [], [], []
    for _ in range(steps + 1):  # the first call is a warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        carry, loss = run(carry)
        losses.append(float(loss))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    print(json.dumps({
        "impl": impl, "compile_s": compile_s, "step_s": float(np.median(times[1:])),
        "cpu_s": float(np.median(cpu_times[1:])),
        "loss0": losses[0], "temp_gb": temp, "rss_gb": peak_rss_gb(), "rss_before_gb": base_rss,
        "device_peak_gb": device_peak_gb(), "device": jax.devices()[0].device_kind,
    }))  # fmt: skip


def spawn(impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--steps", str(args.steps),
           "--batch", str(args.batch), "--text-len", str(args.text_len),
           "--frozen-dtype", args.frozen_dtype] + (["--full"] if args.full else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the full PaliGemma 2 3B at 224 px")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up step")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument(
        "--frozen-dtype", default="auto",
        help="auto: the kit's choice for the device (float16 on a T4 as the colab, "
        "bfloat16 on newer GPUs/TPUs, float32 on CPU: XLA:CPU runs the backward pass of "
        "float16/bfloat16 matmuls through a slow path)",
    )  # fmt: skip
    ap.add_argument("--child", choices=["kit", "colab"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child, args.full, args.steps, args.batch, args.text_len,
                         args.frozen_dtype)  # fmt: skip

    from pali_kit import train as pt

    config = bench_config(args.full)
    what = "PaliGemma 2 3B-224" + ("" if args.full else " at full width, 2 + 2 layers")
    results = [spawn(impl, args) for impl in ("kit", "colab")]
    frozen = resolve_frozen(args.frozen_dtype).name
    plan = pt.plan(config, batch_size=args.batch, text_len=args.text_len, frozen_dtype=frozen,
                   tpu=False)  # fmt: skip
    device = results[0]["device"]
    on_device = results[0]["device_peak_gb"] is not None
    rows = []
    for r in results:
        peak = r["device_peak_gb"] if on_device else r["rss_gb"]
        rows.append({
            "step": "pali_kit" if r["impl"] == "kit" else "colab update_fn",
            "compile s": f"{r['compile_s']:.1f}",
            "step s (median)": f"{r['step_s']:.2f}",
            "CPU s / step": f"{r['cpu_s']:.1f}",
            "first loss": f"{r['loss0']:.5f}",
            "XLA temp GB": f"{r['temp_gb']:.2f}",
            ("device peak GB" if on_device else "peak RSS GB"): f"{peak:.2f}",
            "RSS before step GB": f"{r['rss_before_gb']:.2f}",
        })  # fmt: skip
    kit, colab = results
    table(rows, f"{what}: attention-only SGD, batch {args.batch}, text {args.text_len}, "
                f"frozen {frozen}, on {device}")  # fmt: skip
    print(f"\nstep time kit / colab: {kit['step_s'] / colab['step_s']:.2f} wall, "
          f"{kit['cpu_s'] / colab['cpu_s']:.2f} CPU time; "
          f"XLA temp kit / colab: {kit['temp_gb'] / colab['temp_gb']:.2f}; "
          f"train.plan() estimate for this setup: {plan.total / 1e9:.2f} GB on one device "
          f"(temporaries {plan.temp / 1e9:.2f} GB)")  # fmt: skip


if __name__ == "__main__":
    main()
