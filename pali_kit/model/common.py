"""Small pieces shared by the image encoder and the language model.

Matrix products and the numerics policy
---------------------------------------
Every product of an activation with a weight goes through :func:`mm`
(``jnp.einsum(eq, x, w)`` with the kit's dtype policy). Activations are
float32 everywhere; the weights keep their storage dtype, and the storage
dtype never makes an activation overflow where float32 does not:

- float32 weights: float32 products (the reference's numerics).
- bfloat16 weights: the activation is rounded to bfloat16 (relative error
  <= 2^-8; bfloat16 has float32's exponent range, so nothing overflows) and
  the products are accumulated in float32: what TPU matrix units and
  AVX-512 BF16 do natively.
- float16 weights: float16 tops out at 65504, so each activation row (the
  axes the product sums over) is first multiplied by an exact power of two
  that brings its largest magnitude into [2^13, 2^14), then rounded to
  float16 (error <= 2^-11 of that largest value); the products
  accumulate in float32 (tensor cores on a T4 do f16 x f16 -> f32 natively)
  and the result is multiplied back by the inverse power of two, exactly.
- Gradients through half-precision weights are computed the same way and
  come back float32 (a custom VJP), so a training step with frozen float16
  weights neither overflows nor flushes small gradients to zero.

- float32 times float32 (float32 weights, and the attention products of
  float32 activations) is computed at ``Precision.HIGHEST``: true float32 on
  every backend. XLA's default would round the operands to TensorFloat-32 on
  Ampere and newer GPUs and to bfloat16 passes on TPUs; on an H200 that moved
  the fixture models' float32 logits by up to 1.0e-2 of their scale, against
  7e-6 at HIGHEST (``bench/gpu_check.py``). CPUs and T4s compute float32
  either way.

``compute_dtype`` (``PaliGemmaConfig.compute_dtype``, ``pk.load(...,
compute_dtype=...)``) overrides the policy: ``"float32"`` upcasts every
weight (exactly the reference, slow on accelerators' matrix units);
``"bfloat16"`` / ``"float16"`` cast activations and weights to that dtype
with no scaling and leave the attention products at the backend's default
precision (the fastest form on a GPU; **with float16 any activation above
65504 becomes inf**).

Layer stacks
------------
Both towers keep their layers *stacked*: every per-layer weight has a leading
axis of size ``depth`` (big_vision's scan layout, so a released ``.npz`` loads
without renaming). A layer is a plain Flax module applied to one slice of that
stack, unrolled (a Python loop) or under ``lax.scan`` (training: one compiled
layer, optionally rematerialised).

A weight may also arrive in a *run layout* (``pali_kit.model.cpu``): any
object with an ``einsum(eq, x, compute_dtype)`` method computing the same
product, and layer stacks whose leaves are sequences of per-layer pieces.
The model code does not know about them: ``mm`` hands such a weight its own
product, and ``layer_slice`` indexes whatever it is given.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]

COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")

# float16 activations are scaled so that a row's largest magnitude lies in
# [2^SCALE_EXP - 1, 2^SCALE_EXP): far from 65504 (2^16), far above the
# subnormals (2^-14), and products of two float16 values stay exact in float32.
SCALE_EXP = 14


def mm(eq: str, x: jax.Array, w, compute_dtype: str | None = None) -> jax.Array:
    """``jnp.einsum(eq, x, w)`` -> float32, under the numerics policy above.

    x: float activations; w: a weight array in its storage dtype (or a run-layout
    weight with an ``einsum`` method). ``eq`` names x's axes first, then w's.
    """
    product = getattr(w, "einsum", None)
    if product is not None:  # a run-layout weight (pali_kit.model.cpu) multiplies itself
        return product(eq, x, compute_dtype)
    return policy_einsum(eq, x, w, compute_dtype)


HIGHEST = jax.lax.Precision.HIGHEST


def activation_precision(compute_dtype: str | None = None):
    """Precision of products of two float32 activations (attention): HIGHEST under
    the policy, the backend's default with a half-precision ``compute_dtype``."""
    return None if compute_dtype in ("bfloat16", "float16") else HIGHEST


