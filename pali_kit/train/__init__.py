"""Fine-tuning PaliGemma: train a chosen subset of the real weights (no LoRA).

Only the chosen weights (default: the LLM's attention, as the reference
colab) get gradients and optimizer state; the frozen ones stay bit-identical.

    from pali_kit import data as pdata, train as pt

    trainer = pt.Trainer.load("paligemma2-3b-pt-224.b16.npz", trainable="attention", num_steps=64)
    train = pdata.Batcher(pdata.JsonlDataset("train.jsonl"), tok, batch_size=8, text_len=128,
                          image_size=224)
    val = pt.Evaluator(pdata.JsonlDataset("val.jsonl"), tok, metric="cider")
    history = trainer.fit(train, eval_every=16, evaluator=val, checkpoint="ft.npz")

Each module holds one piece, usable on its own in a notebook:

- ``params.py``: which weights train (``trainable_mask``), split/merge, dtypes.
- ``step.py``: the loss, the schedule, the optimizer and the jitted train step.
- ``sharding.py``: the device mesh, FSDP shardings, multi-host, ``load_for_training``.
- ``trainer.py``: ``Trainer``, ``History`` and ``plot_history``, ``save_checkpoint`` /
  ``read_training_state``.
- ``evaluation.py``: ``evaluate`` / ``Evaluator``, metrics (``metric_functions``),
  ``draw_previews``, and the shapes world's grading: ``score_shapes``, ``grade_answer``.
- ``memory.py``: ``plan`` / ``t4_advice``, the device memory a configuration needs.
- ``distributed.py``: several processes (``initialize_distributed``, each
  process's rows of the global batch: ``process_rows`` / ``ProcessBatches``).

Every name is importable from here (``pt.Trainer``, ``pt.plan``, ...).
"""

from __future__ import annotations

# ``X as X``: names outside ``__all__`` that stay importable as ``pali_kit.train.X``
from .distributed import (
    ProcessBatches,
    devices_are_cpus,
    gather_to_host,
    initialize_distributed,
    is_main_process,
    process_rows,
)
from .distributed import to_host as to_host
from .evaluation import (
    METRICS,
    TASK_METRICS,
    EvalResult,
    Evaluator,
    Preview,
    draw_previews,
    evaluate,
)
from .evaluation import grade_answer as grade_answer
from .evaluation import metric_functions as metric_functions
from .evaluation import score_shapes as score_shapes
from .memory import DEVICES, Plan, plan, t4_advice
from .memory import GB as GB
from .memory import HEADROOM as HEADROOM
from .params import NO_BF16_GPUS as NO_BF16_GPUS
from .params import (
    TRAINABLE,
    cast_params,
    default_frozen_dtype,
    merge_params,
    split_params,
    trainable_mask,
)
from .params import TRAINABLE_DTYPES as TRAINABLE_DTYPES
from .params import Params as Params
from .params import check_trainable_dtype as check_trainable_dtype
from .params import leaf_key as leaf_key
from .params import training_dtype as training_dtype
from .sharding import MIN_SHARD_BYTES as MIN_SHARD_BYTES
from .sharding import fsdp_spec, load_for_training, make_mesh, shard_batch, shardings_for
from .step import (
    NonFiniteLossError,
    TrainState,
    batch_loss,
    bv_schedule,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    next_token_loss,
)
from .step import round_like as round_like
from .step import rounding_key as rounding_key
from .step import stochastic_round as stochastic_round
from .trainer import History, Trainer, plot_history, read_training_state, save_checkpoint

__all__ = [
    "TRAINABLE", "trainable_mask", "split_params", "merge_params", "default_frozen_dtype",
    "cast_params", "next_token_loss", "batch_loss", "bv_schedule", "learning_rate_schedule",
    "make_optimizer", "make_mesh", "fsdp_spec", "shardings_for", "shard_batch",
    "load_for_training", "TrainState", "init_state", "make_train_step", "NonFiniteLossError",
    "Trainer", "History", "Evaluator", "EvalResult", "Preview", "evaluate", "METRICS",
    "save_checkpoint", "read_training_state", "plot_history", "draw_previews", "Plan", "plan",
    "t4_advice", "DEVICES", "TASK_METRICS", "initialize_distributed", "devices_are_cpus",
    "process_rows", "ProcessBatches", "gather_to_host", "is_main_process",
]  # fmt: skip
