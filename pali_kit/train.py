"""Fine-tuning PaliGemma: train a chosen subset of the real weights (no LoRA).

    import pali_kit as pk
    from pali_kit import data as pdata, train as pt

    config = pk.CHECKPOINTS["paligemma2-3b-pt-224"].config
    trainer = pt.Trainer.load("paligemma2-3b-pt-224.b16.npz", config,
                              trainable="attention", num_steps=64)    # the reference colab
    print(trainer.summary)   # 368,050,176 of 3,032,094,960 parameters trainable (12.1 %), ...
    train = pdata.Batcher(pdata.JsonlDataset("train.jsonl"), tok, batch_size=8,
                          text_len=128, image_size=224)
    val = pt.Evaluator(pdata.JsonlDataset("val.jsonl"), tok, metric="cider")
    history = trainer.fit(train, eval_every=16, evaluator=val, checkpoint="ft.npz")
    history.plot()                   # the loss curve (and the metric), a matplotlib Figure
    trainer.last_eval.draw()         # images with their predictions

What one step does (``make_train_step``), as the reference colab and
big_vision's trainer::

    logits = model(image, text[:, :-1], mask_ar[:, :-1])          float32[B, T, V]
    nll    = -log softmax(logits)[text[:, 1:]]                    float32[B, T]
    loss   = mean_b( sum_t(nll * w) / max(sum_t(w), 1) ),  w = mask_loss[:, 1:]
    grads  = d loss / d (trainable weights only)
    update = optimizer(clip(grads))                                (frozen weights: none)

Pieces, each usable on its own in a notebook:

- ``trainable_mask(params, "attention")`` -> (bool tree, one-line summary).
  Presets: ``"attention"`` (``llm/layers/attn/.*``, the colab), ``"llm"``,
  ``"img"``, ``"all"``; or a regex over the ``/``-joined key (full match), or
  a predicate ``(key, shape) -> bool``.
- Dtypes: trainable weights float32; frozen ones float16 on GPUs without
  bfloat16 (T4, V100, P100), bfloat16 on TPUs and newer GPUs, float32 on CPU
  (``default_frozen_dtype``). The model's matmuls cast activations to each
  weight's dtype and accumulate in float32.
- ``learning_rate_schedule`` / ``bv_schedule``: big_vision's warmup + cosine;
  ``make_optimizer("sgd" | "adamw" | "adam" | an optax transform, ...)``.
  Only the trainable weights are given to the optimizer, so frozen weights
  get no optimizer state, no gradient and are never written: they stay
  bit-identical.
- ``make_train_step``: jitted, the state donated; gradient accumulation over
  ``accum_steps`` micro-batches; global-norm clipping; a guard that drops an
  update whose loss or gradient norm is not finite (the state comes back
  unchanged and ``Trainer`` raises ``NonFiniteLossError`` carrying it).
- ``Evaluator``: greedy decoding of a validation split, the task metric
  (CIDEr, BLEU, VQA accuracy, ANLS, exact match, detection IoU/mAP or your
  function) and previews (image, prompt, prediction, reference).
- ``save_checkpoint`` / ``Trainer.restore`` / ``Trainer.load``: one ``.npz``
  with ``params/...`` (loads with ``pk.load`` like an official checkpoint),
  ``opt/...`` and ``train/step``. A resumed run reproduces the uninterrupted
  one: the step uses no randomness (no dropout in the released configs) and a
  ``data.Batcher`` makes batch k from (seed, k) alone, so ``fit`` restarts it
  at the checkpoint's step.
- ``plan(...)``: how much device memory a configuration needs (XLA's own
  analysis of the compiled step) and whether it fits a T4, L4, A100 or TPU.

Devices, sharding and multi-host (a README section)
---------------------------------------------------

The same step runs on one CPU, one GPU or a TPU host with 8 cores. All local
devices form a 1-D mesh with the axis ``"data"`` (``make_mesh()``):

- the batch is split along ``"data"`` (data parallel);
- every weight (and optimizer-state array) larger than 4 MiB is split along
  its largest dimension divisible by the number of devices (FSDP, big_vision's
  ``fsdp`` rule); smaller ones are replicated. XLA gathers each layer's
  weights when it needs them and reduce-scatters the gradients.

``load_for_training`` reads a checkpoint leaf by leaf and puts each leaf on
its devices with its sharding and training dtype as it is read, so host
memory beyond what the devices hold peaks near one leaf.

Multi-host (a TPU pod slice, several GPU hosts): call
``jax.distributed.initialize()`` first thing in every process, then run the
same notebook code on every host. ``make_mesh()`` then spans every device of
every host (``jax.devices()``), ``shard_batch`` turns each host's own batch
into its slice of the global batch (``jax.make_array_from_process_local_data``;
give each host a different shard of the data, e.g. ``Batcher(seed=...)`` over
``dataset[process_index::process_count]``), ``load_for_training`` builds each
global array from the slices each host reads (``jax.make_array_from_callback``)
and ``save_checkpoint`` gathers the shards and writes from process 0 only.
The jitted step is unchanged: it is one SPMD program over the global mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import checkpoints, decode
from .configs import PaliGemmaConfig, resolve_config
from .model import PaliGemma, count_params, inference_params, param_shapes

__all__ = [
    "TRAINABLE", "trainable_mask", "split_params", "merge_params", "default_frozen_dtype",
    "cast_params", "next_token_loss", "batch_loss", "bv_schedule", "learning_rate_schedule",
    "make_optimizer", "make_mesh", "fsdp_spec", "shardings_for", "shard_batch",
    "load_for_training", "TrainState", "init_state", "make_train_step", "NonFiniteLossError",
    "Trainer", "History", "Evaluator", "EvalResult", "Preview", "evaluate", "METRICS",
    "save_checkpoint", "read_training_state", "plot_history", "draw_previews", "Plan", "plan",
    "t4_advice", "DEVICES",
]  # fmt: skip

Params = dict[str, Any]

# ============================================================================ trainable subsets

TRAINABLE = {
    "attention": r"llm/layers/attn/.*",  # the reference colab: q, kv and output projections
    "llm": r"llm/.*",
    "img": r"img/.*",
    "all": r".*",
    "none": r"(?!)",
}


def _leaf_key(path) -> str:
    """A tree path -> the ``/``-joined checkpoint key (``llm/layers/attn/q_einsum/w``)."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
    return "/".join(parts)