def operand_dtype(weight_dtype, compute_dtype: str | None = None):
    """The dtype both operands of a product are rounded to (float32: no rounding)."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    return jnp.dtype(jnp.float32 if weight_dtype == jnp.float32 else weight_dtype)


def narrow_range(dtype) -> bool:
    """True for dtypes that overflow far below float32 (float16): these get scaled."""
    return jnp.finfo(dtype).max < jnp.finfo(jnp.float32).max / 2


def policy_einsum(eq: str, x, w, compute_dtype: str | None = None):
    """The policy for a plain weight array (see the module docstring)."""
    x = x.astype(jnp.float32)
    dtype = operand_dtype(w.dtype, compute_dtype)
    if dtype == jnp.float32:
        return jnp.einsum(eq, x, w.astype(jnp.float32), precision=HIGHEST)
    if compute_dtype is not None:  # explicit opt-in: no scaling
        return jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return _half_einsum(expand_ellipsis(eq, x.ndim), x, w)


def scale_rows(x, axes: tuple[int, ...]):
    """x float32 -> (x / 2^e, 2^e) with max |x / 2^e| over ``axes`` in [2^13, 2^14).

    2^e is float32 of x's shape with ``axes`` kept as size 1. Multiplying by a
    power of two is exact, so scaling the product back by 2^e loses nothing.
    (e is clipped to [-100, 100]: rows below 2^-86 stay unscaled and round to
    float16 zeros, rows above 2^114 overflow as they would in float32.)
    """
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    _, e = jnp.frexp(jnp.where(jnp.isfinite(amax), amax, 1.0))  # amax = m 2^e, 0.5 <= m < 1
    e = jax.lax.stop_gradient(jnp.clip(e - SCALE_EXP, -100, 100))
    one = jnp.ones(e.shape, jnp.float32)
    return x * jnp.ldexp(one, -e), jnp.ldexp(one, e)


def half_product(eq: str, x, w):
    """float32 x times half-precision w in w's dtype, float32 accumulation, range-safe.

    eq: an einsum without ellipsis. For narrow-range dtypes (float16) x is
    scaled per row (over the axes the product sums over) by ``scale_rows``.
    """
    xl, wl, ol = einsum_labels(eq)
    if not narrow_range(w.dtype):
        return jnp.einsum(eq, x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    summed = tuple(i for i, label in enumerate(xl) if label not in ol)
    xs, scale = scale_rows(x, summed)
    y = jnp.einsum(eq, xs.astype(w.dtype), w, preferred_element_type=jnp.float32)
    # scale's kept axes are x's non-summed axes: put them where the output has them.
    kept = "".join(label for label in xl if label in ol)
    scale = scale.reshape([n for n, label in zip(x.shape, xl) if label in ol])
    order = "".join(label for label in ol if label in kept)
    scale = jnp.einsum(f"{kept}->{order}", scale) if order != kept else scale
    return y * scale.reshape([scale.shape[order.index(c)] if c in order else 1 for c in ol])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _half_einsum(eq, x, w):
    return half_product(eq, x, w)


def _half_einsum_fwd(eq, x, w):
    return half_product(eq, x, w), (x, w)


def _half_einsum_bwd(eq, residuals, g):
    # d/dx: the same range-safe product of the float32 cotangent with w; d/dw in float32.
    x, w = residuals
    xl, wl, ol = einsum_labels(eq)
    gx = half_product(f"{ol},{wl}->{xl}", g.astype(jnp.float32), w)
    gw = jnp.einsum(f"{xl},{ol}->{wl}", x, g.astype(jnp.float32))
    return gx.astype(x.dtype), gw.astype(w.dtype)


_half_einsum.defvjp(_half_einsum_fwd, _half_einsum_bwd)


def einsum_labels(eq: str) -> tuple[str, str, str]:
    inputs, out = eq.replace(" ", "").split("->")
    xl, wl = inputs.split(",")
    return xl, wl, out


def expand_ellipsis(eq: str, x_ndim: int) -> str:
    """'...d,dv->...v' -> 'ABd,dv->ABv' for a 3-D x (only x and the output may use '...')."""
    if "..." not in eq:
        return eq
    xl, wl, ol = einsum_labels(eq)
    n = x_ndim - (len(xl) - 3)
    fill = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)[:n]
    return f"{xl.replace('...', fill)},{wl}->{ol.replace('...', fill)}"


def weight(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...]):
    """``module.param(name, init, shape)``; a value already given is used as it is.

    (Flax would otherwise check its shape against ``shape``; a run-layout weight,
    see ``pali_kit.model.cpu``, holds the same matrix in another form.)
    """
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape)


def to_device(array: np.ndarray) -> jax.Array:
    """numpy -> jax without a copy when the memory allows it (CPU, aligned)."""
    try:
        return jax.device_put(array, may_alias=True)
    except TypeError:  # older JAX without may_alias
        return jnp.asarray(array)


def init_stacked(layer, rng: jax.Array, depth: int, *example_args, **example_kw) -> Params:
    """Initialise ``depth`` copies of ``layer`` stacked on a new leading axis."""

    def init_one(key):
        return layer.init(key, *example_args, **example_kw)["params"]

    return jax.vmap(init_one)(jax.random.split(rng, depth))


def stacked_param(module, name: str, init_fn):
    """Declare a stacked-layers parameter (a whole tree) in a Flax module's ``setup``.

    A tree already given is returned as it is (no shape check), so the module
    also runs a run layout of the same weights.
    """
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init_fn)


def layer_slice(stacked, i: int):
    """The parameters of layer ``i``: ``leaf[i]`` for every leaf of the nested dicts.

    A static index: the unrolled loop reads the layer in place.
    """
    if isinstance(stacked, Mapping):
        return {k: layer_slice(v, i) for k, v in stacked.items()}
    return stacked[i]


def stack_depth(stacked) -> int:
    """Number of layers in a stack (the leading size of its leaves)."""
    while isinstance(stacked, Mapping):
        stacked = next(iter(stacked.values()))
    return len(stacked)


def run_stack(
    apply_layer: Callable,
    stacked: Params,
    carry: Any,
    *,
    scan: bool = False,
    remat: bool = False,
):
    """Run a carry (activations) through every layer.

    Args:
      apply_layer: ``(params_i, carry, i) -> carry`` for layer ``i`` (a Python
        int when unrolled, a traced int32 under ``scan``).
      stacked: parameters with a leading ``depth`` axis.
      carry: what flows from layer to layer.
      scan: ``lax.scan`` over the stack instead of a Python loop.
      remat: recompute each layer's activations in the backward pass.
    """
    depth = stack_depth(stacked)
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


# The widest (out, in) block XLA:CPU's fast one-row kernel takes: the CPU inference
# layout (model/cpu.py) and quantized weights on the CPU (quant.for_cpu) cut wider
# matrices into blocks of at most this many columns.
BLOCK = 2304


def policy_matmul(x, w, compute_dtype=None, contract_rhs: int = 0):
    """2-D ``x @ w`` (``x @ w.T`` with contract_rhs=1) -> float32, under the numerics policy."""
    dims = (((1,), (contract_rhs,)), ((), ()))
    x = x.astype(jnp.float32)
    dtype = operand_dtype(w.dtype, compute_dtype)
    if dtype == jnp.float32:
        return jax.lax.dot_general(x, w.astype(jnp.float32), dims, precision=HIGHEST)
    if compute_dtype is None and narrow_range(dtype):
        xs, scale = scale_rows(x, (1,))
        y = jax.lax.dot_general(xs.astype(dtype), w, dims, preferred_element_type=jnp.float32)
        return y * scale
    return jax.lax.dot_general(
        x.astype(dtype), w.astype(dtype), dims, preferred_element_type=jnp.float32
    )


_POOL = None


def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The kit's host threads, min(4, CPUs) of them, for numpy and file work that lets go
    of the interpreter while loading: transposing (out, in) blocks, CRC-32s, quantizing
    slices. Work run on it must not wait for other work on it."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1),
                                                      thread_name_prefix="pali_kit host")  # fmt: skip
    return _POOL


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 2 MiB boundary.

    JAX can adopt page-aligned memory as it is (``device_put(..., may_alias=True)``)
    instead of copying it, so loading touches every byte of the weights once;
    2 MiB alignment lets the kernel back it with huge pages (faster first touch).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    align = 1 << 21 if nbytes >= 1 << 22 else 64
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)
