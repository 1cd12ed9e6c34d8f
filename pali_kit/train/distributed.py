"""Several processes: starting JAX's distributed runtime, and each process's rows of a batch.

One training run can span several processes (a TPU pod slice, GPU hosts, or
several CPU processes on one machine). Every process runs the same program:

    pt.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=i)  # first thing
    trainer = pt.Trainer.load("model.npz", num_steps=100)     # mesh over every process's devices
    trainer.fit(pdata.Batcher(train, tok, batch_size=32, ...))  # the same Batcher everywhere

- ``initialize_distributed`` calls ``jax.distributed.initialize`` (with no
  arguments it finds a Cloud TPU / GKE / SLURM / Open MPI cluster by itself) and, when the devices are CPUs, switches on JAX's CPU collectives
  (gloo) first, so that CPU processes reduce across each other.
- Batch ``k`` is the same *global* batch whatever the number of processes
  (``Batcher`` makes it from (seed, k) alone); ``process_rows`` is the slice
  of its rows that lands on this process's devices and ``ProcessBatches``
  builds only those rows (so each process reads only its images).
  ``Trainer.fit`` wraps a ``Batcher`` in it by itself when there are several
  processes. The loss is the mean over the global batch, so 1 process with 4
  devices and 2 processes with 2 devices each compute the same step, and a
  checkpoint written by one resumes in the other.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import data as pdata

# importable modules that bring non-CPU JAX backends (their presence means devices may not be CPUs)
ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
    "libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13",
)  # fmt: skip


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def devices_are_cpus() -> bool:
    """Whether JAX will run on CPUs, decided without starting a backend.

    True when ``JAX_PLATFORMS`` (or ``jax.config.jax_platforms``) names only
    ``cpu``, or when no accelerator plugin (CUDA, ROCm, TPU) is installed.
    """
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not any(_module_present(name) for name in ACCELERATOR_PLUGINS)


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Start JAX's multi-process runtime; call it first thing, before any JAX computation.

    coordinator: ``"HOST:PORT"`` of process 0 (reachable by every process),
    with ``num_processes`` and ``process_id`` (0 .. num_processes-1). All
    three None: ``jax.distributed.initialize()`` finds the cluster itself
    (Cloud TPU pod slices, GKE, SLURM, Open MPI's ``mpirun``). On CPUs the
    gloo collectives are switched on first.
    """
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "coordinator, num_processes and process_id go together: give all three "
            f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}), or none to let JAX find the cluster"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id} must be in 0..{num_processes - 1} "
            f"for num_processes={num_processes}"
        )
    if devices_are_cpus():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator, num_processes=num_processes, process_id=process_id,
            initialization_timeout=timeout_s,
        )  # fmt: skip
    except (RuntimeError, ValueError) as error:
        where = coordinator or "the address JAX found"
        if coordinator is None and isinstance(error, ValueError):
            hint = (
                "JAX found no cluster to join (Cloud TPU, GKE, SLURM, Open MPI): give the "
                "coordinator's HOST:PORT, the number of processes and this process's id"
            )
        elif process_id == 0:
            hint = f"process 0 could not listen on {where}: is the port in use? Pick another"
        else:
            hint = (
                f"could not reach the coordinator at {where} within {timeout_s} s: is "
                "process 0 running, and is its HOST:PORT reachable from here?"
            )
        raise RuntimeError(f"jax.distributed.initialize failed ({error}); {hint}") from error


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``batch_size`` that this process's devices hold.

    The batch is split along the mesh axis ``"data"``; with one process this
    is ``slice(0, batch_size)``. Raises ValueError when ``batch_size`` is not
    a multiple of the number of devices.
    """
    n = mesh.shape["data"]
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n} devices of the mesh: "
            f"use a multiple of {n}"
        )
    index_map = NamedSharding(mesh, P("data")).addressable_devices_indices_map((batch_size,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    rows = batch_size // n
    start, stop = starts[0], starts[-1] + rows
    if [start + i * rows for i in range(len(starts))] != starts:
        raise ValueError(
            "this process's devices hold rows that are not contiguous in the mesh "
            f"(starts {starts}); build the mesh with make_mesh() (devices in process order)"
        )
    return slice(start, stop)


class ProcessBatches:
    """This process's rows of a ``Batcher``'s global batches (what ``shard_batch`` expects).

    ``iterate(start_step)`` yields, for step k, ``collate`` of the examples
    ``batcher.examples(k)[rows]``: arrays with ``rows`` rows (the global
    batch size over the process count); only those examples' images are read.
    """

    def __init__(self, batcher: pdata.Batcher, mesh: Mesh):
        self.batcher = batcher
        self.rows = process_rows(batcher.batch_size, mesh)

    def batch(self, step: int) -> pdata.Batch:
        b = self.batcher
        examples = b.examples(step)[self.rows]
        return pdata.collate(examples, b.tokenizer, text_len=b.text_len, image_size=b.image_size)

    def iterate(self, start_step: int = 0) -> pdata.Prefetch:
        end = self.batcher.num_steps
        steps: Iterator[int] = (
            iter(range(start_step, end)) if end is not None else itertools.count(start_step)
        )
        return pdata.Prefetch((self.batch(s) for s in steps), self.batcher.prefetch,
                              position=start_step)  # fmt: skip


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array -> a full numpy array on this host.

    A collective when ``x`` spans several processes: every process calls it.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_to_host(tree):
    """Every leaf as a full numpy array on this host (a collective: every process calls it)."""
    return jax.tree.map(to_host, tree)


def is_main_process() -> bool:
    """True in process 0 (the one that writes logs and checkpoints)."""
    return jax.process_index() == 0


__all__ = [
    "initialize_distributed", "devices_are_cpus", "process_rows", "ProcessBatches",
    "gather_to_host", "to_host", "is_main_process",
]  # fmt: skip