def trainable_mask(params: Params, trainable="attention") -> tuple[Params, str]:
    """Which weights to train: a bool tree like ``params`` and a one-line summary.

    Args:
      params: the nested parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      trainable: a preset (``"attention"``, ``"llm"``, ``"img"``, ``"all"``), a
        regex that must match the whole ``/``-joined key (``"llm/layers/mlp/.*"``),
        a predicate ``(key, shape) -> bool``, or a bool tree (returned as is).
    Returns:
      ``(mask, summary)``; e.g. summary ``"368,050,176 of 3,032,094,960
      parameters trainable (12.1 %), 3 of 34 arrays: llm/layers/attn/.*"``.
    """
    if isinstance(trainable, Mapping):
        mask, what = trainable, "a given mask"
    else:
        predicate, what = _predicate(trainable)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, x: bool(predicate(_leaf_key(path), tuple(x.shape))), params
        )
    flags = jax.tree.leaves(mask)
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(params)]
    if len(flags) != len(sizes):
        raise ValueError("the trainable mask does not have the parameters' tree structure")
    n_train = sum(s for s, f in zip(sizes, flags) if f)
    if not any(flags) and trainable != "none":
        raise ValueError(
            f"trainable={trainable!r} matches no parameter. Keys look like "
            "'llm/layers/attn/q_einsum/w' and a regex must match a whole key "
            "(end it with '.*'); presets: " + ", ".join(TRAINABLE)
        )
    total = sum(sizes)
    summary = (
        f"{n_train:,} of {total:,} parameters trainable ({100 * n_train / max(total, 1):.1f} %), "
        f"{sum(flags)} of {len(flags)} arrays: {what}"
    )
    return mask, summary


def _predicate(trainable) -> tuple[Callable[[str, tuple], bool], str]:
    if callable(trainable):
        return trainable, getattr(trainable, "__name__", "a predicate")
    if not isinstance(trainable, str):
        raise TypeError(
            f"trainable must be a preset name, a regex, a predicate or a bool tree, "
            f"got {type(trainable).__name__}"
        )
    pattern = TRAINABLE.get(trainable, trainable)
    if pattern.startswith("/"):
        raise ValueError(f"trainable={trainable!r}: keys never start with '/' (llm/..., img/...)")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"trainable={trainable!r} is neither a preset nor a valid regex: {e}"
        ) from None
    return (lambda key, shape: regex.fullmatch(key) is not None), pattern


