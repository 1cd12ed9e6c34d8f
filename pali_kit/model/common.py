"""Small pieces shared by the image encoder and the language model.

Both towers keep their layers *stacked*: every per-layer weight has a leading
axis of size ``depth`` (big_vision's scan layout, so a released ``.npz`` loads
without renaming). A layer is a plain Flax module applied to one slice of that
stack. Two ways to run the stack:

- unrolled (a Python loop, ``scan=False``): each layer reads its slice of the
  stacked arrays in place. Fastest on CPU, where ``lax.scan`` copies every
  layer's weights out of the stack at each step.
- ``lax.scan`` (``scan=True``): one compiled layer, optionally rematerialised;
  what training uses to keep compile time and activation memory small.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


def mm(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(eq, x, w)`` with the kit's matmul dtype policy.

    float32 weights: plain float32 math (the reference's numerics).
    bfloat16 / float16 weights: activations are cast to the weight dtype and
    the products are accumulated in float32, which is what the accelerators'
    matrix units (and this CPU's AVX-512 BF16) do fastest; the result is float32.
    """
    if w.dtype == jnp.float32:
        return jnp.einsum(eq, x.astype(jnp.float32), w)
    return jnp.einsum(eq, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def to_device(array: np.ndarray) -> jax.Array:
    """numpy -> jax without a copy when the memory allows it (CPU, aligned)."""
    try:
        return jax.device_put(array, may_alias=True)
    except TypeError:  # older JAX without may_alias
        return jnp.asarray(array)


@jax.tree_util.register_pytree_node_class
class OutIn:
    """A weight matrix kept transposed, (out, in), as column blocks: y = x @ w.T.

    Weights are stored (in, out). For one token at a time, XLA:CPU multiplies
    a bfloat16 (in, out) matrix through a slow generic kernel, but reads an
    (out, in) one at full memory speed, provided ``in`` is at most ~3000
    (longer rows fall back to the slow kernel). So the CPU inference layout
    keeps such copies, split along ``in`` into blocks of at most ``BLOCK``.
    """

    BLOCK = 2304

    def __init__(self, blocks):
        self.blocks = tuple(blocks)  # each (out, in_block), contiguous

    @classmethod
    def from_in_out(cls, w: np.ndarray) -> OutIn:
        """Copy a host (in, out) matrix into transposed blocks (out, <= BLOCK)."""
        n = -(-w.shape[0] // cls.BLOCK)
        return cls(to_device(np.ascontiguousarray(part.T)) for part in np.array_split(w, n))

    def tree_flatten(self):
        return self.blocks, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children)


def dense(x, w):
    """x float[..., in] -> float[..., out] for w (in, out), or an ``OutIn``.

    Always plain 2-D matmuls (leading axes flattened): XLA:CPU picks slow
    generic kernels for 3-D operands. For an OutIn and one row, ``x @ w.T``
    maps to XLA:CPU's fast row-major matrix-vector kernel; for several rows
    the direct contraction is the fast form.
    """
    lead = x.shape[:-1]
    # The barrier gives each matmul its own copy of the input as far as XLA can
    # tell; otherwise XLA's dot-merger pass fuses matmuls that share an input
    # (gate and up, the heads of q) by concatenating their weights: a copy of
    # those weights on every call.
    x2 = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]))
    if not isinstance(w, OutIn):
        y = _matmul(x2, w)
    else:
        parts, start = [], 0
        for block in w.blocks:
            part = x2[:, start : start + block.shape[1]]
            start += block.shape[1]
            parts.append(_matmul(part, block.T) if x2.shape[0] == 1 else _matmul(part, block, 1))
        # Summing behind a barrier keeps each product a separate matmul kernel
        # (an add fused into it would make XLA:CPU convert the block first).
        y = sum(jax.lax.optimization_barrier(tuple(parts))) if len(parts) > 1 else parts[0]
    return y.reshape(*lead, y.shape[-1])


def _matmul(x, w, contract_rhs: int = 0):
    """2-D x @ w (or x @ w.T when contract_rhs=1) with the dtype policy of ``mm``."""
    dims = (((1,), (contract_rhs,)), ((), ()))
    if w.dtype == jnp.float32:
        return jax.lax.dot_general(x.astype(jnp.float32), w, dims)
    return jax.lax.dot_general(x.astype(w.dtype), w, dims, preferred_element_type=jnp.float32)


