"""What fine-tuning a large PaliGemma fits on a free T4 / Kaggle's 2x T4, by ``pk.train.plan``.

    PYTHONPATH=. python scripts/plan_finetune.py [--model paligemma2-10b-pt-224] [--batch 4]
    PYTHONPATH=. python scripts/plan_finetune.py --check-on-device [--frozen int4] [--steps 2]

Prints (as markdown) the numbers quoted in docs/finetune.md (nothing is allocated: every
step is compiled abstractly, XLA's memory analysis gives the temporaries):
  1. the full plan of the ``attention`` subset (the colab's) at ``--batch``,
     frozen weights float16 / int8 / int4, with its verdict per device;
  2. one line per (frozen dtype, trainable subset): GB on one T4 and per
     device on 2x T4, at ``--batch``;
  3. ``t4_advice``: the largest subset (of those in 2.) that fits at batch
     >= ``--batch``, and its largest batch, on one T4 and on 2x T4;
  4. the whole attention on one T4: how far under (+) or over (-) the line;
  5. how long the compiles took on this host.

Each for the trainable weights in float32 and in bfloat16 (``--trainable-dtype``:
updated in float32, rounded back stochastically; 2 bytes a weight and a gradient).

``--check-on-device`` instead runs the plan's configuration for real on the
first device (``check_on_device``): random weights made on the device (frozen
matrices quantized, trainable attention in ``--trainable-dtype``), a few
``Trainer`` steps at ``--batch``, and one JSON line with the device's peak
memory next to the plan's total for that device (the plan compiled there, in
the real dtypes) and for a CPU host's plan of the same configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from pali_kit import train as pt

# largest first: the colab's subset, then single attention matrices, then smaller ones
SUBSETS = (
    "attention",
    "llm/layers/attn/(q_einsum|attn_vec_einsum)/w",
    "llm/layers/attn/q_einsum/w",
    "llm/layers/attn/attn_vec_einsum/w",
    "img",
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/.*",
    "img/head/.*",
)
ONE, TWO = "T4 16 GB", "2x T4 16 GB (Kaggle)"
FROZEN = ("float16", "int8", "int4")


def _random_leaf(key, shape, dtype, std: float):
    """A random array made on the device: ``std`` * normal, or random bytes for int8.

    XLA's own generator (``impl="rbg"``) writes each element once, so making a
    leaf needs no more device memory than the leaf (threefry would hold 4-byte
    words of its size).
    """
    import jax
    import jax.numpy as jnp

    key = jax.random.key(key, impl="rbg")
    if jnp.dtype(dtype) == jnp.int8:  # quantized values: any byte (int4: two nibbles)
        make = lambda k: jax.lax.bitcast_convert_type(  # noqa: E731
            jax.random.bits(k, shape, jnp.uint8), jnp.int8
        )
    else:
        make = lambda k: (jax.random.normal(k, shape, dtype) * std).astype(dtype)  # noqa: E731
    return jax.jit(make)(key)


def random_training_params(config, *, frozen="int4", trainable="attention",
                           trainable_dtype="bfloat16", frozen_dtype="float16"):  # fmt: skip
    """Random weights in a plan's layout, made leaf by leaf on the default device.

    Frozen large matrices are ``QArray``s whose int8 values (int4: packed
    nibbles) and float32 scales are drawn directly: no float copy of a frozen
    matrix is ever made. Other frozen leaves are ``frozen_dtype``, trainable
    ones ``trainable_dtype``. Largest leaves first, so a leaf's generator
    runs while the device holds least. Returns the nested tree.
    """
    import jax
    import numpy as np

    from pali_kit import checkpoints, quant
    from pali_kit.model import param_shapes

    shapes = param_shapes(config)
    mask, _ = pt.trainable_mask(shapes, trainable)
    flags = checkpoints.flatten(mask)
    dtype_of = {True: np.dtype(pt.check_trainable_dtype(trainable_dtype)),
                False: checkpoints.as_dtype(frozen_dtype)}  # fmt: skip
    typed = {k: jax.ShapeDtypeStruct(s.shape, dtype_of[flags[k]])
             for k, s in checkpoints.flatten(shapes).items()}  # fmt: skip
    if frozen in quant.SCHEMES:
        frozen_part = {k: v for k, v in typed.items() if not flags[k]}
        quantized = checkpoints.flatten(
            quant.abstract_quantize_params(checkpoints.unflatten(frozen_part), frozen)
        )
        typed.update(quantized)
    out = {}
    order = sorted(typed, key=lambda k: -sum(
        math.prod(x.shape) for x in jax.tree.leaves(typed[k])))  # fmt: skip
    for i, key in enumerate(order):
        spec = typed[key]
        std = 0.02 if not key.endswith(("scale", "bias")) else 0.0
        if isinstance(spec, quant.QArray):
            # dequantized weights of about std: |q| averages ~64 (int8) or ~4 (int4)
            scale = std / (64.0 if spec.scheme == "int8" else 4.0)
            values = _random_leaf(2 * i, spec.values.shape, np.int8, 0.0)
            scales = jax.numpy.full(spec.scales.shape, scale, spec.scales.dtype)
            out[key] = spec._replace(values, scales)
        else:
            out[key] = _random_leaf(2 * i + 1, spec.shape, spec.dtype, std)
    return checkpoints.unflatten(out)


def check_on_device(config_or_name="paligemma2-10b-pt-224", *, frozen="int4",
                    trainable="attention", trainable_dtype="bfloat16", batch_size=4,
                    text_len=128, steps=2, plan_on_cpu: float | None = None) -> dict:  # fmt: skip
    """Build the plan's configuration with random weights on the device, train ``steps`` steps.

    Returns (and the CLI prints as one JSON line): the device, the plan's
    total for one device as compiled here (real dtypes on a GPU/TPU),
    ``plan_on_cpu`` when given (GB), the bytes in use once the weights are
    made, the peak over the whole run (``memory_stats()["peak_bytes_in_use"]``;
    None on a CPU, whose devices keep no such count), XLA's temporaries of the
    Trainer's compiled step and the losses (random weights: finite is all
    that is asked).
    """
    import jax
    import numpy as np

    from pali_kit.configs import resolve_config

    config = resolve_config(config_or_name)
    start = time.perf_counter()
    plan = pt.plan(config, trainable=trainable, batch_size=batch_size, text_len=text_len,
                   frozen_dtype=frozen, trainable_dtype=trainable_dtype, tpu=False)  # fmt: skip
    plan_seconds = time.perf_counter() - start
    device = jax.devices()[0]

    def stats():
        return device.memory_stats() or {}

    params = random_training_params(config, frozen=frozen, trainable=trainable,
                                    trainable_dtype=trainable_dtype)  # fmt: skip
    jax.block_until_ready(params)
    built = stats()
    trainer = pt.Trainer(params, config, trainable=trainable, num_steps=max(steps, 2),
                         frozen_dtype="float16", trainable_dtype=trainable_dtype,
                         copy=False)  # fmt: skip
    del params
    rng = np.random.default_rng(0)
    s, t = config.resolution, text_len + 1
    batch = {
        "image": rng.uniform(-1, 1, (batch_size, s, s, 3)).astype(np.float32),
        "text": rng.integers(3, config.llm.vocab_size, (batch_size, t)).astype(np.int32),
        "mask_ar": (np.arange(t) >= t // 2).astype(np.int32)[None].repeat(batch_size, 0),
        "mask_loss": (np.arange(t) >= t // 2).astype(np.int32)[None].repeat(batch_size, 0),
        "mask_input": np.ones((batch_size, t), bool),
    }
    compiled = trainer._step.lower(
        trainer.state, trainer.frozen, pt.shard_batch(batch, trainer.mesh)
    ).compile()
    losses = []
    for _ in range(steps):
        try:
            losses.append(trainer.step(batch)["loss"])
        except pt.NonFiniteLossError as error:  # random weights: memory is what is checked
            losses.append(error.loss)
    after = stats()
    gb = lambda x: None if x is None else round(x / pt.GB, 3)  # noqa: E731
    return {
        "device": device.device_kind,
        "config": config_or_name if isinstance(config_or_name, str) else "custom",
        "frozen": frozen,
        "trainable": trainable,
        "trainable_dtype": trainable_dtype,
        "batch": batch_size,
        "text_len": text_len,
        "plan_total_gb_here": gb(plan.total),
        "plan_temp_gb_here": gb(plan.temp),
        "plan_seconds": round(plan_seconds, 1),
        "plan_total_gb_on_cpu": plan_on_cpu,
        "weights_gb": gb(plan.frozen_bytes + plan.trainable_bytes),
        "bytes_in_use_after_build_gb": gb(built.get("bytes_in_use")),
        "peak_after_build_gb": gb(built.get("peak_bytes_in_use")),
        "peak_bytes_in_use_gb": gb(after.get("peak_bytes_in_use")),
        "step_temp_gb": gb(compiled.memory_analysis().temp_size_in_bytes),
        "losses": [float(x) for x in losses],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="paligemma2-10b-pt-224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--trainable-dtype", nargs="+", choices=pt.TRAINABLE_DTYPES,
                        default=list(pt.TRAINABLE_DTYPES),
                        help="the trainable weights' dtypes to plan (--check-on-device: the "
                        "last one; default float32 bfloat16)")  # fmt: skip
    parser.add_argument(
        "--check-on-device",
        action="store_true",
        help="train --steps steps of the plan's configuration on the device",
    )
    parser.add_argument("--frozen", default="int4", choices=FROZEN,
                        help="frozen weights of --check-on-device")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--plan-on-cpu",
        type=float,
        default=None,
        help="GB a CPU host's plan gives (docs/finetune.md), printed alongside",
    )
    args = parser.parse_args()
    if args.check_on_device:
        result = check_on_device(args.model, frozen=args.frozen, batch_size=args.batch,
                                 text_len=args.text_len, steps=args.steps,
                                 trainable_dtype=args.trainable_dtype[-1],
                                 plan_on_cpu=args.plan_on_cpu)  # fmt: skip
        print(json.dumps(result))
        return
    kw = dict(batch_size=args.batch, text_len=args.text_len, optimizer="sgd")
    dtypes = args.trainable_dtype
    start = time.perf_counter()

    print(f"### 1. {args.model}, trainable 'attention', batch {args.batch}\n\n```")
    for dtype in dtypes:
        for frozen in FROZEN:
            plan = pt.plan(args.model, trainable="attention", frozen_dtype=frozen,
                           trainable_dtype=dtype, **kw)  # fmt: skip
            print(plan.table(), "\n")
    print("```\n")

    capacity = pt.DEVICES[ONE][0]
    print(f"### 2. GB needed at batch {args.batch} (text_len {args.text_len}, SGD); a T4 is "
          f"taken to have {capacity / 2**30:.2f} GiB = {capacity / pt.GB:.2f} GB usable, and "
          f"'fits' is at most {pt.HEADROOM:.0%} of it: {pt.HEADROOM * capacity / pt.GB:.2f} GB\n")  # fmt: skip
    print("| frozen | trainable dtype | trainable | params | one T4 | 2x T4, per device |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for frozen in FROZEN[1:]:
            for subset in SUBSETS:
                p = pt.plan(args.model, trainable=subset, frozen_dtype=frozen,
                            trainable_dtype=dtype, **kw)  # fmt: skip
                cells = [f"{p.need(d) / pt.GB:.2f} ({'fits' if p.fits(d) else 'no'})"
                         for d in (ONE, TWO)]  # fmt: skip
                name = subset.replace("|", "\\|")  # a regex's "|" inside a markdown cell
                print(f"| {frozen} | {dtype} | `{name}` | {p.num_trainable / 1e6:,.0f} M | "
                      f"{' | '.join(cells)} |")  # fmt: skip

    print(f"\n### 3. t4_advice (largest subset at batch >= {args.batch}, then its largest batch)")
    print("\n```")
    for device in (ONE, TWO):
        for dtype in dtypes:
            for frozen in FROZEN[1:]:
                print(pt.t4_advice(args.model, subsets=SUBSETS, frozen_dtype=frozen,
                                   device=device, text_len=args.text_len, min_batch=args.batch,
                                   trainable_dtype=dtype))  # fmt: skip
    print("```")

    print(f"\n### 4. The whole attention on one T4 at batch {args.batch}: the margin\n")
    print(
        "| frozen | trainable dtype | needs GB | under the 90 % line by | under the "
        "T4's usable memory by |"
    )
    print("|---|---|---|---|---|")
    for dtype in dtypes:
        for frozen in FROZEN[1:]:
            p = pt.plan(args.model, trainable="attention", frozen_dtype=frozen,
                        trainable_dtype=dtype, **kw)  # fmt: skip
            need = p.need(ONE)
            print(
                f"| {frozen} | {dtype} | {need / pt.GB:.2f} | "
                f"{(pt.HEADROOM * capacity - need) / pt.GB:+.2f} GB | "
                f"{(capacity - need) / pt.GB:+.2f} GB ({(capacity - need) / capacity:+.1%}) |"
            )

    worst = 15.0e9  # were the T4's "15 GB" decimal gigabytes (14.0 GiB), not 15.0 GiB
    p = pt.plan(args.model, trainable="attention", frozen_dtype="int4",
                trainable_dtype=dtypes[-1], **kw)  # fmt: skip
    print(f"\nWere a T4's usable memory {worst / pt.GB:.1f} GB rather than "
          f"{capacity / pt.GB:.2f} GB, its 90 % line would be {pt.HEADROOM * worst / pt.GB:.2f} "
          f"GB: int4 frozen, {dtypes[-1]} trainable needs {p.need(ONE) / pt.GB:.2f} GB, "
          f"{(p.need(ONE) - pt.HEADROOM * worst) / pt.GB:+.2f} GB over that line and "
          f"{(worst - p.need(ONE)) / pt.GB:.2f} GB under the whole {worst / pt.GB:.1f} GB.")  # fmt: skip

    elapsed = time.perf_counter() - start
    one = pt.plan(args.model, trainable="attention", frozen_dtype="int8", **kw)
    print(f"\n### 5. compile time on this host ({one.measured_on}): one plan of 'attention' int8 "
          f"(3 compiles: the batch, per-device batches of 2 and 8 devices) took "
          f"{one.compile_seconds:.0f} s; everything above {elapsed:.0f} s (a bfloat16 plan reuses "
          "the float32 plan's compiles on a CPU host)")  # fmt: skip


if __name__ == "__main__":
    main()