def split_params(params: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts holding only their own leaves."""
    flat, flags = checkpoints.flatten(params), checkpoints.flatten(mask)
    trainable = {k: v for k, v in flat.items() if flags[k]}
    frozen = {k: v for k, v in flat.items() if not flags[k]}
    return checkpoints.unflatten(trainable), checkpoints.unflatten(frozen)


def merge_params(*trees: Params) -> Params:
    """The union of nested dicts with disjoint leaves (the inverse of ``split_params``)."""
    flat = {}
    for tree in trees:
        flat.update(checkpoints.flatten(tree))
    return checkpoints.unflatten(flat)


# ============================================================================ dtypes

# GPUs without bfloat16 arithmetic: frozen weights go to float16 there (the colab's choice).
NO_BF16_GPUS = ("T4", "V100", "P100", "P40", "P4", "K80", "M60", "GTX 10", "RTX 20")


def default_frozen_dtype(device=None, *, cpu="float32") -> np.dtype:
    """The dtype for frozen weights on a device (default: the first JAX device).

    T4 / V100 / P100 (no bfloat16): float16. TPUs, A100, H100, L4, ...: bfloat16.
    CPU: ``cpu`` (float32 by default; "bfloat16" halves memory and is faster
    on CPUs with AVX-512 BF16).
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return checkpoints.as_dtype(cpu)
    kind = device.device_kind
    if any(name in kind for name in NO_BF16_GPUS):
        return np.dtype(np.float16)
    return np.dtype(ml_dtypes.bfloat16)


def _training_dtype(trainable: bool, frozen_dtype, current) -> np.dtype:
    if not jnp.issubdtype(current, jnp.floating):
        return np.dtype(current)
    return np.dtype(np.float32) if trainable else np.dtype(frozen_dtype)


def cast_params(params: Params, mask: Params, frozen_dtype=None) -> Params:
    """Trainable leaves to float32, frozen ones to ``frozen_dtype`` (default: the device's)."""
    frozen_dtype = checkpoints.as_dtype(frozen_dtype) or default_frozen_dtype()
    return jax.tree.map(
        lambda x, t: x.astype(_training_dtype(t, frozen_dtype, x.dtype)), params, mask
    )


# ============================================================================ loss


def next_token_loss(logits, targets, weights, *, label_smoothing: float = 0.0):
    """Masked next-token NLL, normalised per example, then averaged over the batch.

    Args:
      logits: float[B, T, V] predictions for each position.
      targets: int[B, T] the next tokens (``text[:, 1:]``).
      weights: [B, T] which targets count (``mask_loss[:, 1:]``).
      label_smoothing: eps; the target gets ``1 - eps``, every other token
        ``eps / (V - 1)`` (big_vision's rule).
    Returns:
      ``(loss float32[], per_example float32[B])`` with
      ``per_example[b] = sum_t(nll * w) / max(sum_t(w), 1)``.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # no [B, T, V] log-softmax is kept
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        v, eps = logits.shape[-1], label_smoothing
        others = v * lse - jnp.sum(logits, axis=-1) - nll  # -sum of the other log-probs
        nll = (1.0 - eps) * nll + eps / (v - 1) * others
    weights = weights.astype(jnp.float32)
    per_example = jnp.sum(nll * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    return jnp.mean(per_example), per_example


def batch_loss(
    params: Params,
    batch: Mapping[str, jax.Array],
    config: PaliGemmaConfig,
    *,
    remat: bool = True,
    label_smoothing: float = 0.0,
):
    """The training loss of one batch: ``(loss float32[], per_example float32[B])``.

    batch: ``image`` float[B, S, S, 3]; ``text``, ``mask_ar``, ``mask_loss``
    int[B, T + 1]; optional ``mask_input`` bool[B, T + 1] (padding is also
    kept out by ``mask_ar = 1`` on it, as in the reference).
    """
    text, mask_input = batch["text"], batch.get("mask_input")
    model = PaliGemma(config, scan=True, remat=remat)
    logits = model.apply(
        {"params": params}, batch["image"], text[:, :-1], batch["mask_ar"][:, :-1],
        None if mask_input is None else mask_input[:, :-1],
    )  # fmt: skip
    return next_token_loss(
        logits, text[:, 1:], batch["mask_loss"][:, 1:], label_smoothing=label_smoothing
    )


# ============================================================================ schedule, optimizer


def _to_steps(x: float) -> int:
    """big_vision's rounding of a duration: nearest step, at least 1 unless 0."""
    return max(1, round(x)) if x else 0


def bv_schedule(
    total_steps: int,
    base: float,
    decay_type: str = "cosine",
    *,
    warmup_percent: float | None = None,
    warmup_steps: int | None = None,
    linear_end: float = 0.0,
) -> Callable:
    """big_vision's ``utils.create_learning_rate_schedule``: ``step -> lr`` (float32).

    Linear warmup ``lr * min(1, step / warmup_steps)`` times a decay over
    ``progress = clip((step - warmup) / (total - warmup), 0, 1)``: ``"cosine"``
    ``0.5 (1 + cos(pi progress))``, ``"linear"`` to ``linear_end``, or
    ``"constant"``. ``warmup_steps`` defaults to ``round(warmup_percent * total)``.
    The colab: ``bv_schedule(65, 0.03, warmup_percent=0.1)(1) == 0.005``.
    """
    if decay_type not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay_type={decay_type!r}: use 'cosine', 'linear' or 'constant'")
    if warmup_steps is None:
        warmup_steps = _to_steps(warmup_percent * total_steps) if warmup_percent else 0
    if total_steps > 1 and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be < total_steps={total_steps}")

    def lr_at(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        if decay_type == "cosine":
            lr = base * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "linear":
            lr = linear_end + (base - linear_end) * (1.0 - progress)
        else:
            lr = jnp.full_like(progress, base)
        if warmup_steps:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        return lr.astype(jnp.float32)

    return lr_at


def learning_rate_schedule(
    num_steps: int, lr: float = 0.03, *, warmup_percent: float = 0.10, decay: str = "cosine"
) -> Callable:
    """The colab's schedule for ``num_steps`` updates, indexed by optax's update count.

    Update ``k`` (0-based, what optax counts) uses big_vision's schedule at
    step ``k + 1`` with ``total_steps = num_steps + 1``, exactly as the colab
    (``total_steps=TRAIN_STEPS + 1``, steps 1..TRAIN_STEPS): 64 steps at 0.03
    give 0.005 for the first update, 0.03 after 6 warmup steps, then cosine.
    """
    schedule = bv_schedule(num_steps + 1, lr, decay, warmup_percent=warmup_percent)
    return lambda count: schedule(count + 1)


def make_optimizer(
    name="sgd",
    *,
    num_steps: int,
    lr: float | None = None,
    warmup_percent: float = 0.10,
    decay: str = "cosine",
    momentum: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> tuple[optax.GradientTransformation, Callable]:
    """An optax optimizer with the warmup + cosine schedule: ``(tx, schedule)``.

    name: ``"sgd"`` (plain ``p - lr * g``, the colab; lr 0.03), ``"adamw"``
    (decoupled ``weight_decay``, scaled by the schedule as optax does) or
    ``"adam"`` (lr 1e-5 as big_vision's forkme.py), or any
    ``optax.GradientTransformation`` (used as is, after clipping).
    clip_norm: clip gradients to this global norm first (forkme.py: 1.0).
    """
    if isinstance(name, optax.GradientTransformation):
        tx, schedule = name, None
    else:
        lr = lr if lr is not None else {"sgd": 0.03}.get(name, 1e-5)
        schedule = learning_rate_schedule(num_steps, lr, warmup_percent=warmup_percent, decay=decay)
        if name == "sgd":
            tx = optax.sgd(schedule, momentum=momentum)
        elif name == "adamw":
            tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        elif name == "adam":
            tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
        else:
            raise ValueError(
                f"optimizer {name!r}: use 'sgd', 'adamw', 'adam' or an optax transform"
            )
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx, schedule


# ============================================================================ devices and sharding

MIN_SHARD_BYTES = 4 * 2**20  # big_vision's fsdp rule: smaller arrays are replicated


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with the axis ``"data"`` over ``devices`` (default: all of them)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def fsdp_spec(shape, nbytes: int, n: int, min_bytes: int = MIN_SHARD_BYTES) -> P:
    """big_vision's fsdp rule for one array over ``n`` devices.

    Larger than ``min_bytes``: split its largest dimension divisible by ``n``
    (ties: the later axis) along ``"data"``; otherwise (or when none divides)
    replicated, ``P()``.
    """
    if n <= 1 or nbytes <= min_bytes:
        return P()
    for axis in np.argsort(shape, kind="stable")[::-1]:
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = "data"
            return P(*spec)
    return P()


def shardings_for(tree, mesh: Mesh, min_bytes: int = MIN_SHARD_BYTES):
    """A NamedSharding per leaf (arrays or ShapeDtypeStructs) by ``fsdp_spec``."""
    n = mesh.shape["data"]

    def one(x):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        return NamedSharding(mesh, fsdp_spec(tuple(x.shape), nbytes, n, min_bytes))

    return jax.tree.map(one, tree)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's batch -> global arrays split along ``"data"`` (keys starting "_" dropped).

    On one host the batch is the global batch; with several hosts each gives
    its own rows (``jax.make_array_from_process_local_data``).
    """
    sharding = NamedSharding(mesh, P("data"))
    n = mesh.shape["data"]
    out = {}
    for key, value in batch.items():
        if key.startswith("_"):
            continue
        value = np.asarray(value)
        rows = value.shape[0] * jax.process_count()
        if rows % n:
            raise ValueError(
                f"batch size {rows} is not divisible by the {n} devices of the mesh: "
                f"use a multiple of {n}"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every host) -> a global array with ``sharding``."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_for_training(
    path,
    *,
    trainable="attention",
    frozen_dtype=None,
    mesh: Mesh | None = None,
    min_shard_bytes: int = MIN_SHARD_BYTES,
    progress: bool | None = None,
) -> tuple[Params, Params, str]:
    """Load a .npz straight into training dtypes and shardings: ``(params, mask, summary)``.

    Leaf by leaf, largest first: each array is cast (trainable float32,
    frozen ``frozen_dtype``, default ``default_frozen_dtype()``) and put on
    its devices with its FSDP sharding as soon as it is read, so host memory
    peaks near one leaf. Training checkpoints (``params/``, ``opt/``) load too.
    """
    mesh = mesh or make_mesh()
    frozen_dtype = checkpoints.as_dtype(frozen_dtype) or default_frozen_dtype()
    keys = checkpoints.checkpoint_keys(path)
    shapes = {
        k: jax.ShapeDtypeStruct(s, d)
        for k, (s, d) in keys.items()
        if k.startswith(("img/", "llm/"))
    }
    mask, summary = trainable_mask(checkpoints.unflatten(shapes), trainable)
    flags = checkpoints.flatten(mask)

    def place(key, array):
        dtype = _training_dtype(flags[key], frozen_dtype, array.dtype)
        array = array.astype(dtype, copy=False)
        target = jax.ShapeDtypeStruct(array.shape, dtype)
        return _place(array, shardings_for(target, mesh, min_shard_bytes))

    params = checkpoints.load_params(path, place=place, progress=progress)
    return params, mask, summary


# ============================================================================ the train step


class TrainState(NamedTuple):
    """What a step updates: the update count, the trainable weights, the optimizer state."""

    step: jax.Array  # int32[], updates applied so far
    params: Params  # trainable leaves only (float32)
    opt_state: Any  # optax state of those leaves


def init_state(trainable: Params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss or gradient; its update was not applied.

    Attributes: ``step`` (1-based number of the failed update), ``loss``,
    ``grad_norm``, ``state`` (the last good TrainState, unchanged by the
    failed step) and ``trainer`` (when raised by a Trainer, which keeps that
    state too: ``trainer.params`` and ``trainer.save(...)`` still work).
    """

    def __init__(self, step: int, loss: float, grad_norm: float, state=None, trainer=None):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        self.state, self.trainer = state, trainer
        super().__init__(
            f"step {step}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite, "
            f"so this update was NOT applied and training stopped. The last good state (after "
            f"step {step - 1}) is kept: error.state, or trainer.params / trainer.save(path). "
            "Check the batch for NaN/inf (images, labels), or lower the learning rate / set "
            "clip_norm."
        )


def _micro_batches(batch, k: int):
    """[B, ...] -> [k, B/k, ...]: micro-batch j takes rows j, j+k, j+2k, ... (so each
    one still spans every device of a data-parallel batch)."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    config: PaliGemmaConfig,
    tx: optax.GradientTransformation,
    *,
    schedule: Callable | None = None,
    accum_steps: int = 1,
    remat: bool = True,
    label_smoothing: float = 0.0,
    state_shardings=None,
    jit: bool = True,
):
    """``step(state, frozen, batch) -> (state, metrics)``, jitted with ``state`` donated.

    state: TrainState (trainable weights float32); frozen: the other weights
    (never written); batch: global arrays (``shard_batch``). With
    ``accum_steps = k`` the batch is split into k micro-batches whose
    gradients are averaged (same result as one batch, less activation memory).
    If the loss or the gradient norm is not finite, the returned state is the
    input state: nothing is applied. metrics: ``loss``, ``grad_norm``, ``lr``
    (of this update), ``ok`` (bool: applied). ``state_shardings`` (a tree of
    NamedSharding like the state) pins the output state's placement.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def loss_of(trainable, frozen, batch):
        params = merge_params(trainable, frozen)
        return batch_loss(params, batch, config, remat=remat, label_smoothing=label_smoothing)[0]

    grad_fn = jax.value_and_grad(loss_of)

    def loss_and_grads(trainable, frozen, batch):
        if accum_steps == 1:
            return grad_fn(trainable, frozen, batch)

        def add(carry, micro):
            loss, grads = grad_fn(trainable, frozen, micro)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
        (loss, grads), _ = jax.lax.scan(add, zeros, _micro_batches(batch, accum_steps))
        return jax.tree.map(lambda x: x / accum_steps, (loss, grads))

    def step(state: TrainState, frozen: Params, batch) -> tuple[TrainState, dict]:
        batch = {k: v for k, v in batch.items() if not k.startswith("_")}
        loss, grads = loss_and_grads(state.params, frozen, batch)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        ok = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_norm))
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)  # guard: keep old
        lr = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
        return new, {"loss": loss, "grad_norm": grad_norm, "lr": lr, "ok": ok}

    if not jit:
        return step
    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    replicated = NamedSharding(mesh, P())
    metric_shardings = dict.fromkeys(("loss", "grad_norm", "lr", "ok"), replicated)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, metric_shardings))


