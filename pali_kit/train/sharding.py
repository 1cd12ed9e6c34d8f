"""Devices and sharding: the mesh, big_vision's FSDP rule, global batches, loading onto devices.

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
``initialize_distributed()`` (``distributed.py``) first thing in every
process, then run the same notebook code on every host. ``make_mesh()`` then
spans every device of every host (``jax.devices()``), ``shard_batch`` turns
each host's rows into the global batch (``jax.make_array_from_process_local_data``;
``Trainer.fit`` has each host build only its rows of the same ``Batcher``
batch, ``distributed.ProcessBatches``), ``load_for_training`` builds each
global array from the slices each host reads (``jax.make_array_from_callback``)
and ``save_checkpoint`` gathers the shards and writes from process 0 only.
The jitted step is unchanged: it is one SPMD program over the global mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import checkpoints, quant
from .params import (
    Params,
    check_trainable_dtype,
    default_frozen_dtype,
    trainable_mask,
    training_dtype,
)

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


def host_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
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
    quantize: str | None = None,
    trainable_dtype=None,
) -> tuple[Params, Params, str]:
    """Load a .npz straight into training dtypes and shardings: ``(params, mask, summary)``.

    Leaf by leaf, largest first: each array is cast (trainable ``trainable_dtype``,
    float32 or bfloat16, default float32; frozen ``frozen_dtype``, default
    ``default_frozen_dtype()``) and put on
    its devices with its FSDP sharding as soon as it is read, so host memory
    peaks near one leaf. Training checkpoints (``params/``, ``opt/``) load too.
    quantize ("int8" | "int4"): the frozen large matrices (``pali_kit.quant.RULES``)
    become ``QArray``s standing for ``frozen_dtype`` (values and scales each
    FSDP-sharded); trainable ones stay at full precision (``trainable_dtype``), never rounded
    to the quantization grid (what ``pk.load(..., quantize=...)`` would do to them).
    """
    mesh = mesh or make_mesh()
    frozen_dtype = checkpoints.as_dtype(frozen_dtype) or default_frozen_dtype()
    trainable_dtype = check_trainable_dtype(trainable_dtype)
    quant.check_scheme(quantize)
    keys = checkpoints.checkpoint_keys(path)
    shapes = {
        k: jax.ShapeDtypeStruct(s, d)
        for k, (s, d) in keys.items()
        if k.startswith(("img/", "llm/"))
    }
    mask, summary = trainable_mask(checkpoints.unflatten(shapes), trainable)
    flags = checkpoints.flatten(mask)

    def put(array):
        target = jax.ShapeDtypeStruct(array.shape, array.dtype)
        return host_to_global(array, shardings_for(target, mesh, min_shard_bytes))

    def place(key, array):
        axes = quant.contraction_axes(key) if quantize and not flags[key] else None
        if axes is not None:  # frozen large matrix: quantized one slice of rows at a time
            q = quant.quantize_leaf(array, quantize, axes, place=put)
            return quant.QArray(q.values, q.scales, quantize, q.in_axes, q.in_shape, frozen_dtype)
        dtype = training_dtype(flags[key], frozen_dtype, array.dtype, trainable_dtype)
        array = array.astype(dtype, copy=False)
        target = jax.ShapeDtypeStruct(array.shape, dtype)
        return host_to_global(array, shardings_for(target, mesh, min_shard_bytes))

    params = checkpoints.load_params(path, place=place, progress=progress)
    return params, mask, summary
