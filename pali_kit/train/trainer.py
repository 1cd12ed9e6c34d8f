"""The ``Trainer`` (state, frozen weights, jitted step, ``fit``), its ``History`` and
``plot_history`` (the loss curve), checkpoints.

``Trainer(params, config, trainable="attention", num_steps=64)`` (or
``Trainer.load(path, ...)``) splits the weights (``params.py``), places them
on the mesh (``sharding.py``) and builds the cached jitted step
(``step.py``); ``fit`` runs it over batches with evaluations
(``evaluation.py``), checkpoints and a progress bar.

``save_checkpoint`` / ``Trainer.restore`` / ``Trainer.load``: one ``.npz``
with ``params/...`` (loads with ``pk.load`` like an official checkpoint),
``opt/...`` and ``train/step``. A resumed run reproduces the uninterrupted
one: the step uses no randomness (no dropout in the released configs) and a
``data.Batcher`` makes batch k from (seed, k) alone, so ``fit`` restarts it
at the checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from .. import checkpoints, quant
from ..configs import PaliGemmaConfig
from ..data import Batcher
from .distributed import ProcessBatches, gather_to_host, to_host
from .evaluation import EvalResult
from .params import (
    Params,
    check_trainable_dtype,
    default_frozen_dtype,
    leaf_key,
    merge_params,
    split_params,
    trainable_mask,
    training_dtype,
)
from .sharding import (
    MIN_SHARD_BYTES,
    host_to_global,
    load_for_training,
    make_mesh,
    shard_batch,
    shardings_for,
)
from .step import NonFiniteLossError, TrainState, init_state, make_optimizer, make_train_step

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
      trainable_dtype: the trainable weights' dtype, ``"float32"`` (default) or
        ``"bfloat16"``: half the memory for them and their gradients; each
        update is computed in float32 and rounded back stochastically
        (``stochastic_round``, keyed by ``rounding_seed`` and the step).
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
        trainable_dtype=None,
        rounding_seed: int = 0,
        remat: bool = True,
        mesh: Mesh | None = None,
        min_shard_bytes: int = MIN_SHARD_BYTES,
        copy: bool = True,
    ):
        self.config, self.num_steps = config, num_steps
        self.mesh = mesh or make_mesh()
        self.min_shard_bytes = min_shard_bytes
        self.frozen_dtype = checkpoints.as_dtype(frozen_dtype) or default_frozen_dtype()
        self.trainable_dtype = check_trainable_dtype(trainable_dtype)
        self.mask, self.summary = trainable_mask(params, trainable)
        optimizer_args = dict(
            name=optimizer, num_steps=num_steps, lr=lr, warmup_percent=warmup_percent,
            decay=decay, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm,
        )  # fmt: skip
        self.tx, self.schedule = make_optimizer(**optimizer_args)
        trainable_params, frozen = split_params(params, self.mask)
        trainable_params = quant.dequantize_params(trainable_params)  # trainable: float
        self.frozen = self._put(frozen, self.frozen_dtype, copy=False)
        trainable_params = self._put(trainable_params, self.trainable_dtype, copy=copy)
        init = functools.partial(init_state, tx=self.tx)
        shardings = self._shardings(jax.eval_shape(init, trainable_params))
        # the weights placed above are the trainer's own (copy=True) or handed over (copy=False,
        # donated by the first step anyway): donated here, so no second copy is made
        self.state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(trainable_params)
        del trainable_params
        self._step = _cached_train_step(
            config, tuple(optimizer_args.items()), accum_steps, remat, label_smoothing,
            _hashable_tree(shardings), rounding_seed,
        )  # fmt: skip
        self.history = History()
        self.last_eval: EvalResult | None = None

    @classmethod
    def load(cls, path, config: PaliGemmaConfig | None = None, *, trainable="attention",
             frozen_dtype=None, trainable_dtype=None, mesh=None, min_shard_bytes=MIN_SHARD_BYTES,
             **kw) -> Trainer:  # fmt: skip
        """A Trainer from a .npz (official or a training checkpoint, then resumed).

        Loads leaf by leaf into training dtypes and shardings (``load_for_training``)
        without extra copies; config defaults to the one inferred from the shapes.
        """
        mesh = mesh or make_mesh()
        params, _, _ = load_for_training(
            path, trainable=trainable, frozen_dtype=frozen_dtype, mesh=mesh,
            min_shard_bytes=min_shard_bytes, trainable_dtype=trainable_dtype,
        )  # fmt: skip
        config = config or checkpoints.infer_config(params, str(path))
        trainer = cls(params, config, trainable=trainable, frozen_dtype=frozen_dtype, mesh=mesh,
                      min_shard_bytes=min_shard_bytes, copy=False,
                      trainable_dtype=trainable_dtype, **kw)  # fmt: skip
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
            if isinstance(x, quant.QArray):  # frozen quantized: integers and float32 scales
                place = lambda a: jax.device_put(a, self._shardings(a))  # noqa: E731
                return jax.tree.map(place, x)
            target = jax.ShapeDtypeStruct(x.shape, training_dtype(False, dtype, x.dtype))
            sharding = shardings_for(target, self.mesh, self.min_shard_bytes)
            return jax.device_put(
                x.astype(target.dtype), sharding, may_alias=False if copy else None
            )

        return jax.tree.map(one, tree, is_leaf=quant.is_quantized)

    def _put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self._shardings(state))

    # --- the weights ----------------------------------------------------------------------
    @property
    def params(self) -> Params:
        """The full parameter tree: trainable (``trainable_dtype``, current) + frozen weights."""
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
        callback: Callable[[dict], None] | None = None,
    ) -> History:
        """Train until ``num_steps`` updates in total (default: the schedule's).

        batches: a ``data.Batcher`` (resumes at the trainer's step on its own)
        or any iterable of host batches. evaluator: ``Evaluator`` or
        ``f(params, config) -> EvalResult | dict``, run every ``eval_every``
        steps and at the end. checkpoint: a path written atomically every
        ``checkpoint_every`` steps (default: at evals) and at the end.
        callback: called after every update with a dict: ``step``, ``loss``,
        ``grad_norm``, ``lr``, and the evaluation scores when it evaluated.

        With several processes (``jax.process_count() > 1``) give every
        process the same ``Batcher``: each builds only its rows of the global
        batch (``ProcessBatches``); the progress bar shows in process 0 only.
        """
        end = self.num_steps if num_steps is None else num_steps
        start = self.step_count
        if jax.process_count() > 1 and isinstance(batches, Batcher):
            batches = ProcessBatches(batches, self.mesh)
        if hasattr(batches, "iterate"):
            batches = batches.iterate(start_step=start)
        batches = iter(batches)
        checkpoint_every = checkpoint_every or eval_every
        due = lambda step, every: step == end or bool(every and step % every == 0)
        bar = _progress_bar(start, end, progress and jax.process_index() == 0)
        try:
            for _ in range(start, end):
                batch = next(batches, None)
                if batch is None:
                    break  # the data ran out
                metrics = self.step(batch)
                step = self.step_count
                postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.3g}"}
                record = {"step": step, **{k: metrics[k] for k in ("loss", "grad_norm", "lr")}}
                if evaluator is not None and due(step, eval_every):
                    result = self.evaluate(evaluator)
                    postfix[result.metric] = f"{result.score:.4g}"
                    record.update(result.scores)
                if checkpoint and due(step, checkpoint_every):
                    self.save(checkpoint)
                if callback is not None:
                    callback(record)
                if bar is not None:
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return self.history

    def evaluate(self, evaluator: Callable) -> EvalResult:
        """Run an evaluator on the current weights; the result is logged in ``history``.

        With several processes the weights are first gathered to every host
        (a collective) and every process evaluates them (same result everywhere).
        On GPU/TPU devices (one, or a mesh) ``pt.evaluate`` decodes with one array
        per layer (``pali_kit.model.accel``): a copy of the stacks, each layer
        sharded as its stack, dropped when it returns; training keeps the stacks.
        """
        params = self.params
        if jax.process_count() > 1:
            params = gather_to_host(params)
        result = evaluator(params, self.config)
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
                return host_to_global(array.astype(flat_d[key], copy=False), flat_s[key])

            loaded = checkpoints.load_params(path, place=place)
            trainable, self.frozen = split_params(loaded, self.mask)
        else:
            trainable = self.state.params
        step, opt_state, history = read_training_state(path, self.state.opt_state)
        # host arrays (not one device's): device_put spreads them over every process's devices
        step = np.asarray(step, np.int32)
        self.state = self._put_state(TrainState(step, trainable, opt_state))
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
def _cached_train_step(config, optimizer_args, accum_steps, remat, label_smoothing, shardings,
                       rounding_seed=0):  # fmt: skip
    """One jitted step per setting, so a new Trainer with the same setup reuses the compile."""
    tx, schedule = make_optimizer(**dict(optimizer_args))
    treedef, leaves = shardings
    return make_train_step(
        config, tx, schedule=schedule, accum_steps=accum_steps, remat=remat,
        label_smoothing=label_smoothing, state_shardings=jax.tree.unflatten(treedef, leaves),
        rounding_seed=rounding_seed,
    )  # fmt: skip


def _progress_bar(start: int, end: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc="training", unit="step")


# ============================================================================ checkpoints


def _path_name(path) -> str:
    return leaf_key(path) or "_"


def _float(x):
    """A frozen quantized weight is written as the float array it stands for (official layout)."""
    return quant.dequantize(x) if isinstance(x, quant.QArray) else x


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
    arrays = ((key, to_host(_float(value))) for key, value in items)
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
