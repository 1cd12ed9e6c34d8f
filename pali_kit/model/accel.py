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
tree and ``lax.scan`` (one layer's slice at a time).
"""

from __future__ import annotations

import functools

import jax

from .. import quant

# The two layer stacks of the official tree, by their path.
STACKS = (("img", "Transformer", "encoderblock"), ("llm", "layers"))


def on_one_accelerator(params) -> bool:
    """True when every array lives on the same single non-CPU device."""
    devices = set()
    for a in jax.tree.leaves(params):
        if not isinstance(a, jax.Array) or not a.is_fully_addressable:
            return False
        devices |= set(a.devices())
    return len(devices) == 1 and next(iter(devices)).platform != "cpu"


@functools.cache
def _splitter(depth: int):
    return jax.jit(lambda a: tuple(a[i] for i in range(depth)))


def _split_leaf(a, release: bool):
    """A stacked array (or QArray) -> tuple of its layers, each its own buffer."""
    if isinstance(a, quant.QArray):
        values, scales = _split_leaf(a.values, release), _split_leaf(a.scales, release)
        return tuple(a._replace(v, s) for v, s in zip(values, scales))
    parts = _splitter(a.shape[0])(a)
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
