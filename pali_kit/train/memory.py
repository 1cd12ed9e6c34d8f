"""Memory plan: the device memory fine-tuning needs, and whether it fits a T4, L4, A100, TPU.

``plan(...)`` counts weights and optimizer state from the shapes and takes the
step's temporaries from XLA's own analysis of the compiled step (nothing is
allocated); ``Plan.table()`` prints the breakdown with a verdict per device
in ``DEVICES``. ``t4_advice(...)``: the largest trainable subset, and its
largest batch, that fit a T4.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoints, quant
from ..configs import resolve_config
from ..model import count_params, param_shapes
from .params import merge_params, split_params, trainable_mask, training_dtype
from .step import init_state, make_optimizer, make_train_step

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


def _abstract_state(config, trainable, frozen_dtype, optimizer, scheme=None):
    """ShapeDtypeStructs for (state, frozen) and a description; allocates nothing.

    scheme ("int8" | "int4"): frozen large matrices are QArrays standing for ``frozen_dtype``.
    """
    shapes = param_shapes(config)
    mask, _ = trainable_mask(shapes, trainable)
    typed = jax.tree.map(
        lambda s, t: jax.ShapeDtypeStruct(s.shape, training_dtype(t, frozen_dtype, s.dtype)),
        shapes, mask,
    )  # fmt: skip
    train_shapes, frozen_shapes = split_params(typed, mask)
    if scheme is not None:
        frozen_shapes = quant.abstract_quantize_params(frozen_shapes, scheme)
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


def _count(tree) -> int:
    """Parameters in a tree whose QArrays count as the weights they stand for."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized))


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=64)
def _compiled_temp(config, trainable, frozen_dtype, optimizer, batch_size, text_len, remat,
                   accum_steps, scheme=None) -> tuple[int, float]:  # fmt: skip
    """XLA's temp bytes of the compiled train step on the default device, and compile seconds."""
    state, frozen, tx, schedule = _abstract_state(
        config, trainable, frozen_dtype, optimizer, scheme
    )
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
    ``frozen_dtype="int8"`` / ``"int4"``: the frozen large matrices are
    weight-only quantized (``pali_kit.quant``; load with ``pk.load(...,
    quantize=...)``), dequantized inside the step; norms and the other small
    frozen weights are float16.

    Example::

        print(pt.plan("paligemma2-3b-pt-224"))   # the colab on a T4: fits
    """
    config = resolve_config(config_or_name)
    name = config_or_name if isinstance(config_or_name, str) else config.family
    scheme = frozen_dtype if frozen_dtype in quant.SCHEMES else None
    dtype = checkpoints.as_dtype("float16" if scheme else frozen_dtype)
    subset = _hashable_subset(config, trainable)
    state, frozen, _, _ = _abstract_state(config, subset, dtype, optimizer, scheme)
    compiled_dtype = np.dtype(np.float32) if jax.default_backend() == "cpu" else dtype
    compile_at = functools.partial(
        _compiled_temp, config, subset, compiled_dtype, optimizer, text_len=text_len,
        remat=remat, accum_steps=accum_steps, scheme=scheme,
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
        frozen_dtype=scheme or np.dtype(dtype).name, remat=remat,
        num_params=count_params(state.params) + _count(frozen),
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
