"""Memory plan: the device memory fine-tuning needs, and whether it fits a T4, L4, A100, TPU.

``plan(...)`` counts weights and optimizer state from the shapes and takes the
step's temporaries from XLA's own analysis of the compiled step (nothing is
allocated); ``Plan.table()`` prints the breakdown with a verdict per device
in ``DEVICES``. ``t4_advice(...)``: the largest trainable subset, and its
largest batch, that fit a T4 (or any entry of ``DEVICES``).

Devices with several chips (Kaggle's 2x T4, 8-core TPU hosts) hold one FSDP
shard of every weight and optimizer-state array (``sharding.fsdp_spec``, the
rule ``Trainer`` uses), and the batch is split over them: ``Plan.sharded``
gives one device's share (``Sharded``), with XLA's temporaries compiled at the
per-device batch and the gradients reduce-scattered (each device keeps its
shard only, as the sharded step does).
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
from .params import (
    check_trainable_dtype,
    merge_params,
    split_params,
    trainable_mask,
    training_dtype,
)
from .sharding import MIN_SHARD_BYTES, fsdp_spec
from .step import init_state, make_optimizer, make_train_step

# ============================================================================ memory plan

GB = 1e9

# name -> (usable memory per device in bytes, devices the weights are sharded over)
DEVICES = {
    "T4 16 GB": (15.0 * 2**30, 1),  # Colab/Kaggle report 15 GiB usable
    "2x T4 16 GB (Kaggle)": (15.0 * 2**30, 2),  # Kaggle's free "GPU T4 x2": FSDP over both
    "L4 24 GB": (22.0 * 2**30, 1),
    "A100 40 GB": (39.4 * 2**30, 1),
    "TPU v2-8 (8 GB/core)": (8 * 2**30, 8),
    "TPU v3-8 (16 GB/core)": (16 * 2**30, 8),
}
HEADROOM = 0.9  # "fits" below 90 % of the device: allocator, workspace, fragmentation


@dataclasses.dataclass(frozen=True)
class Sharded:
    """One device's memory (bytes) when a step runs FSDP-sharded over ``devices`` devices.

    ``state``: this device's shards of the frozen and trainable weights and the
    optimizer state (``fsdp_spec``: arrays over ``MIN_SHARD_BYTES`` split along
    one axis, smaller ones replicated). ``temp``: XLA's temporaries compiled at
    the per-device batch, less the gradient shards other devices keep (the
    step reduce-scatters them). ``gathered``: one layer's weights, all-gathered
    while that layer runs. ``exact_temp`` is False when the per-device batch
    was not compiled (``plan(..., tpu=False)``): ``temp`` is then the full
    batch's, an over-estimate.
    """

    devices: int
    batch_size: int  # per device
    state: int
    batch_bytes: int
    temp: int
    gathered: int
    exact_temp: bool

    @property
    def total(self) -> int:
        return self.state + self.batch_bytes + self.temp + self.gathered


@dataclasses.dataclass(frozen=True)
class Plan:
    """Device memory one training step needs (bytes), from XLA's compiled-memory analysis.

    ``temp`` is XLA's scratch for the step (activations kept for the backward
    pass, gradients, logits) on one device; ``sharded`` one ``Sharded`` per
    multi-device entry of ``DEVICES`` (2 GPUs, 8 TPU cores): one device's share
    when weights and optimizer state are split over all of them.
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
    sharded: tuple[Sharded, ...]
    largest_layer_bytes: int
    compile_seconds: float
    measured_on: str = ""
    trainable_dtype: str = "float32"

    @property
    def total(self) -> int:
        """One device holds everything: weights, optimizer state, batch and XLA temporaries."""
        return (self.frozen_bytes + self.trainable_bytes + self.optimizer_bytes
                + self.batch_bytes + self.temp)  # fmt: skip

    def per_core(self, cores: int = 8) -> int:
        """Bytes per device when weights and optimizer state are FSDP-sharded over ``cores``.

        ``cores`` must be the device count of an entry of ``DEVICES`` when the
        plan was made (``Plan.sharded``); 1 is the single-device ``total``.
        """
        if cores == 1:
            return self.total
        for share in self.sharded:
            if share.devices == cores:
                return share.total
        planned = sorted({1} | {share.devices for share in self.sharded})
        raise ValueError(
            f"per_core(cores={cores}): this plan covers {planned} devices; add an entry with "
            f"{cores} devices to pali_kit.train.DEVICES before calling plan()"
        )

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
            f"  trainable weights ({self.trainable_dtype:>8}){self.trainable_bytes / GB:7.2f} GB",
            f"  optimizer state              {self.optimizer_bytes / GB:7.2f} GB",
            f"  batch                        {self.batch_bytes / GB:7.2f} GB",
            f"  step temporaries (XLA)       {self.temp / GB:7.2f} GB"
            f"   (gradients {self.gradient_bytes / GB:.2f} GB, activations, logits)",
            f"  total on one device          {self.total / GB:7.2f} GB",
        ]
        for share in self.sharded:
            lines.append(
                f"  FSDP over {share.devices} devices, batch {share.batch_size} each: weights and "
                f"optimizer {share.state / GB:.2f} + batch {share.batch_bytes / GB:.2f} + "
                f"temporaries {share.temp / GB:.2f}{'' if share.exact_temp else ' (full batch)'}"
                f" + one layer gathered {share.gathered / GB:.2f} = {share.total / GB:.2f} GB "
                "per device"
            )
        lines += [
            "",
            f"  {'device':24} {'needs':>8} {'has':>8}  verdict",
        ]
        for device, need, has, verdict in self.verdicts():
            lines.append(f"  {device:24} {need:6.2f}GB {has:6.2f}GB  {verdict}")
        return "\n".join(lines)

    __str__ = table

    def _repr_pretty_(self, p, cycle):  # IPython shows the table
        p.text(self.table())


