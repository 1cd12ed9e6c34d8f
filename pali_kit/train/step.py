"""One training step: the loss, the learning-rate schedule, the optimizer and the jitted step.

What one step does (``make_train_step``), as the reference colab and
big_vision's trainer::

    logits = model(image, text[:, :-1], mask_ar[:, :-1])          float32[B, T, V]
    nll    = -log softmax(logits)[text[:, 1:]]                    float32[B, T]
    loss   = mean_b( sum_t(nll * w) / max(sum_t(w), 1) ),  w = mask_loss[:, 1:]
    grads  = d loss / d (trainable weights only)
    update = optimizer(clip(grads))                                (frozen weights: none)

- ``next_token_loss`` / ``batch_loss``: the masked next-token loss above.
- ``learning_rate_schedule`` / ``bv_schedule``: big_vision's warmup + cosine;
  ``make_optimizer("sgd" | "adamw" | "adam" | an optax transform, ...)``.
  Only the trainable weights are given to the optimizer, so frozen weights
  get no optimizer state, no gradient and are never written: they stay
  bit-identical.
- ``TrainState`` / ``init_state``: the update count, the trainable weights
  and their optimizer state.
- ``make_train_step``: jitted, the state donated; gradient accumulation over
  ``accum_steps`` micro-batches; global-norm clipping; a guard that drops an
  update whose loss or gradient norm is not finite (the state comes back
  unchanged and ``Trainer`` raises ``NonFiniteLossError`` carrying it).
- Half-precision trainable weights (``Trainer(trainable_dtype="bfloat16")``):
  a trainable leaf stored in bfloat16 gets its gradient in bfloat16 (computed
  in float32 inside each matmul, rounded once), the optimizer's update in
  float32, and the new weight rounded back to bfloat16 by ``stochastic_round``
  (unbiased: an update far below the weight's precision survives on average
  instead of being rounded away). No float32 master copy is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..configs import PaliGemmaConfig
from ..model import PaliGemma
from .params import Params, merge_params

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


# ============================================================================ the train step


class TrainState(NamedTuple):
    """What a step updates: the update count, the trainable weights, the optimizer state."""

    step: jax.Array  # int32[], updates applied so far
    params: Params  # trainable leaves only (float32, or bfloat16: stochastic rounding)
    opt_state: Any  # optax state of those leaves (float32)


def init_state(trainable: Params, tx: optax.GradientTransformation) -> TrainState:
    """Update count 0, the weights, and the optimizer state of their float32 values.

    The optimizer works in float32 whatever the weights are stored in, so its
    state (momentum, Adam's moments) is float32 for bfloat16 weights too. Call
    it under ``jax.jit`` (``Trainer`` does) so no float32 copy of bfloat16
    weights is made.
    """
    wide = jax.tree.map(lambda p: p.astype(jnp.float32), trainable)  # float32: no-op
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(wide))


# ============================================================================ stochastic rounding


def stochastic_round(x, key) -> jax.Array:
    """float32[...] -> bfloat16[...] of the same shape, rounded stochastically (unbiased).

    bfloat16 is float32 with the low 16 of its 23 mantissa bits cut off, so a
    finite float32 ``x`` lies between two neighbouring bfloat16 values
    ``lo <= x < hi`` (toward zero / away from zero in magnitude) and, within
    one binade, ``|x| = |lo| + (r / 2^16) (|hi| - |lo|)`` where ``r`` is x's
    low 16 bits. With ``u`` uniform on {0, ..., 2^16 - 1} (from ``key``),
    ``bits(x) + u`` carries into bit 16 exactly when ``u >= 2^16 - r``, so::

        result = bits_to_float((bits(x) + u) & 0xFFFF0000)    # then exact in bfloat16
        P(result = hi) = r / 2^16,   E[result] = lo + (r / 2^16)(hi - lo) = x

    Signs are stored apart from the magnitude, so this holds for negative x;
    a carry into the exponent is the next binade's first value, as it should
    be; x already in bfloat16 (r = 0) is returned unchanged. Non-finite x is
    rounded to nearest (inf stays inf, NaN stays NaN).

    ``u`` comes from XLA's own generator (``RngBitGenerator``, Philox on CPU
    and GPU), seeded with 128 bits drawn from ``key``: it writes 2 bytes an
    element, once, where jax's default threefry makes several 4-byte arrays
    of x's size that XLA:CPU does not fuse. The draws are reproducible on one
    platform, not across platforms.
    """
    x = jnp.asarray(x, jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    philox = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    noise = jax.random.bits(philox, x.shape, jnp.uint16).astype(jnp.uint32)  # on [0, 2^16)
    up = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isfinite(x), up, x).astype(jnp.bfloat16)


def round_like(new: Params, like: Params, key) -> Params:
    """``new`` (float32 leaves) in the dtypes of ``like``: bfloat16 leaves stochastically,
    each with its own key (``fold_in(key, leaf index)``), float32 ones as they are."""
    leaves, treedef = jax.tree.flatten(new)
    dtypes = [x.dtype for x in jax.tree.leaves(like)]
    out = [
        stochastic_round(x, jax.random.fold_in(key, i)) if d == jnp.bfloat16 else x.astype(d)
        for i, (x, d) in enumerate(zip(leaves, dtypes, strict=True))
    ]
    return jax.tree.unflatten(treedef, out)


def rounding_key(seed: int, step) -> jax.Array:
    """The key of update ``step``'s rounding: ``fold_in(key(seed), step)`` (reproducible,
    so a resumed run draws what the uninterrupted one drew)."""
    return jax.random.fold_in(jax.random.key(seed), step)


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
    rounding_seed: int = 0,
):
    """``step(state, frozen, batch) -> (state, metrics)``, jitted with ``state`` donated.

    state: TrainState (trainable weights float32 or bfloat16: a bfloat16 leaf
    is updated in float32 and rounded back with ``stochastic_round``, keyed by
    ``rounding_key(rounding_seed, state.step)`` and the leaf); frozen: the other weights
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
            return jax.tree.map(lambda c, g: c + g.astype(jnp.float32), carry, (loss, grads)), None

        # micro-batch gradients (bfloat16 for bfloat16 weights) are summed in float32
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (jnp.float32(0), trainable))
        (loss, grads), _ = jax.lax.scan(add, zeros, _micro_batches(batch, accum_steps))
        return jax.tree.map(lambda x: x / accum_steps, (loss, grads))

    def step(state: TrainState, frozen: Params, batch) -> tuple[TrainState, dict]:
        batch = {k: v for k, v in batch.items() if not k.startswith("_")}
        loss, grads = loss_and_grads(state.params, frozen, batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # float32: no-op
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # the update in float32; bfloat16 weights are rounded back stochastically
        wide = jax.tree.map(lambda p: p.astype(jnp.float32), state.params)
        updates, opt_state = tx.update(grads, state.opt_state, wide)
        key = rounding_key(rounding_seed, state.step)
        params = round_like(optax.apply_updates(wide, updates), state.params, key)
        new = TrainState(state.step + 1, params, opt_state)
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