def init_stacked(layer, rng: jax.Array, depth: int, *example_args, **example_kw) -> Params:
    """Initialise ``depth`` copies of ``layer`` stacked on a new leading axis."""

    def init_one(key):
        return layer.init(key, *example_args, **example_kw)["params"]

    return jax.vmap(init_one)(jax.random.split(rng, depth))


def stacked_param(module, name: str, init_fn):
    """Declare a stacked-layers parameter (a whole tree) in a Flax module's ``setup``.

    When the parameter already exists it is returned as given, without Flax's
    shape check, so the same module also accepts the per-layer views made by
    ``split_layers``.
    """
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init_fn)


def layer_slice(stacked: Params, i: int) -> Params:
    """The parameters of layer ``i`` (a static index: no copy in the unrolled loop)."""
    return jax.tree.map(lambda a: a[i], stacked)


def run_stack(
    apply_layer: Callable,
    stacked: Params,
    carry: Any,
    *,
    scan: bool = False,
    remat: bool = False,
):
    """Run a carry (activations, and a KV cache if any) through every layer.

    Args:
      apply_layer: ``(params_i, carry, i) -> carry`` for layer ``i``. ``i`` is a
        Python int when unrolled and a traced int32 under ``scan``; a KV cache
        in the carry is updated in place with ``cache.at[i, ...].set(...)``.
      stacked: parameters with a leading ``depth`` axis.
      carry: what flows from layer to layer.
      scan: use ``lax.scan`` over the stack instead of a Python loop.
      remat: recompute each layer's activations in the backward pass.
    """
    if isinstance(stacked, (list, tuple)):  # already split into layers (see split_layers)
        if scan:
            raise ValueError("scan=True needs the stacked parameters, not per-layer views")
        for i, params_i in enumerate(stacked):
            step = functools.partial(apply_layer, i=i)
            carry = (jax.checkpoint(step) if remat else step)(params_i, carry)
        return carry
    depth = jax.tree.leaves(stacked)[0].shape[0]
    if scan:

        def body(carry, xs):
            params_i, i = xs
            return apply_layer(params_i, carry, i), None

        body = jax.checkpoint(body) if remat else body
        carry, _ = jax.lax.scan(body, carry, (stacked, jnp.arange(depth)))
        return carry

    for i in range(depth):
        step = functools.partial(apply_layer, i=i)
        step = jax.checkpoint(step) if remat else step
        carry = step(layer_slice(stacked, i), carry)
    return carry


def split_leading(a: jax.Array) -> tuple[jax.Array, ...] | None:
    """Views ``a[0], a[1], ...`` sharing ``a``'s memory, or None where that's impossible.

    On CPU a JAX array's buffer is host memory: numpy can view it, and JAX can
    adopt any 64-byte-aligned piece of it without copying (``may_alias``). On
    GPU/TPU (or for arrays JAX won't alias) this returns None.
    """
    if not _on_one_cpu(a):
        return None
    host = np.asarray(a)  # no copy for a CPU array
    if host.ctypes.data != a.unsafe_buffer_pointer():
        return None
    try:
        parts = tuple(jax.device_put(host[i], may_alias=True) for i in range(a.shape[0]))
    except TypeError:  # JAX without may_alias
        return None
    if any(p.unsafe_buffer_pointer() != host[i].ctypes.data for i, p in enumerate(parts)):
        return None  # JAX copied (misaligned piece): not worth keeping
    return parts


def split_layers(stacked: Params) -> tuple[Params, ...] | Params:
    """Per-layer views of a stacked tree that share its memory (CPU only).

    Inside ``jit``, XLA:CPU copies ``w[i]`` out of a stacked weight before each
    matmul (for every layer, every call). Handing the compiled function one
    array per layer avoids that, and on CPU those arrays alias the stacked
    buffer, so nothing is copied and no memory is added. Elsewhere (GPU/TPU)
    the stacked tree is returned unchanged.
    """
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [split_leading(a) for a in leaves]
    if not leaves or any(p is None for p in parts):
        return stacked
    return tuple(jax.tree.unflatten(treedef, layer) for layer in zip(*parts))


def _on_one_cpu(a) -> bool:
    try:
        return (
            isinstance(a, jax.Array)
            and a.is_fully_addressable
            and len(a.devices()) == 1
            and next(iter(a.devices())).platform == "cpu"
            and a.ndim >= 1
        )
    except Exception:  # deleted or unusual arrays: just don't split
        return False