# ============================================================================ the trainer


@dataclasses.dataclass
class History:
    """What a run logged: one entry per update, and the evaluations."""

    step: list[int] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)
    grad_norm: list[float] = dataclasses.field(default_factory=list)
    lr: list[float] = dataclasses.field(default_factory=list)
    evals: list[tuple[int, dict]] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)

    def add(self, step: int, metrics: Mapping[str, float], seconds: float) -> None:
        self.step.append(step)
        self.loss.append(metrics["loss"])
        self.grad_norm.append(metrics["grad_norm"])
        self.lr.append(metrics["lr"])
        self.seconds.append(seconds)

    def plot(self, **kw):
        return plot_history(self, **kw)


class Trainer:
    """Fine-tune a PaliGemma: owns the train state, the frozen weights and the step.

    Args:
      params: the full nested parameter tree (any dtypes; see ``load_for_training``).
      config: the model config.
      trainable: which weights to train (see ``trainable_mask``).
      num_steps: updates the schedule spans (and ``fit`` runs by default).
      optimizer, lr, warmup_percent, decay, momentum, weight_decay, clip_norm:
        see ``make_optimizer`` (default: the colab's SGD, lr 0.03, 10 % warmup, cosine).
      accum_steps: micro-batches per update (gradient accumulation).
      label_smoothing: see ``next_token_loss``.
      frozen_dtype: frozen weights' dtype (default ``default_frozen_dtype()``).
      remat: recompute layer activations in the backward pass (less memory).
      mesh: the device mesh (default: every device, ``make_mesh()``).
      min_shard_bytes: the FSDP threshold (4 MiB).
      copy: copy the trainable weights (default True): each step donates the
        trainer's copy, so the tree you passed stays valid.

    Attributes: ``state`` (TrainState), ``frozen``, ``mask``, ``summary``,
    ``history``, ``last_eval``; ``params`` is the full tree, current.
    """

    def __init__(
        self,
        params: Params,
        config: PaliGemmaConfig,
        *,
        trainable="attention",
        num_steps: int,
        optimizer="sgd",
        lr: float | None = None,
        warmup_percent: float = 0.10,
        decay: str = "cosine",
        momentum: float | None = None,
        weight_decay: float = 0.0,
        clip_norm: float | None = None,
        accum_steps: int = 1,
        label_smoothing: float = 0.0,
        frozen_dtype=None,
        remat: bool = True,
        mesh: Mesh | None = None,
        min_shard_bytes: int = MIN_SHARD_BYTES,
        copy: bool = True,
    ):
        self.config, self.num_steps = config, num_steps
        self.mesh = mesh or make_mesh()
        self.min_shard_bytes = min_shard_bytes
        self.frozen_dtype = checkpoints.as_dtype(frozen_dtype) or default_frozen_dtype()
        self.mask, self.summary = trainable_mask(params, trainable)
        optimizer_args = dict(
            name=optimizer, num_steps=num_steps, lr=lr, warmup_percent=warmup_percent,
            decay=decay, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm,
        )  # fmt: skip
        self.tx, self.schedule = make_optimizer(**optimizer_args)
        trainable_params, frozen = split_params(params, self.mask)
        self.frozen = self._put(frozen, self.frozen_dtype, copy=False)
        trainable_params = self._put(trainable_params, np.float32, copy=copy)
        init = functools.partial(init_state, tx=self.tx)
        shardings = self._shardings(jax.eval_shape(init, trainable_params))
        self.state = jax.jit(init, out_shardings=shardings)(trainable_params)
        self._step = _cached_train_step(
            config, tuple(optimizer_args.items()), accum_steps, remat, label_smoothing,
            _hashable_tree(shardings),
        )  # fmt: skip
        self.history = History()
        self.last_eval: EvalResult | None = None

    @classmethod
    def load(cls, path, config: PaliGemmaConfig | None = None, *, trainable="attention",
             frozen_dtype=None, mesh=None, min_shard_bytes=MIN_SHARD_BYTES,
             **kw) -> Trainer:  # fmt: skip
        """A Trainer from a .npz (official or a training checkpoint, then resumed).

        Loads leaf by leaf into training dtypes and shardings (``load_for_training``)
        without extra copies; config defaults to the one inferred from the shapes.
        """
        mesh = mesh or make_mesh()
        params, _, _ = load_for_training(
            path, trainable=trainable, frozen_dtype=frozen_dtype, mesh=mesh,
            min_shard_bytes=min_shard_bytes,
        )  # fmt: skip
        config = config or checkpoints.infer_config(params, str(path))
        trainer = cls(params, config, trainable=trainable, frozen_dtype=frozen_dtype, mesh=mesh,
                      min_shard_bytes=min_shard_bytes, copy=False, **kw)  # fmt: skip
        del params
        if "train/step" in checkpoints.checkpoint_keys(path):
            trainer.restore(path, params=False)
        return trainer

    # --- placement ----------------------------------------------------------------------
    def _shardings(self, tree):
        return shardings_for(tree, self.mesh, self.min_shard_bytes)

    def _put(self, tree: Params, dtype, *, copy: bool) -> Params:
        """Cast floating leaves to ``dtype`` and place them with their FSDP shardings.

        copy=True always makes new device arrays (the step donates them).
        """

        def one(x):
            target = jax.ShapeDtypeStruct(x.shape, _training_dtype(False, dtype, x.dtype))
            sharding = shardings_for(target, self.mesh, self.min_shard_bytes)
            return jax.device_put(
                x.astype(target.dtype), sharding, may_alias=False if copy else None
            )

        return jax.tree.map(one, tree)

    def _put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self._shardings(state))

    # --- the weights ----------------------------------------------------------------------
    @property
    def params(self) -> Params:
        """The full parameter tree: trainable (float32, current) + frozen weights."""
        return merge_params(self.state.params, self.frozen)

    @property
    def step_count(self) -> int:
        return int(self.state.step)

    # --- training -----------------------------------------------------------------------
    def step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One update on a host batch; returns ``loss``, ``grad_norm``, ``lr`` as floats.

        Raises NonFiniteLossError (nothing applied, state kept) on a non-finite loss.
        """
        start = time.perf_counter()
        self.state, metrics = self._step(self.state, self.frozen, shard_batch(batch, self.mesh))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step = int(self.state.step) + (0 if metrics["ok"] else 1)
        if not metrics["ok"]:
            raise NonFiniteLossError(step, metrics["loss"], metrics["grad_norm"], self.state, self)
        self.history.add(step, metrics, time.perf_counter() - start)
        return metrics

    def fit(
        self,
        batches,
        *,
        num_steps: int | None = None,
        evaluator: Callable | None = None,
        eval_every: int | None = None,
        checkpoint=None,
        checkpoint_every: int | None = None,
        progress: bool = True,
    ) -> History:
        """Train until ``num_steps`` updates in total (default: the schedule's).

        batches: a ``data.Batcher`` (resumes at the trainer's step on its own)
        or any iterable of host batches. evaluator: ``Evaluator`` or
        ``f(params, config) -> EvalResult | dict``, run every ``eval_every``
        steps and at the end. checkpoint: a path written atomically every
        ``checkpoint_every`` steps (default: at evals) and at the end.
        """
        end = self.num_steps if num_steps is None else num_steps
        start = self.step_count
        if hasattr(batches, "iterate"):
            batches = batches.iterate(start_step=start)
        batches = iter(batches)
        checkpoint_every = checkpoint_every or eval_every
        due = lambda step, every: step == end or bool(every and step % every == 0)
        bar = _progress_bar(start, end, progress)
        try:
            for _ in range(start, end):
                batch = next(batches, None)
                if batch is None:
                    break  # the data ran out
                metrics = self.step(batch)
                step = self.step_count
                postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.3g}"}
                if evaluator is not None and due(step, eval_every):
                    result = self.evaluate(evaluator)
                    postfix[result.metric] = f"{result.score:.4g}"
                if checkpoint and due(step, checkpoint_every):
                    self.save(checkpoint)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(postfix, refresh=False)
        finally:
            if bar is not None:
                bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return self.history

    def evaluate(self, evaluator: Callable) -> EvalResult:
        """Run an evaluator on the current weights; the result is logged in ``history``."""
        result = evaluator(self.params, self.config)
        if not isinstance(result, EvalResult):
            scores = dict(result) if isinstance(result, Mapping) else {"score": float(result)}
            result = EvalResult(scores, [], [], [])
        result.step = self.step_count
        self.history.evals.append((result.step, dict(result.scores)))
        self.last_eval = result
        return result

    # --- checkpoints ----------------------------------------------------------------------
    def save(self, path, extra: Mapping[str, np.ndarray] | None = None) -> Path:
        """Params, optimizer state, step and loss history in one .npz (atomic)."""
        history = {
            "train/history/step": np.asarray(self.history.step, np.int64),
            "train/history/loss": np.asarray(self.history.loss, np.float32),
        }
        return save_checkpoint(path, self.state, self.frozen, extra={**history, **(extra or {})})

    def restore(self, path, *, params: bool = True) -> Trainer:
        """Continue from a checkpoint written by ``save``: weights, optimizer state, step.

        params=False keeps the current weights (already loaded) and restores
        the rest. The optimizer and trainable subset must be the ones it was saved with.
        """
        if params:
            dtypes = jax.tree.map(lambda x: x.dtype, self.params)
            shardings = self._shardings(self.params)
            flat_d, flat_s = checkpoints.flatten(dtypes), checkpoints.flatten(shardings)

            def place(key, array):
                if key not in flat_d:
                    raise checkpoints.CheckpointError(f"{path}: unexpected parameter {key}")
                return _place(array.astype(flat_d[key], copy=False), flat_s[key])

            loaded = checkpoints.load_params(path, place=place)
            trainable, self.frozen = split_params(loaded, self.mask)
        else:
            trainable = self.state.params
        step, opt_state, history = read_training_state(path, self.state.opt_state)
        self.state = self._put_state(TrainState(jnp.asarray(step, jnp.int32), trainable, opt_state))
        self.history = History()
        for s, loss in zip(history.get("step", []), history.get("loss", [])):
            self.history.add(
                int(s), {"loss": float(loss), "grad_norm": math.nan, "lr": math.nan}, 0
            )
        return self


def _hashable_tree(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=16)
def _cached_train_step(config, optimizer_args, accum_steps, remat, label_smoothing, shardings):
    """One jitted step per setting, so a new Trainer with the same setup reuses the compile."""
    tx, schedule = make_optimizer(**dict(optimizer_args))
    treedef, leaves = shardings
    return make_train_step(
        config, tx, schedule=schedule, accum_steps=accum_steps, remat=remat,
        label_smoothing=label_smoothing, state_shardings=jax.tree.unflatten(treedef, leaves),
    )  # fmt: skip


def _progress_bar(start: int, end: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc="training", unit="step")


# ============================================================================ checkpoints


def _path_name(path) -> str:
    return _leaf_key(path) or "_"


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array -> a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_checkpoint(
    path, state: TrainState, frozen: Params, *, extra: Mapping[str, Any] | None = None
) -> Path | None:
    """Write ``params/...`` (all weights), ``opt/...``, ``train/step`` and ``extra`` to one .npz.

    Atomic (temporary file, fsync, rename). ``pk.load(path)`` and
    ``checkpoints.load_params(path)`` read it as an official checkpoint (they
    keep ``params/*``). Leaves are fetched one at a time; with several hosts
    every process must call this (the shards are gathered) and process 0 writes.
    """
    params = checkpoints.flatten(merge_params(state.params, frozen))
    opt = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    items = [(f"params/{k}", v) for k, v in params.items()]
    items += [(f"opt/{_path_name(p)}", v) for p, v in opt]
    items += [("train/step", state.step)] + list((extra or {}).items())
    arrays = ((key, _to_host(value)) for key, value in items)
    if jax.process_index() != 0:
        for _ in arrays:  # take part in the gathers, write nothing
            pass
        return None
    return checkpoints.save_arrays(arrays, path)


def read_training_state(path, opt_template) -> tuple[int, Any, dict[str, np.ndarray]]:
    """(step, optimizer state shaped like ``opt_template``, history arrays) from a checkpoint."""
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        if "train/step.npy" not in names and "train/step" not in names:
            raise checkpoints.CheckpointError(
                f"{path} has no train/step: it holds weights only (load it with "
                "Trainer.load or load_for_training to start a new run)"
            )
        step = int(npz["train/step"])
        leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_template)
        values = []
        for p, template in leaves:
            key = f"opt/{_path_name(p)}"
            if key not in npz.files:
                raise checkpoints.CheckpointError(
                    f"{path} has no {key}: was it saved with another optimizer or trainable set?"
                )
            value = npz[key]
            if value.shape != tuple(template.shape):
                raise checkpoints.CheckpointError(
                    f"{path}: {key} has shape {value.shape}, the optimizer expects {template.shape}"
                )
            values.append(value.astype(template.dtype, copy=False))
        history = {k.split("/")[-1]: npz[k] for k in npz.files if k.startswith("train/history/")}
    return step, jax.tree_util.tree_unflatten(treedef, values), history


# ============================================================================ evaluation


@dataclasses.dataclass
class Preview:
    """One validation example and what the model said: image float[S, S, 3] in [-1, 1]."""

    image: np.ndarray
    prompt: str
    prediction: str
    reference: str


@dataclasses.dataclass
class EvalResult:
    """Scores (the first is the main one), every prediction, and a few previews."""

    scores: dict[str, float]
    predictions: list[str]
    examples: list
    previews: list[Preview]
    step: int | None = None

    @property
    def metric(self) -> str:
        return next(iter(self.scores))

    @property
    def score(self) -> float:
        return self.scores[self.metric]

    def draw(self, **kw):
        """The previews as a matplotlib Figure (``draw_previews``)."""
        return draw_previews(self.previews, **kw)


def _references(example) -> list[str]:
    for key in ("answers", "references", "captions"):
        value = example.meta.get(key) if example.meta else None
        if isinstance(value, (list, tuple)) and value:
            return [str(v) for v in value]
    return [example.suffix]


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def _detection_scores(predictions, examples, size: int) -> dict[str, float]:
    """mAP (pycocotools) and mean best IoU per ground-truth box (same label)."""
    from . import metrics
    from .detection import parse_detections

    preds = [parse_detections(p, size, size) for p in predictions]
    gts = [parse_detections(e.suffix, size, size) for e in examples]
    ious = []
    for pred, gt in zip(preds, gts):
        for g in gt:
            same = [p.box for p in pred if p.label == g.label]
            ious.append(float(np.max(metrics.box_iou(g.box, np.asarray(same)))) if same else 0.0)
    return {"map": metrics.detection_map(preds, gts)["map"], "mean_iou": _mean(ious)}


def _metric_fns() -> dict[str, Callable]:
    from . import metrics

    refs = lambda examples: [_references(e) for e in examples]
    return {
        "cider": lambda p, e, s: {"cider": metrics.cider(p, refs(e))},
        "bleu": lambda p, e, s: {"bleu": metrics.bleu(p, refs(e))},
        "vqa": lambda p, e, s: {
            "vqa_accuracy": _mean(metrics.vqa_accuracy(x, r) for x, r in zip(p, refs(e)))
        },
        "anls": lambda p, e, s: {"anls": _mean(metrics.anls(x, r) for x, r in zip(p, refs(e)))},
        "exact_match": lambda p, e, s: {
            "exact_match": _mean(metrics.exact_match(x, r) for x, r in zip(p, refs(e)))
        },
        "detection": _detection_scores,
    }


METRICS = ("cider", "bleu", "vqa", "anls", "exact_match", "detection")


def evaluate(
    params: Params,
    config: PaliGemmaConfig,
    dataset: Sequence,
    tokenizer,
    *,
    metric="cider",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    text_len: int | None = None,
    num_previews: int = 4,
    max_examples: int | None = None,
) -> EvalResult:
    """Greedy-decode a validation split and score it.

    metric: one of ``METRICS`` or ``f(predictions, examples) -> float | dict``.
    References: ``example.meta["answers"]`` (or ``"references"``) when present,
    else ``example.suffix``. Detection boxes are compared in model pixels.
    """
    from . import data

    if max_examples is not None:
        dataset = [data.get_example(dataset, i) for i in range(min(max_examples, len(dataset)))]
    size = config.resolution
    run_params = inference_params(params)  # on CPU: per-layer views, no copies
    predictions, examples, previews = [], [], []
    batches = data.eval_batches(
        dataset, tokenizer, batch_size=batch_size, image_size=size, text_len=text_len
    )
    for batch, exs in batches:
        tokens, _ = decode.generate_tokens(
            config, run_params, batch["image"], batch["text"], batch["mask_input"],
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        for i, ex in enumerate(exs):
            text = tokenizer.decode(tokens[i]).strip()
            predictions.append(text)
            examples.append(ex)
            if len(previews) < num_previews:
                previews.append(Preview(batch["image"][i], ex.prefix, text, ex.suffix))
    if callable(metric):
        scores = metric(predictions, examples)
        scores = dict(scores) if isinstance(scores, Mapping) else {"score": float(scores)}
    else:
        fns = _metric_fns()
        if metric not in fns:
            raise ValueError(f"metric={metric!r}: use one of {METRICS} or a function")
        scores = fns[metric](predictions, examples, size)
    return EvalResult(scores, predictions, examples, previews)


@dataclasses.dataclass
class Evaluator:
    """``evaluate`` with its arguments bound: ``Evaluator(val, tok)(params, config)``."""

    dataset: Sequence
    tokenizer: Any
    metric: Any = "cider"
    batch_size: int = 8
    max_new_tokens: int = 32
    text_len: int | None = None
    num_previews: int = 4
    max_examples: int | None = None

    def __call__(self, params: Params, config: PaliGemmaConfig) -> EvalResult:
        return evaluate(
            params, config, self.dataset, self.tokenizer, metric=self.metric,
            batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            text_len=self.text_len, num_previews=self.num_previews,
            max_examples=self.max_examples,
        )  # fmt: skip


# ============================================================================ pictures


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_history(history: History, *, smooth: int = 10, figsize=(9, 3.2)):
    """Loss per step (raw and a running mean) and the evaluation scores; a Figure (headless)."""
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 2 if history.evals else 1, 1)
    steps, loss = np.asarray(history.step), np.asarray(history.loss, np.float64)
    ax.plot(steps, loss, color="0.75", lw=1, label="loss")
    if len(loss) >= smooth > 1:
        kernel = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1 :], np.convolve(loss, kernel, "valid"), lw=2,
                label=f"mean of {smooth}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right")
    if history.evals:
        ax2 = fig.add_subplot(1, 2, 2)
        for name in history.evals[0][1]:
            points = [(s, d[name]) for s, d in history.evals if name in d]
            ax2.plot(*zip(*points), marker="o", label=name)
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation")
        ax2.legend(loc="lower right")
    fig.tight_layout()
    return fig


def draw_previews(previews: Sequence[Preview], *, cols: int = 4, size: float = 3.0,
                  boxes: bool | None = None):  # fmt: skip
    """Each image with its prompt, prediction and reference (boxes drawn for detections)."""
    from . import viz
    from .detection import parse_detections

    pictures = []
    for p in previews:
        image = viz.to_pil(p.image)
        found = parse_detections(p.prediction, *image.size)
        if found and boxes is not False:
            image = viz.draw_detections(image, found)
        caption = f"{p.prompt}\n> {p.prediction}\nref: {p.reference}"
        pictures.append(viz.draw_caption(image, caption))
    return viz.show(pictures, cols=cols, size=size)


# ============================================================================ memory plan

GB = 1e9

# name -> (usable memory per device in bytes, devices the weights are sharded over)
DEVICES = {
    "T4 16 GB": (15.0 * 2**30, 1),  # Colab/Kaggle report 15 GiB usable
    "L4 24 GB": (22.0 * 2**30, 1),
    "A100 40 GB": (39.4 * 2**30, 1),
    "TPU v2-8 (8 GB/core)": (8 * 2**30, 8),
    "TPU v3-8 (16 GB/core)": (16 * 2**30, 8),
}
HEADROOM = 0.9  # "fits" below 90 % of the device: allocator, workspace, fragmentation


@dataclasses.dataclass(frozen=True)
class Plan:
    """Device memory one training step needs (bytes), from XLA's compiled-memory analysis.

    ``temp`` is XLA's scratch for the step (activations kept for the backward
    pass, gradients, logits); ``temp_per_core`` the same at the per-core batch
    of an 8-core TPU host, where weights and optimizer state are split 8 ways.
    """

    name: str
    trainable: str
    batch_size: int
    text_len: int
    optimizer: str
    frozen_dtype: str
    remat: bool
    num_params: int
    num_trainable: int
    frozen_bytes: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    temp: int
    temp_per_core: int | None
    largest_layer_bytes: int
    compile_seconds: float
    measured_on: str = ""

    @property
    def total(self) -> int:
        """One device holds everything: weights, optimizer state, batch and XLA temporaries."""
        return (self.frozen_bytes + self.trainable_bytes + self.optimizer_bytes
                + self.batch_bytes + self.temp)  # fmt: skip

    def per_core(self, cores: int = 8) -> int:
        """Per core when weights and optimizer state are FSDP-sharded over ``cores``.

        Adds one layer's gathered weights (what FSDP materialises at a time)
        to the per-core temporaries.
        """
        temp = self.temp_per_core if self.temp_per_core is not None else self.temp
        state = self.frozen_bytes + self.trainable_bytes + self.optimizer_bytes
        return state // cores + self.batch_bytes // cores + temp + self.largest_layer_bytes

    def need(self, device: str) -> int:
        capacity, cores = DEVICES[device]
        return self.total if cores == 1 else self.per_core(cores)

    def fits(self, device: str = "T4 16 GB") -> bool:
        return self.need(device) <= HEADROOM * DEVICES[device][0]

    def verdicts(self) -> list[tuple[str, float, float, str]]:
        """(device, GB needed, GB available, verdict) per device in ``DEVICES``."""
        rows = []
        for device, (capacity, _) in DEVICES.items():
            need = self.need(device)
            verdict = (
                "fits" if need <= HEADROOM * capacity else "tight" if need <= capacity else "no"
            )
            rows.append((device, need / GB, capacity / GB, verdict))
        return rows

    def table(self) -> str:
        lines = [
            f"{self.name}: train {self.trainable} ({self.num_trainable:,} of {self.num_params:,}"
            f" params), batch {self.batch_size}, text {self.text_len}, {self.optimizer}, "
            f"frozen {self.frozen_dtype}, remat {self.remat}; XLA temporaries measured on "
            f"{self.measured_on} in {self.compile_seconds:.0f} s",
            f"  frozen weights ({self.frozen_dtype:>8})   {self.frozen_bytes / GB:7.2f} GB",
            f"  trainable weights (float32)  {self.trainable_bytes / GB:7.2f} GB",
            f"  optimizer state              {self.optimizer_bytes / GB:7.2f} GB",
            f"  batch                        {self.batch_bytes / GB:7.2f} GB",
            f"  step temporaries (XLA)       {self.temp / GB:7.2f} GB"
            f"   (gradients {self.gradient_bytes / GB:.2f} GB, activations, logits)",
            f"  total on one device          {self.total / GB:7.2f} GB",
            "",
            f"  {'device':24} {'needs':>8} {'has':>8}  verdict",
        ]
        for device, need, has, verdict in self.verdicts():
            lines.append(f"  {device:24} {need:6.2f}GB {has:6.2f}GB  {verdict}")
        return "\n".join(lines)

    __str__ = table

    def _repr_pretty_(self, p, cycle):  # IPython shows the table
        p.text(self.table())


def _abstract_state(config, trainable, frozen_dtype, optimizer):
    """ShapeDtypeStructs for (state, frozen) and a description; allocates nothing."""
    shapes = param_shapes(config)
    mask, _ = trainable_mask(shapes, trainable)
    typed = jax.tree.map(
        lambda s, t: jax.ShapeDtypeStruct(s.shape, _training_dtype(t, frozen_dtype, s.dtype)),
        shapes, mask,
    )  # fmt: skip
    train_shapes, frozen_shapes = split_params(typed, mask)
    tx, schedule = make_optimizer(optimizer, num_steps=100)
    state = jax.eval_shape(lambda p: init_state(p, tx), train_shapes)
    return state, frozen_shapes, tx, schedule


def _abstract_batch(config, batch_size: int, text_len: int) -> dict:
    s, t = config.resolution, text_len + 1
    return {
        "image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
        "text": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
        "mask_ar": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
        "mask_loss": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
        "mask_input": jax.ShapeDtypeStruct((batch_size, t), jnp.bool_),
    }


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=64)
def _compiled_temp(config, trainable, frozen_dtype, optimizer, batch_size, text_len, remat,
                   accum_steps) -> tuple[int, float]:  # fmt: skip
    """XLA's temp bytes of the compiled train step on the default device, and compile seconds."""
    state, frozen, tx, schedule = _abstract_state(config, trainable, frozen_dtype, optimizer)
    step = make_train_step(config, tx, schedule=schedule, remat=remat, accum_steps=accum_steps)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, _abstract_batch(config, batch_size, text_len)).compile()
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes), time.perf_counter() - start


def plan(
    config_or_name,
    *,
    trainable="attention",
    batch_size: int = 8,
    text_len: int = 128,
    frozen_dtype="float16",
    optimizer="sgd",
    remat: bool = True,
    accum_steps: int = 1,
    tpu: bool = True,
) -> Plan:
    """Device memory to fine-tune a model, with a verdict per common device.

    Weights and optimizer state are counted from the shapes; the step's
    temporaries (activations kept for the backward pass, gradients, logits)
    come from XLA: ``jit(step).lower(abstract args).compile().memory_analysis()``
    on this machine's default device, with nothing allocated. On a CPU host
    the step is compiled with float32 frozen weights, because XLA:CPU adds
    float32 copies of float16/bfloat16 weights that GPUs and TPUs do not make;
    it then approximates an accelerator's numbers (same program, other fusion
    and layouts). On a GPU or TPU the real dtypes are compiled. ``tpu=True``
    also compiles at the per-core batch of an 8-core TPU host. Results are
    cached; PaliGemma-3B compiles in about 10 s (scan + remat: one layer).

    Example::

        print(pt.plan("paligemma2-3b-pt-224"))   # the colab on a T4: fits
    """
    config = resolve_config(config_or_name)
    name = config_or_name if isinstance(config_or_name, str) else config.family
    dtype = checkpoints.as_dtype(frozen_dtype)
    subset = _hashable_subset(config, trainable)
    state, frozen, _, _ = _abstract_state(config, subset, dtype, optimizer)
    compiled_dtype = np.dtype(np.float32) if jax.default_backend() == "cpu" else dtype
    compile_at = functools.partial(
        _compiled_temp, config, subset, compiled_dtype, optimizer, text_len=text_len,
        remat=remat, accum_steps=accum_steps,
    )  # fmt: skip
    temp, seconds = compile_at(batch_size=batch_size)
    per_core = None
    if tpu:
        per_core, more = compile_at(batch_size=max(1, -(-batch_size // 8)))
        # under FSDP each core keeps 1/8 of the gradients (reduce-scattered)
        per_core -= _nbytes(state.params) * 7 // 8
        seconds += more
    depth = config.llm.depth
    layer_bytes = sum(
        math.prod(x.shape[1:]) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(merge_params(state.params, frozen))
        if x.shape and x.shape[0] == depth
    )
    return Plan(
        name=name, trainable=trainable if isinstance(trainable, str) else subset.__name__,
        batch_size=batch_size, text_len=text_len,
        optimizer=optimizer if isinstance(optimizer, str) else "custom",
        frozen_dtype=np.dtype(dtype).name, remat=remat,
        num_params=count_params(state.params) + count_params(frozen),
        num_trainable=count_params(state.params), frozen_bytes=_nbytes(frozen),
        trainable_bytes=_nbytes(state.params), gradient_bytes=_nbytes(state.params),
        optimizer_bytes=_nbytes(state.opt_state),
        batch_bytes=_nbytes(_abstract_batch(config, batch_size, text_len)),
        temp=temp, temp_per_core=per_core, largest_layer_bytes=layer_bytes,
        compile_seconds=seconds, measured_on=jax.devices()[0].device_kind,
    )  # fmt: skip


class _Keys(tuple):
    """A hashable trainable predicate: exactly these keys (caches plans of custom subsets)."""

    def __call__(self, key: str, shape) -> bool:
        return key in self

    @property
    def __name__(self) -> str:
        return f"{len(self)} chosen arrays"


def _hashable_subset(config, trainable):
    if isinstance(trainable, str):
        return trainable
    mask, _ = trainable_mask(param_shapes(config), trainable)
    return _Keys(sorted(k for k, v in checkpoints.flatten(mask).items() if v))


def t4_advice(
    config_or_name,
    *,
    text_len: int = 128,
    frozen_dtype="float16",
    optimizer="sgd",
    subsets: Sequence[str] = ("all", "llm", "img", "attention"),
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    device: str = "T4 16 GB",
) -> str:
    """The largest trainable subset that fits a T4 (at batch 1), and its largest batch.

    Subsets whose weights, gradients and optimizer state alone exceed the
    device are ruled out without compiling. The batch is found from two
    compiles (batch 1 and 8; temporaries grow linearly with the batch) and
    checked with a third. Every compile is cached.
    """
    config = resolve_config(config_or_name)
    shapes = param_shapes(config)
    capacity = HEADROOM * DEVICES[device][0]
    frozen_size = np.dtype(checkpoints.as_dtype(frozen_dtype)).itemsize
    state_factor = 2 + (0 if optimizer == "sgd" else 2)  # weights + gradients (+ Adam's 2)
    kw = dict(text_len=text_len, frozen_dtype=frozen_dtype, optimizer=optimizer, tpu=False)
    best = None
    for subset in sorted(subsets, key=lambda s: -_count_trainable(shapes, s)):
        n = _count_trainable(shapes, subset)
        if n * 4 * state_factor + (count_params(shapes) - n) * frozen_size > capacity:
            continue
        if plan(config, trainable=subset, batch_size=1, **kw).fits(device):
            best = subset
            break
    if best is None:
        return f"{device}: nothing fits at batch 1 with text_len={text_len}"
    one, eight = (plan(config, trainable=best, batch_size=b, **kw) for b in (1, 8))
    per_example = max((eight.total - one.total) / 7, 1.0)
    fitting = [b for b in batch_sizes if one.total + (b - 1) * per_example <= capacity] or [1]
    largest = max(fitting)
    while largest > 1 and not plan(config, trainable=best, batch_size=largest, **kw).fits(device):
        largest = max([b for b in batch_sizes if b < largest] or [1])
    return (
        f"{device}: the largest trainable subset that fits is {best!r} "
        f"({_count_trainable(shapes, best):,} params); with it the largest batch is {largest} "
        f"(text_len={text_len}, {optimizer}, frozen {np.dtype(checkpoints.as_dtype(frozen_dtype)).name})"
    )


def _count_trainable(shapes, subset) -> int:
    mask, _ = trainable_mask(shapes, subset)
    return sum(
        math.prod(s.shape) for s, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)) if t
    )
