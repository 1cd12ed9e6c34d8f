"""The accelerator (GPU/TPU) inference layout: one array per layer.

The model modules index a layer stack with ``w[i]`` (``common.layer_slice``).
Inside ``jit`` that is a slice, and XLA:GPU gives every slice its own buffer:
a copy of a layer's weights, and nothing orders those copies after the layers
that use them. On an H200 (JAX 0.11) held to a T4's 15.6 GB, decoding
PaliGemma 2 3B-224 with the stacked float16 weights (6.06 GB) ran out of
memory asking for 6.46 GB more; with this layout it ran
(``bench/gpu_check.py``, ``docs/differences.md``).

This layout hands the compiled code one array per layer instead (tuples over
layers, which ``layer_slice`` indexes like a stack), made once, on the device.
For a model that owns its arrays (``pk.load``) each stack is freed as soon as
it is split, so the peak is the weights plus one stacked leaf; ``official``
stacks them again on request (saving, training). Training keeps the stacked
tree and ``lax.scan`` (one layer's slice at a time); an evaluation during
training (``pt.evaluate``, ``Trainer.evaluate``) splits a copy of the stacks
for its duration, which slicing them in every decode step would make anyway.
On a mesh of several devices (data-parallel or sharded, e.g. 2 T4s) each
layer keeps its stack's sharding less the layer axis (``layer_sharding``).
"""

from __future__ import annotations

import functools
import math

import jax

from .. import quant

# The two layer stacks of the official tree, by their path.
STACKS = (("img", "Transformer", "encoderblock"), ("llm", "layers"))


def is_accelerator(device) -> bool:
    """Is ``device`` a GPU/TPU (not a CPU)? (Tests patch this to stand a CPU in.)"""
    return device.platform != "cpu"


def _devices(params) -> set | None:
    """The devices every array of ``params`` lives on; None if a leaf is not a
    jax.Array of this process (numpy, or spread over several hosts)."""
    devices = set()
    for a in jax.tree.leaves(params):
        if not isinstance(a, jax.Array) or not a.is_fully_addressable:
            return None
        devices |= set(a.devices())
    return devices


def on_accelerators(params) -> bool:
    """True when every array lives on GPU/TPU devices of this process: one device,
    or several (a mesh: data-parallel copies or sharded arrays)."""
    devices = _devices(params)
    return bool(devices) and all(is_accelerator(d) for d in devices)


def on_one_accelerator(params) -> bool:
    """True when every array lives on the same single GPU/TPU device."""
    return on_accelerators(params) and len(_devices(params)) == 1


def layer_sharding(sharding, shape):
    """The sharding of one layer ``a[i]`` of a stacked array with ``sharding``.

    A NamedSharding loses the layer axis (its spec without the first entry); if
    the stack was split along the layer axis, the layer is split along its
    largest axis the mesh axes divide instead (else replicated), so each device
    holds about as much as before. Other shardings: None (XLA's choice).
    """
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    rest = list(spec[1:])
    if spec[0] is not None:  # the layer axis was sharded: move it to another axis
        names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
        n = math.prod(sharding.mesh.shape[name] for name in names)
        free = [i for i, p in enumerate(rest) if p is None and shape[i + 1] % n == 0]
        if free:
            rest[max(free, key=lambda i: (shape[i + 1], i))] = spec[0]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*rest))


@functools.cache
def _splitter(depth: int, sharding):
    return jax.jit(lambda a: tuple(a[i] for i in range(depth)), out_shardings=sharding)


def _split_leaf(a, release: bool):
    """A stacked array (or QArray) -> tuple of its layers, each its own buffer, each
    with the stack's sharding less the layer axis (``layer_sharding``)."""
    if isinstance(a, quant.QArray):
        values, scales = _split_leaf(a.values, release), _split_leaf(a.scales, release)
        return tuple(a._replace(v, s) for v, s in zip(values, scales))
    sharding = getattr(a, "sharding", None)
    sharding = layer_sharding(sharding, a.shape) if sharding is not None else None
    parts = _splitter(a.shape[0], sharding)(a)
    if release:
        a.delete()  # the caller owns it: free the stack now, not at the end
    return parts


def split_stacks(params: dict, release: bool = False) -> dict:
    """Official tree -> the same tree with each layer stack's leaves as tuples over layers.

    release: delete each stacked array once split (only for arrays nobody else
    holds: the official tree is unusable afterwards; keep ``skeleton(params)``).
    """

    def split(tree):
        if isinstance(tree, dict):
            return {k: split(v) for k, v in tree.items()}
        return _split_leaf(tree, release)

    return _map_stacks(params, split)


def skeleton(params: dict) -> dict:
    """``params`` with the layer stacks set to None (what ``official`` completes)."""
    return _map_stacks(params, lambda tree: None)


def official(run: dict, skeleton: dict) -> dict:
    """The official stacked tree again, from a split run tree (new stacked arrays)."""

    def stack(tree):
        if isinstance(tree, dict):
            return {k: stack(v) for k, v in tree.items()}
        if isinstance(tree[0], quant.QArray):
            q = tree[0]
            values = jax.numpy.stack([p.values for p in tree])
            return q._replace(values, jax.numpy.stack([p.scales for p in tree]))
        return jax.numpy.stack(tree)

    out = _map_stacks(skeleton, None)
    for path in STACKS:
        node, r = out, run
        for key in path[:-1]:
            node, r = node[key], r[key]
        node[path[-1]] = stack(r[path[-1]])
    return out


def _map_stacks(params: dict, fn) -> dict:
    """A copy of the dict nesting of ``params`` with ``fn`` applied to each stack
    (``fn=None``: only copy the nesting)."""
    out = dict(params)
    for path in STACKS:
        node = out
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        if fn is not None:
            node[path[-1]] = fn(node[path[-1]])
    return out