def _abstract_state(config, trainable, frozen_dtype, optimizer, scheme=None,
                    trainable_dtype=np.float32):  # fmt: skip
    """ShapeDtypeStructs for (state, frozen) and a description; allocates nothing.

    scheme ("int8" | "int4"): frozen large matrices are QArrays standing for ``frozen_dtype``.
    """
    shapes = param_shapes(config)
    mask, _ = trainable_mask(shapes, trainable)
    typed = jax.tree.map(
        lambda s, t: jax.ShapeDtypeStruct(
            s.shape, training_dtype(t, frozen_dtype, s.dtype, trainable_dtype)
        ),
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
                   accum_steps, scheme=None, trainable_dtype=np.float32) -> tuple[int, float]:  # fmt: skip
    """XLA's temp bytes of the compiled train step on the default device, and compile seconds."""
    state, frozen, tx, schedule = _abstract_state(
        config, trainable, frozen_dtype, optimizer, scheme, trainable_dtype
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
    min_shard_bytes: int = MIN_SHARD_BYTES,
    trainable_dtype="float32",
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
    also compiles at the per-device batch of every multi-device entry of
    ``DEVICES`` (2x T4, 8-core TPU hosts), whose weights and optimizer state
    are FSDP-sharded as ``Trainer`` shards them (``min_shard_bytes``: its
    threshold); ``Plan.sharded`` holds one device's share. Results are
    cached; PaliGemma-3B compiles in about 10 s (scan + remat: one layer).
    ``frozen_dtype="int8"`` / ``"int4"``: the frozen large matrices are
    weight-only quantized (``pali_kit.quant``; load with ``pk.load(...,
    quantize=...)``), dequantized inside the step; norms and the other small
    frozen weights are float16. ``trainable_dtype="bfloat16"``: the trainable
    weights and their gradients take 2 bytes a parameter (``Trainer``'s
    option of the same name: float32 updates, stochastic rounding); the
    optimizer state stays float32. (On a CPU host that step is compiled with
    float32 trainable weights too, for the reason above, and its gradients are
    counted at 2 bytes a parameter.)

    Example::

        print(pt.plan("paligemma2-3b-pt-224"))   # the colab on a T4: fits
    """
    config = resolve_config(config_or_name)
    name = config_or_name if isinstance(config_or_name, str) else config.family
    scheme = frozen_dtype if frozen_dtype in quant.SCHEMES else None
    dtype = checkpoints.as_dtype("float16" if scheme else frozen_dtype)
    half = check_trainable_dtype(trainable_dtype)
    subset = _hashable_subset(config, trainable)
    state, frozen, _, _ = _abstract_state(config, subset, dtype, optimizer, scheme, half)
    on_cpu = jax.default_backend() == "cpu"
    compiled_dtype = np.dtype(np.float32) if on_cpu else dtype
    compiled_half = np.dtype(np.float32) if on_cpu else half
    compile_at = functools.partial(
        _compiled_temp, config, subset, compiled_dtype, optimizer, text_len=text_len,
        remat=remat, accum_steps=accum_steps, scheme=scheme, trainable_dtype=compiled_half,
    )  # fmt: skip
    # XLA:CPU holds bfloat16 weights as whole float32 copies (as it does frozen float16 ones),
    # which a GPU/TPU does not: on a CPU host the step is compiled with float32 trainable
    # weights, and their gradients (in its temporaries) are counted at 2 bytes instead of 4.
    # (The random bits of stochastic rounding, 2 bytes a parameter of one array at a time,
    # are drawn after the backward pass, below its peak: the bfloat16 step XLA:CPU compiles,
    # less its float32 copies, needs what this count gives, for a 10B model as a tiny one.)
    correction = 0
    if compiled_half != half:
        correction = _count(state.params) * (4 - half.itemsize)
    compile_at = _minus(compile_at, correction)
    temp, seconds = compile_at(batch_size=batch_size)
    layer_bytes = _largest_layer_bytes(merge_params(state.params, frozen), config)
    sharded = []
    for n in sorted({cores for _, cores in DEVICES.values() if cores > 1}):
        per_device = -(-batch_size // n)
        temp_n = temp
        if tpu:
            temp_n, more = compile_at(batch_size=per_device)
            seconds += more
        # each device keeps its shard of the gradients (reduce-scattered), not all of them
        others_grads = _nbytes(state.params) - _shard_bytes(state.params, n, min_shard_bytes)
        sharded.append(Sharded(
            devices=n, batch_size=per_device, state=_shard_bytes((state, frozen), n, min_shard_bytes),
            batch_bytes=_nbytes(_abstract_batch(config, per_device, text_len)),
            temp=temp_n - others_grads, gathered=layer_bytes, exact_temp=tpu,
        ))  # fmt: skip
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
        temp=temp, sharded=tuple(sharded), largest_layer_bytes=layer_bytes,
        compile_seconds=seconds, measured_on=jax.devices()[0].device_kind,
        trainable_dtype=half.name,
    )  # fmt: skip


def _minus(compile_at, correction: int):
    """``compile_at`` with ``correction`` bytes taken off the temporaries it returns."""

    def at(**kw):
        temp, seconds = compile_at(**kw)
        return temp - correction, seconds

    return at


def _shard_bytes(tree, n: int, min_bytes: int) -> int:
    """One device's bytes of ``tree`` FSDP-sharded over ``n`` devices (``fsdp_spec``)."""
    total = 0
    for x in jax.tree.leaves(tree):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        split = any(axis is not None for axis in fsdp_spec(tuple(x.shape), nbytes, n, min_bytes))
        total += nbytes // n if split else nbytes
    return total


def _largest_layer_bytes(params, config) -> int:
    """Bytes of one layer of the larger tower's stack (what FSDP gathers at a time)."""
    stacks = {"llm/layers/": config.llm.depth, "img/Transformer/encoderblock/": config.vision.depth}
    flat = checkpoints.flatten(params)
    sizes = []
    for prefix, depth in stacks.items():
        leaves = [
            x for key, value in flat.items() if key.startswith(prefix)
            for x in jax.tree.leaves(value)
        ]  # fmt: skip
        sizes.append(sum(
            math.prod(x.shape[1:]) * np.dtype(x.dtype).itemsize
            for x in leaves if x.shape and x.shape[0] == depth
        ))  # fmt: skip
    return max(sizes)


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
    subsets: Sequence = ("all", "llm", "img", "attention"),
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    device: str = "T4 16 GB",
    min_batch: int = 1,
    trainable_dtype="float32",
) -> str:
    """The largest trainable subset that fits ``device`` at batch ``min_batch``, and its largest batch.

    ``subsets``: presets or regexes (``"llm/layers/attn/q_einsum/w"``), tried
    largest first; ``frozen_dtype`` may be ``"int8"`` / ``"int4"``. Subsets
    whose weights, gradients, optimizer state and frozen weights alone exceed
    the device (per device when it has several) are ruled out without
    compiling. On a device with several chips the batch is split over them,
    so only batches divisible by their number count. The batch is found from
    two compiles (temporaries grow linearly with the batch) and checked with
    a third. Every compile is cached.
    """
    config = resolve_config(config_or_name)
    shapes = param_shapes(config)
    capacity, cores = DEVICES[device][0] * HEADROOM, DEVICES[device][1]
    sizes = sorted(b for b in set(batch_sizes) | {min_batch} if b >= min_batch and b % cores == 0)
    if not sizes:
        raise ValueError(
            f"t4_advice: {device!r} splits the batch over {cores} devices: give batch_sizes "
            f"with multiples of {cores} at or above min_batch={min_batch}"
        )
    kw = dict(text_len=text_len, frozen_dtype=frozen_dtype, optimizer=optimizer, tpu=cores > 1,
              trainable_dtype=trainable_dtype)  # fmt: skip

    def need(subset, batch: int) -> int:
        return plan(config, trainable=subset, batch_size=batch, **kw).need(device)

    first = sizes[0]
    best = None
    for subset in sorted(subsets, key=lambda s: -_count_trainable(shapes, s)):
        if _state_bound(config, subset, frozen_dtype, optimizer, cores, trainable_dtype) > capacity:
            continue
        if need(subset, first) <= capacity:
            best = subset
            break
    frozen = frozen_dtype if frozen_dtype in quant.SCHEMES else checkpoints.as_dtype(frozen_dtype)
    frozen = np.dtype(frozen).name if not isinstance(frozen, str) else frozen
    trained = check_trainable_dtype(trainable_dtype).name
    if best is None:
        return (f"{device}: nothing fits at batch {first} with text_len={text_len} (frozen "
                f"{frozen}, trainable {trained})")  # fmt: skip
    second = next((b for b in sizes if b >= 8 * cores and b > first), sizes[-1])
    largest = first
    if second > first:
        low, high = need(best, first), need(best, second)
        per_example = max((high - low) / (second - first), 1.0)
        largest = max(b for b in sizes if low + (b - first) * per_example <= capacity)
        while largest > first and need(best, largest) > capacity:
            largest = max(b for b in sizes if b < largest)
    return (
        f"{device}: the largest trainable subset that fits at batch {first} is {best!r} "
        f"({_count_trainable(shapes, best):,} params); with it the largest batch is {largest} "
        f"(text_len={text_len}, {optimizer}, frozen {frozen}, trainable {trained})"
    )


def _state_bound(config, subset, frozen_dtype, optimizer, devices: int,
                 trainable_dtype="float32") -> int:  # fmt: skip
    """One device's weights, gradients and optimizer state: a floor under any batch's need."""
    scheme = frozen_dtype if frozen_dtype in quant.SCHEMES else None
    dtype = checkpoints.as_dtype("float16" if scheme else frozen_dtype)
    subset = _hashable_subset(config, subset)
    half = check_trainable_dtype(trainable_dtype)
    state, frozen, _, _ = _abstract_state(config, subset, dtype, optimizer, scheme, half)
    shard = functools.partial(_shard_bytes, n=devices, min_bytes=MIN_SHARD_BYTES)
    return shard((state, frozen)) + shard(state.params)  # the gradients: one more trainable copy


def _count_trainable(shapes, subset) -> int:
    mask, _ = trainable_mask(shapes, subset)
    return sum(
        math.prod(s.shape) for s, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)) if t
    )
