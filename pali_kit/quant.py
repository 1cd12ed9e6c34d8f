"""Weight-only int8 / int4 quantization: a pytree leaf type, quantize, dequantize, matmul.

Every large matrix of the model (attention and MLP weights of both towers, the
vision head and the LLM's embedding table, which is also the output layer)
can be replaced by a :class:`QArray`: integer values and float32 scales,
symmetric (no zero point). Activations, norms, biases, the patch embedding
and the position embedding stay in floating point.

Schemes::

    "int8"  per output channel: one scale per output column, s = max|w| / 127 over
            the contraction axes, q = round(w / s) in [-127, 127], one byte each.
    "int4"  grouped: one scale per output column and per group of GROUP_SIZE = 64
            consecutive inputs, s = max|w| / 7 over the group, q = round(w / s) in
            [-7, 7], two values per byte; plus 4 bytes of scale per 64 weights.

Bytes per weight: int8 1 (+4 per column), int4 0.5625; bfloat16 is 2.
Rounding to the nearest level bounds the round-trip error of every element by
half a step: ``|w - dequantize(quantize(w))| <= s / 2`` (``s`` the scale of its
column / group), up to float32 rounding of ``w / s``.

Storage layout: a QArray stands for a weight of the official (logical) shape,
say ``q_einsum/w`` (L, Nh, W, H) contracted over W. Its values are kept with
the contraction axes moved last and flattened, ``(L, Nh, H, W)``: "(out, in)",
the layout XLA:CPU reads fastest for one token; XLA:GPU/TPU matmuls take
either. Rows wider than XLA:CPU's one-row loop takes (the MLP's output
matrix, 9216 inputs) are stored as column blocks, ``linear/`` (L, F, W) as
``(L, 4, W, F / 4)`` in int8. Leading (layer) axes index like an array:
``q[i]`` is layer ``i``.

Products: the model's modules call ``w.einsum(eq, x, compute_dtype)`` on a
weight that has the method (``pali_kit.model.common.mm``). On a GPU/TPU
(a plain QArray): products of at most ``REDUCE_ROWS`` rows (decoding) are one
multiply-and-sum over the integers, a single reduction that reads each byte
once (``_reduce_rows``); longer int8 products multiply a plain conversion of
the integers and scale the result (``_int8_product``), which XLA:GPU's matmul
reads in place; longer int4 products multiply the group-scaled levels as the
dot's operand, per nibble (``_int4_product``; on XLA:CPU, a plain QArray when
training, the matrix is dequantized to the dtype it stands for once its input
exists). A dot whose weight operand was the dequantized matrix was compiled
with the float matrix written out first (measured on an H200:
``bench/gpu_check.py``, ``docs/quantization.md``). The CPU layout
(``pali_kit.model.cpu``) turns QArrays into :class:`CpuQArray`: products of at
most ``REDUCE_ROWS`` rows (decoding) then read the integers in place (see
``_reduce_matvec``); longer ones (prefill) dequantize each matrix when its
input exists, so one matrix at a time is float (``_after``); the 257152-row
output layer is dequantized chunk by chunk. On x86-64 CPUs with AVX-512 BF16,
one-row int4 products of weights standing for bfloat16 run a native kernel
instead of XLA's loop (``pali_kit.native``, built on first use with the system
C++ compiler; ``NATIVE_INT4 = False`` or ``PALI_KIT_NATIVE=0`` turn it off).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4")
GROUP_SIZE = 64  # int4: inputs per scale, along the contraction axes
_QMAX = {"int8": 127, "int4": 7}

# Which weights are quantized, and over which axes each is contracted (negative
# axes: the leading layer axis, where present, is not counted).
RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"llm/embedder/input_embedding", (-1,)),  # (V, W): the output layer contracts W
    (r"llm/layers/attn/q_einsum/w", (-2,)),  # (L, Nh, W, H)
    (r"llm/layers/attn/kv_einsum/w", (-2,)),  # (L, 2, K, W, H)
    (r"llm/layers/attn/attn_vec_einsum/w", (-3, -2)),  # (L, Nh, H, W)
    (r"llm/layers/mlp/gating_einsum", (-2,)),  # (L, 2, W, F)
    (r"llm/layers/mlp/linear", (-2,)),  # (L, F, W)
    (
        r"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/(query|key|value)/kernel",
        (-3,),
    ),  # (L, D, heads, head_dim)  # fmt: skip
    (r"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel", (-3, -2)),
    (r"img/Transformer/encoderblock/MlpBlock_0/Dense_[01]/kernel", (-2,)),  # (L, D, M) / (L, M, D)
    (r"img/head/kernel", (-2,)),  # (D, W)
)


def check_scheme(quantize) -> str | None:
    """Validate a ``quantize=`` argument: None, "int8" or "int4"."""
    if quantize is None or quantize in SCHEMES:
        return quantize
    raise ValueError(
        f"quantize={quantize!r} is not a quantization scheme: use 'int8' (per-channel, "
        f"1 byte per weight), 'int4' (groups of {GROUP_SIZE}, ~0.56 bytes per weight) or None"
    )


def contraction_axes(key: str) -> tuple[int, ...] | None:
    """The contraction axes of the weight named ``key`` (``/``-joined), None if not quantized."""
    for pattern, axes in RULES:
        if re.fullmatch(pattern, key):
            return axes
    return None


# ============================================================================ the leaf type


@jax.tree_util.register_pytree_node_class
class QArray:
    """A quantized weight that stands for a float array of logical shape ``shape``.

    Children (arrays, what jit sees):
      values: int8[*out, in] for "int8"; int8[*out, in_padded // 2] for "int4"
        (two 4-bit two's complement values per byte: byte = (q[2j] & 15) + 16 * q[2j+1],
        i.e. input 2j in the low nibble, input 2j+1 in the high one; ``in`` padded
        with zeros to a multiple of GROUP_SIZE). Rows wider than ``model.common.BLOCK``
        bytes are stored as equal column blocks, ``[*out[:-1], blocks, out[-1], bytes
        / blocks]`` (``blocks``, ``out_in_values``; see ``quantize``).
      scales: float32[*out, groups]: groups = 1 ("int8") or in_padded // GROUP_SIZE.
    Static:
      scheme "int8" | "int4"; in_axes: the contracted axes of the logical shape
      (negative); in_shape: their sizes; dtype: the float dtype it stands for
      (what dequantize returns).

    ``out`` are the logical axes not contracted, in their order. Indexing a
    leading axis (``q[i]``, layer ``i``) and ``jax.tree.map`` over the children
    keep it a QArray.
    """

    def __init__(self, values, scales, scheme: str, in_axes, in_shape, dtype=np.float32):
        self.values = values
        self.scales = scales
        self.scheme = scheme
        self.in_axes = tuple(int(a) for a in in_axes)
        self.in_shape = tuple(int(n) for n in in_shape)
        self.dtype = np.dtype(dtype)

    # --- pytree
    def tree_flatten(self):
        aux = (self.scheme, self.in_axes, self.in_shape, self.dtype)
        return (self.values, self.scales), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def _replace(self, values, scales) -> QArray:
        return type(self)(values, scales, self.scheme, self.in_axes, self.in_shape, self.dtype)

    # --- array-like facts
    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of values per output: in (int8), in_padded / 2 (int4)."""
        if self.scheme == "int8":
            return self.in_size
        return -(-self.in_size // GROUP_SIZE) * GROUP_SIZE // 2

    @property
    def blocks(self) -> int:
        """Column blocks the values are stored in (1: plain (out, in) rows; see ``quantize``)."""
        return self.row_bytes // self.values.shape[-1]

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = tuple(self.values.shape[:-1])
        return shape if self.blocks == 1 else shape[:-2] + shape[-1:]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (official) shape this weight stands for."""
        shape = list(self.out_shape)
        ndim = len(shape) + len(self.in_axes)
        for axis, n in sorted(zip((a % ndim for a in self.in_axes), self.in_shape)):
            shape.insert(axis, n)
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus scales."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.children())

    def children(self):
        return (self.values, self.scales)

    def __getitem__(self, index):
        """Index the leading (not contracted) axes.

        ``q[i]`` of a layer stack is layer ``i`` (a QArray). An index that takes
        every output axis, ``table[tokens]`` of the (V, W) embedding, returns the
        dequantized rows ``float[..., W]`` (in ``dtype``).
        """
        index = index if isinstance(index, tuple) else (index,)
        leading = min(a % self.ndim for a in self.in_axes)  # logical axes before the first input
        if len(index) > leading:
            raise IndexError(
                f"a QArray of shape {self.shape} indexes its first {leading} axes only"
            )
        part = self._replace(self.values[index], self.scales[index])
        if len(index) < len(self.out_shape):
            return part
        return dequantize_out_in(part).reshape(*part.values.shape[:-1], *self.in_shape)

    def einsum(self, eq: str, x, compute_dtype=None) -> jax.Array:
        """``jnp.einsum(eq, x, W)`` -> float32 for the float weight W this stands for.

        The model's products (``pali_kit.model.common.mm``) call this: the weight
        is dequantized (to the dtype it stands for) right in front of the
        product, which then follows the kit's numerics policy exactly as for W.
        """
        return einsum(eq, x, self, compute_dtype=compute_dtype)

    def __repr__(self):
        return (f"QArray({self.scheme}, shape={self.shape}, stands for {self.dtype.name}, "
                f"{self.nbytes / 1e6:.2f} MB)")  # fmt: skip

    def dequantize(self) -> jax.Array:
        return dequantize(self)


@jax.tree_util.register_pytree_node_class
class CpuQArray(QArray):
    """A QArray whose products with at most ``REDUCE_ROWS`` rows read the integers in place.

    ``kernel``: ``(blocks, scales)`` the way that loop reads them: ``blocks`` a
    tuple of ``int8[O, bytes]`` covering each output's bytes in order (views of
    ``values``: the whole rows, or each stored column block; copies only for a
    wide matrix not stored in blocks), ``scales``
    ``float32[O, groups]`` (a view), made on the host by ``for_cpu``: XLA:CPU
    runs the loop several times slower when the reshape happens inside the
    compiled code. None where no view could be made.
    """

    def __init__(self, values, scales, scheme, in_axes, in_shape, dtype=np.float32, kernel=None):
        super().__init__(values, scales, scheme, in_axes, in_shape, dtype)
        self.kernel = kernel

    def tree_flatten(self):
        children, aux = super().tree_flatten()
        return (*children, self.kernel), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        values, scales, kernel = children
        return cls(values, scales, *aux, kernel=kernel)


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


# ============================================================================ quantize / dequantize


def _to_out_in(w, in_axes: Sequence[int]):
    """numpy/jax array -> (out-major array [*out, in], in_shape)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    nd = w.ndim
    ins = [a % nd for a in in_axes]
    outs = [a for a in range(nd) if a not in ins]
    moved = xp.transpose(w, outs + ins) if outs + ins != list(range(nd)) else w
    in_shape = tuple(w.shape[a] for a in ins)
    return moved.reshape(*moved.shape[: len(outs)], math.prod(in_shape)), in_shape


def _quantize_rows(m, scheme: str):
    """float[*out, in] -> (int8 values, float32 scales), numpy or jax alike.

    numpy: computed in place on one float32 copy of ``m`` (quantizing while
    loading keeps a single float temporary per slice).
    """
    xp = np if isinstance(m, np.ndarray) else jnp
    m = m.astype(np.float32) if xp is jnp else np.array(m, np.float32)  # a copy we may write
    qmax = _QMAX[scheme]
    if scheme == "int4":
        pad = (-m.shape[-1]) % GROUP_SIZE
        if pad:
            m = xp.concatenate([m, xp.zeros((*m.shape[:-1], pad), np.float32)], axis=-1)
        m = m.reshape(*m.shape[:-1], -1, GROUP_SIZE)
    else:
        m = m[..., None, :]  # one group: the whole row
    amax = xp.max(xp.abs(m), axis=-1) if xp is jnp else np.maximum(m.max(-1), -m.min(-1))
    scales = (amax / qmax).astype(np.float32)
    safe = xp.where(scales > 0, scales, 1.0)[..., None]  # an all-zero group: levels 0, scale 0
    if xp is np:
        np.divide(m, safe, out=m)
        np.rint(m, out=m)  # round half to even, as jnp.round
        np.clip(m, -qmax, qmax, out=m)
        q = m.astype(np.int8)
    else:
        q = jnp.clip(jnp.round(m / safe), -qmax, qmax).astype(np.int8)
    del m
    q = q.reshape(*q.shape[:-2], -1)
    if scheme == "int4":  # pack pairs, two's complement nibbles: low = even input, high = odd
        q = ((q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)).astype(np.int8)
    return q, scales


def quantize(w, scheme: str = "int8", in_axes: Sequence[int] = (-2,)) -> QArray:
    """A float array (numpy or jax) -> QArray.

    w: float[...] in its official layout; in_axes: the axes a matmul contracts
    (e.g. (-2,) for an (in, out) kernel). The result stands for ``w.dtype``.

    Rows of more than ``model.common.BLOCK`` bytes (the MLP's output matrix,
    9216 inputs) are stored as equal column blocks of at most BLOCK bytes,
    ``values int8[*out[:-1], blocks, out[-1], row_bytes / blocks]``, where the
    last output axis follows the contracted ones (so indexing the leading axes
    never meets the blocks axis): XLA:CPU's one-row loop reads each block as it
    is, with no copy (``for_cpu``).
    """
    check_scheme(scheme)
    if scheme is None:
        raise ValueError("quantize(w, scheme=None): pass 'int8' or 'int4'")
    from .model.common import BLOCK

    m, in_shape = _to_out_in(w, in_axes)
    values, scales = _quantize_rows(m, scheme)
    q = QArray(values, scales, scheme, in_axes, in_shape, w.dtype)
    ins = [a % w.ndim for a in in_axes]
    outs = [a for a in range(w.ndim) if a not in ins]
    if outs and outs[-1] > min(ins):  # the last output axis is never indexed: block before it
        n = column_blocks(q.row_bytes, scheme, BLOCK)
        if n > 1:
            q = q._replace(_split_blocks(values, n), scales)
    return q


def out_in_values(q: QArray):
    """The values as ``int8[*out, row_bytes]`` (column blocks joined; a copy if blocked)."""
    return _join_blocks(q.values) if q.blocks > 1 else q.values


def _join_blocks(v):
    """int8[..., n, O, w] -> int8[..., O, n * w]."""
    xp = np if isinstance(v, np.ndarray) else jnp
    v = xp.moveaxis(v, -3, -2)
    return v.reshape(*v.shape[:-2], -1)


def _split_blocks(v, n: int):
    """int8[..., O, n * w] -> int8[..., n, O, w] (numpy: a C-ordered copy)."""
    xp = np if isinstance(v, np.ndarray) else jnp
    v = xp.moveaxis(v.reshape(*v.shape[:-1], n, -1), -2, -3)
    return np.ascontiguousarray(v) if xp is np else v


def column_blocks(row_bytes: int, scheme: str, block: int) -> int:
    """How many equal column blocks of at most ``block`` bytes a row is stored in (1: none).

    Blocks split at group boundaries (int4: 32 bytes); 1 where no such split exists.
    """
    if row_bytes <= block:
        return 1
    unit = GROUP_SIZE // 2 if scheme == "int4" else 1
    for n in range(-(-row_bytes // block), row_bytes // unit + 1):
        if row_bytes % (n * unit) == 0:
            return n
    return 1


def unpack_values(q: QArray, dtype=jnp.float32):
    """The integer levels as ``dtype[*out, in_padded]`` (int4 unpacked; padding included)."""
    v = out_in_values(q)
    xp = np if isinstance(v, np.ndarray) else jnp
    if q.scheme == "int8":
        return v.astype(dtype)
    v = v.astype(np.int8)
    low = (v << 4) >> 4  # the even input: arithmetic shifts sign-extend the low nibble
    high = v >> 4  # the odd input
    return xp.stack([low, high], axis=-1).reshape(*v.shape[:-1], -1).astype(dtype)


def dequantize_out_in(q: QArray, dtype=None):
    """float[*out, in]: the weight in the QArray's (out, in) storage layout."""
    levels = unpack_values(q, np.float32)
    groups = q.scales.shape[-1]
    levels = levels.reshape(*levels.shape[:-1], groups, -1) * q.scales[..., None]
    w = levels.reshape(*levels.shape[:-2], -1)[..., : q.in_size]
    return w.astype(dtype or q.dtype)


def dequantize(q: QArray, dtype=None):
    """The float array a QArray stands for, in the official layout and shape."""
    w = dequantize_out_in(q, dtype)
    nd = q.ndim
    ins = [a % nd for a in q.in_axes]
    outs = [a for a in range(nd) if a not in ins]
    w = w.reshape(*q.out_shape, *q.in_shape)
    xp = np if isinstance(w, np.ndarray) else jnp
    return xp.transpose(w, np.argsort(outs + ins))


# ============================================================================ matmul


REDUCE_ROWS = 4  # CPU: products with at most this many rows use the fused reduce


def matmul(x, q: QArray, compute_dtype=None) -> jax.Array:
    """x float[..., in] times the weight -> float32[..., *out] (``in``: the contracted axes flattened).

    At most ``REDUCE_ROWS`` rows of ``x`` (decoding) compute
    ``y[o] = sum_k x[k] * q[o, k] * s[o, g(k)]`` in float32 reading the integers
    in place, no float copy of the weight: a :class:`CpuQArray` in XLA:CPU's
    one-row loops (``_reduce_matvec``), any other QArray as one multiply-and-sum
    (``_reduce_rows``). More rows of an int8 QArray: the integers, converted
    exactly to the dtype the weight stands for, enter the product under the
    numerics policy and the channel scales multiply its result
    (``_int8_product``). More rows of an int4 QArray on GPU/TPU: the group-scaled
    levels are the dot's operand, per nibble (``_int4_product``). Otherwise the
    weight is dequantized to the dtype it stands for (a chunk of rows at a time
    for the output layer) and multiplied under the numerics policy
    (``pali_kit.model.common.policy_matmul``).
    """
    from .model.common import policy_einsum, policy_matmul

    if x.shape[-1] != q.in_size:
        raise ValueError(
            f"matmul: x has {x.shape[-1]} inputs, the weight {q.shape} takes {q.in_size}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, q.in_size)
    if isinstance(q, CpuQArray):  # inference only
        product = lambda x2, w: policy_matmul(x2, w, compute_dtype, contract_rhs=1)  # noqa: E731
    else:  # policy_einsum's gradient is range-safe too (training with frozen QArrays)
        product = lambda x2, w: policy_einsum("rk,ok->ro", x2, w, compute_dtype)  # noqa: E731
    if isinstance(q, CpuQArray) and _native_int4(x2, q, compute_dtype):
        y = _native_matvec(x2, q)
    elif isinstance(q, CpuQArray) and x2.shape[0] <= REDUCE_ROWS:
        y = _reduce_matvec(x2.astype(jnp.float32), q)
    elif x2.shape[0] <= REDUCE_ROWS:
        y = _reduce_rows(x2.astype(jnp.float32), q)
    elif q.scheme == "int8" and not isinstance(q, CpuQArray) and _chunks(q) == 1:
        y = _int8_product(x2, q, compute_dtype)
    elif q.scheme == "int4" and not isinstance(q, CpuQArray) and INT4_PRODUCT != "dequantize":
        # XLA:GPU/TPU: the dequantization inside the dot's operand; XLA:CPU (a plain
        # QArray: training) multiplies library dots, which take no fused operand:
        # the float matrix, written once, is its smallest temporary.
        by_rows = _int4_rows if _chunks(q) == 1 else _int4_chunks
        first = lambda x2, q: by_rows(x2, q, compute_dtype, product)  # noqa: E731
        fused = lambda x2, q: by_rows(x2, q, compute_dtype, None)  # noqa: E731
        if INT4_PRODUCT == "auto":  # measured on XLA:GPU only (bench/README.md, "On a GPU")
            y = jax.lax.platform_dependent(x2, q, cuda=fused, default=first)
        else:
            y = jax.lax.platform_dependent(x2, q, cpu=first, default=fused)
    elif _chunks(q) == 1:
        y = _dequantized_product(x2, q, product)
    else:  # the output layer: dequantize one chunk of rows at a time
        chunk = jax.checkpoint(lambda c: product(x2, dequantize_out_in(c)))
        y = jax.lax.map(chunk, _split(q, _chunks(q)))  # [n, R, O / n]
        y = jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], -1)
    return y.reshape(*lead, *q.out_shape)


def _reduce_rows(x2, q: QArray):
    """float32[R, in] x QArray -> float32[R, O] as one multiply-and-sum over the integers.

    What XLA:GPU/TPU emit as a single reduction reading each stored byte once,
    converting as it reads (a dot whose operand is scaled would first write the
    float weight out: measured on an H200, ``bench/gpu_check.py``). A decode
    step is memory-bound, so the bytes read are the time.

    int8: ``y[r, o] = s[o] * sum_k x[r, k] q[o, k]``; int4, per group ``g`` of
    GROUP_SIZE inputs, the low nibbles holding the even inputs and the high ones
    the odd inputs: ``y[r, o] = sum_g s[o, g] sum_j (x_even[r, g, j] lo[o, g, j]
    + x_odd[r, g, j] hi[o, g, j])``. Products of float32 inputs and small
    integers are exact; the sums are float32.
    """
    # values as int8[O', n, O_last, w]: n column blocks of w bytes (n = 1: plain rows)
    n, w = q.blocks, q.values.shape[-1]
    out_last = q.out_shape[-1]
    v = q.values.reshape(-1, n, out_last, w)
    r = x2.shape[0]
    if q.scheme == "int8":
        xb = x2.reshape(r, 1, n, 1, w)
        y = jnp.sum(xb * v[None].astype(jnp.float32), axis=(2, 4))  # [R, O', O_last]
        return y.reshape(r, -1) * q.scales.reshape(1, -1)
    per = w // (GROUP_SIZE // 2)  # groups per block
    x2 = jnp.pad(x2, ((0, 0), (0, 2 * n * w - x2.shape[1])))
    half = (r, 1, n, 1, per, GROUP_SIZE // 2)
    x_even, x_odd = x2[:, 0::2].reshape(half), x2[:, 1::2].reshape(half)
    v = v.reshape(1, *v.shape[:3], per, GROUP_SIZE // 2)
    low = ((v << 4) >> 4).astype(jnp.float32)  # arithmetic shifts sign-extend: even inputs
    high = (v >> 4).astype(jnp.float32)  # the odd inputs
    per_group = jnp.sum(x_even * low + x_odd * high, axis=-1)  # [R, O', n, O_last, per]
    s = q.scales.reshape(-1, out_last, n, per)  # a row's groups run across its blocks
    y = jnp.sum(per_group * jnp.swapaxes(s, 1, 2)[None], axis=(2, 4))  # [R, O', O_last]
    return y.reshape(r, -1)


def _int8_product(x2, q: QArray, compute_dtype=None):
    """float32[R, in] x int8 QArray -> float32[R, O]: ``(x @ convert(v).T) * s``.

    The channel scale factors out of the sum, so the matmul's weight operand is
    a plain conversion of the integers (exact in float16/bfloat16/float32),
    which XLA:GPU's matmul fusion reads in place; a scaled operand it would
    write out as a float matrix first. The product follows the numerics policy
    for the dtype the weight stands for (``policy_einsum``).
    """
    from .model.common import operand_dtype, policy_einsum

    v = out_in_values(q).reshape(-1, q.in_size)  # blocks joined: a transpose of the int8
    levels = v.astype(operand_dtype(q.dtype, compute_dtype))
    y = policy_einsum("rk,ok->ro", x2, levels, compute_dtype)
    return y * q.scales.reshape(1, -1)


# GPU/TPU, int4, more than REDUCE_ROWS rows: the group-scaled levels as the dot's
# operand (_int4_product), unpacked by "shifts" or by a bitcast to XLA's int4 ("s4");
# or "dequantize": the float matrix written first (the former form). "auto" (the
# default): "s4" on CUDA, "dequantize" elsewhere. On an H200 (JAX 0.11.2, 256 rows;
# bench/results/gpu_session3_int4/) XLA:GPU fused none of them into its matmul (the
# grouped scales' broadcast is what it refuses: without them it fuses), but "s4" wrote
# no more temporaries than "dequantize" and was as fast or faster for the 3B and 10B
# MLP matrices; TPUs were not measured, so they keep the former form. The others are
# kept for bench/gpu_check.py to compare.
INT4_PRODUCT = "auto"


def _int4_rows(x2, q: QArray, compute_dtype, product=None):
    """float32[R, in] x int4 QArray -> float32[R, O]: ``_int4_product``, or with ``product``
    (a 2-D ``x @ w.T``), the weight dequantized once ``x2`` exists."""
    if product is None:
        return _int4_product(x2, q, compute_dtype)
    return _dequantized_product(x2, q, product)


def _dequantized_product(x2, q: QArray, product):
    """``product(x2, w)`` with ``w`` [O, in] dequantized to the dtype it stands for once
    ``x2`` exists: layer by layer, not all matrices first (see ``_after``)."""
    w = dequantize_out_in(q._replace(q.values, _after(x2, q.scales)))
    return product(x2, w.reshape(-1, q.in_size))


def _int4_chunks(x2, q: QArray, compute_dtype, product=None):
    """``_int4_rows`` for the output layer, a chunk of rows at a time (lax.map)."""
    chunk = jax.checkpoint(lambda c: _int4_rows(x2, c, compute_dtype, product))
    y = jax.lax.map(chunk, _split(q, _chunks(q)))  # [n, R, O / n]
    return jnp.moveaxis(y, 0, 1).reshape(x2.shape[0], -1)


def _int4_product(x2, q: QArray, compute_dtype=None, form: str | None = None):
    """float32[R, in] x int4 QArray -> float32[R, O], the dequantization inside the dot's operand.

    Per nibble and per column block (``blocks``; 1 for most matrices), one
    product contracting the block's trailing ``(groups, 32)`` byte axes, which
    are contiguous in memory: ``y = sum_b x_even[b] . W_low[b] + x_odd[b] .
    W_high[b]`` with ``W_low[b][o, g, j] = low(v[o, b, g, j]) * s[o, b, g]``
    (``high`` alike). Each operand is an elementwise function of the stored
    bytes and of the group scales broadcast along their 32 bytes: no reshape,
    concatenation or transpose of anything of the weight's size precedes a dot
    (the interleaving of the nibbles, which the former form did on the float
    matrix, is done on the activations: ``x[:, 0::2]``, ``x[:, 1::2]``), so a
    matmul fusion can read the bytes in place, as it reads ``_int8_product``'s
    converted int8 operand. The levels and the scales are rounded to the
    operand dtype (the dtype the weight stands for, or ``compute_dtype``) before
    their product: a half-precision operand may then differ from the
    dequantized weight by one more rounding (``|dw| <= 3 u |w|``, ``u`` the
    dtype's unit roundoff); float32 operands are exact. Products follow the
    numerics policy (``policy_einsum``).

    form: "shifts" (the above) or "s4", one product per block over the bytes
    bitcast to XLA's packed int4 type (``s4[..., 32, 2]``, the low nibble first,
    as stored: the same memory, read as it is); default ``INT4_PRODUCT`` ("auto": "s4").

    Temporaries when each product is one fused matmul: the activations' two
    halves (R * in * 4 bytes) and 2 * blocks [R, O] float32 results, none of the
    weight's size. Where the matmul takes no fused operand (a GPU without
    Triton matmuls, such as a T4), each scaled operand, half a float matrix, is
    written before its product: no more than the former form's float matrix.
    The form that keeps the group scales out of the operand, one product per
    group into float32[R, groups, O] scaled and summed afterwards, writes
    R * groups * O * 4 bytes, R / 32 times a float16 matrix (GROUP_SIZE 64):
    8x at 256 rows; not chosen.
    """
    from .model.common import operand_dtype, policy_einsum

    dtype = operand_dtype(q.dtype, compute_dtype)
    n, w = q.blocks, q.values.shape[-1]
    out_last, unit = q.out_shape[-1], GROUP_SIZE // 2
    per = w // unit  # groups per block
    v = q.values.reshape(-1, n, out_last, per, unit)  # [O', n, O_last, per, 32]
    s = q.scales.reshape(-1, out_last, n, per)  # a row's groups run across its blocks
    r = x2.shape[0]
    x2 = jnp.pad(x2.astype(jnp.float32), ((0, 0), (0, 2 * n * w - x2.shape[1])))
    parts = []
    for b in range(n):
        vb, sb = v[:, b], s[:, :, b, :, None].astype(dtype)  # [O', O_last, per, 32 | 1]
        if (form or INT4_PRODUCT) in ("s4", "auto"):
            levels = jax.lax.bitcast_convert_type(vb, jnp.int4)  # [..., 32, 2]
            levels = levels.reshape(*vb.shape[:-1], GROUP_SIZE).astype(dtype) * sb
            parts.append((x2.reshape(r, n, per, GROUP_SIZE)[:, b], levels))
            continue
        low = ((vb << 4) >> 4).astype(dtype) * sb  # arithmetic shifts sign-extend: even inputs
        high = (vb >> 4).astype(dtype) * sb  # the odd inputs
        parts.append((x2[:, 0::2].reshape(r, n, per, unit)[:, b], low))
        parts.append((x2[:, 1::2].reshape(r, n, per, unit)[:, b], high))
    # (labels g < j: the contracted axes in order, the weight's last two)
    ys = [policy_einsum("rgj,abgj->rab", xb, wb, compute_dtype) for xb, wb in parts]
    return sum(ys[1:], ys[0]).reshape(r, -1)


CHUNK_ROWS = 1 << 16  # matrices with more output rows (the embedding table) dequantize in chunks


def _chunks(q: QArray) -> int:
    """How many row chunks a one-output-axis matrix of over CHUNK_ROWS rows is dequantized in."""
    if len(q.out_shape) != 1 or q.out_shape[0] <= CHUNK_ROWS:
        return 1
    rows = q.out_shape[0]
    for n in range(-(-rows // CHUNK_ROWS), min(rows, 4096) + 1):
        if rows % n == 0:
            return n
    return 1


def _split(q: QArray, n: int) -> QArray:
    """[O, ...] -> a QArray stack [n, O / n, ...] (a view: lax.map walks the leading axis)."""
    return q._replace(q.values.reshape(n, -1, q.values.shape[-1]),
                      q.scales.reshape(n, -1, q.scales.shape[-1]))  # fmt: skip


def _reduce_matvec(x2, q: QArray):
    """float32[R, in] x QArray -> float32[R, O], reading the integers in place (no float copy).

    XLA:CPU emits ``ones @ f(v).T`` or ``x @ f(v).T`` (one row of under 16 KB,
    ``f`` elementwise on the int8 values ``v [O, K]``, which may read other
    per-row inputs) as one vectorized loop over the bytes, converting as it
    reads: the form used here, one row and one column block (``for_cpu``) at a
    time, each product its own loop (``_materialized`` keeps XLA from fusing
    anything else into it).

    int8: ``x @ convert(v).T``, then times the channel scales.
    int4: one pass over the packed bytes, ``ones @ f(v).T`` with
    ``f(v) = (x_even * low(v) + x_odd * high(v)) * s`` (``s`` each byte's group
    scale; LLVM folds the product with the constant ones, and fuses the scale
    into the accumulating multiply-add): see ``_int4_bytes``.
    """
    groups = q.scales.shape[-1]
    if getattr(q, "kernel", None) is not None:
        blocks, scales = q.kernel  # host views / copies in the loop's shapes
    else:
        v = jnp.moveaxis(q.values, -3, 0) if q.blocks > 1 else q.values[None]
        blocks = tuple(b.reshape(-1, v.shape[-1]) for b in v)  # (slower: strided in jit)
        scales = q.scales.reshape(-1, groups)
    edges = np.cumsum([0] + [blk.shape[1] for blk in blocks])  # in bytes of a row
    dims = (((1,), (0,)), ((), ()))
    if q.scheme == "int8":
        x = _materialized(x2)
        parts = [
            [jax.lax.dot_general(x[r : r + 1, a:b], blk.astype(jnp.float32).T, dims)
             for blk, a, b in zip(blocks, edges, edges[1:])]
            for r in range(x2.shape[0])
        ]  # fmt: skip
    else:
        pad = 2 * int(edges[-1]) - q.in_size
        x2 = jnp.pad(x2, ((0, 0), (0, pad)))
        # the powers of two of _int4_bytes' levels, taken out of the inputs (exact)
        x_even, x_odd = _materialized(x2[:, 0::2] * LOW), _materialized(x2[:, 1::2] * HIGH)
        unit = GROUP_SIZE // 2  # bytes per group
        parts = [
            [_int4_bytes(x_even[r : r + 1, a:b], x_odd[r : r + 1, a:b], blk,
                         scales[:, a // unit : b // unit])
             for blk, a, b in zip(blocks, edges, edges[1:])]
            for r in range(x2.shape[0])
        ]  # fmt: skip
    rows = []
    for row in parts:  # [1, O] each, each product its own loop
        row = [_materialized(p) for p in row]
        rows.append(sum(row[1:], row[0]))
    y = jnp.concatenate(rows)
    return y * scales[:, 0] if q.scheme == "int8" else y


# CPU, int4, one row: the native kernel (pali_kit/native/int4_cpu.cc) where it runs; False:
# always XLA's loop. The environment variable PALI_KIT_NATIVE=0 also turns it off.
NATIVE_INT4 = True


def _native_int4(x2, q: QArray, compute_dtype=None) -> bool:
    """Whether this product takes the native int4 kernel (checked while tracing).

    One row (decoding; longer products were not measured faster), an int4 CpuQArray
    standing for bfloat16 weights (the numerics policy rounds the input to bfloat16;
    float32 and float16 weights keep XLA's loop), XLA:CPU as the backend, and a CPU
    and toolchain the kernel builds and runs on (``pali_kit.native.int4_available``).
    """
    from . import native
    from .model.common import operand_dtype

    return (
        NATIVE_INT4
        and q.scheme == "int4"
        and x2.shape[0] == 1 <= REDUCE_ROWS  # REDUCE_ROWS = 0: no fused one-row products
        and getattr(q, "kernel", None) is not None
        and operand_dtype(q.dtype, compute_dtype) == jnp.bfloat16
        and jax.default_backend() == "cpu"
        and native.int4_available()
    )


def _native_matvec(x2, q: CpuQArray):
    """float[1, in] x an int4 CpuQArray -> float32[1, O] by the native kernel.

    The input is rounded to bfloat16 (the policy for bfloat16 weights) and padded to
    the stored row; all stored column blocks are one call, which adds their sums in
    float32, block by block.
    """
    from . import native

    blocks, scales = q.kernel
    row = sum(blk.shape[1] for blk in blocks)  # bytes per row
    x = jnp.pad(x2[0].astype(jnp.bfloat16), (0, 2 * row - q.in_size))
    return native.int4_row_product(x, blocks, scales)[None]


# int4 levels as the loop reads them: sign-extended bytes b (int32), low nibble
# ``b << 28`` = 2**28 * low level, high nibble ``b & -16`` = 16 * high level: one
# shift or one mask each, converted exactly to float. The inputs are multiplied
# by the inverse powers of two once per row: exact, unless the product falls
# under float32's normal range (|x| < 2**-98), where it is flushed like a denormal.
LOW, HIGH = 2.0**-28, 2.0**-4


def _int4_bytes(x_even, x_odd, v, scales):
    """float32[1, B] x2, int8[O, B], float32[O, B / 32] -> float32[1, O].

    ``y[o] = sum_j s[o, j // 32] * (x_even[j] * low(v[o, j]) + x_odd[j] * high(v[o, j]))``
    with ``x_even``, ``x_odd`` already times LOW, HIGH.
    """
    b = v.astype(jnp.int32)
    low = (b << 28).astype(jnp.float32)
    high = (b & -16).astype(jnp.float32)
    f = (x_even * low + x_odd * high) * _per_byte(scales, v.shape)
    return jax.lax.dot_general(jnp.ones_like(x_even), f.T, (((1,), (0,)), ((), ())))


def _per_byte(scales, shape):
    """float32[O, g] group scales -> float32[O, g * GROUP_SIZE / 2]: each packed byte's scale."""
    o, g = scales.shape
    return jnp.broadcast_to(scales[:, :, None], (o, g, GROUP_SIZE // 2)).reshape(shape)


def _after(x2, scales):
    """``scales`` (the same values) made to depend on ``x2``.

    XLA schedules a computation that only reads parameters anywhere, and
    XLA:CPU puts every matrix's dequantization first: a prefill then held the
    float copies of all of the model's matrices at once. A dependence on the
    product's input makes each one wait for its layer, and its buffer is free
    again after the product (``optimization_barrier`` is removed before
    scheduling). ``(a != a) * 0`` is 0.0 for every float, NaN included, and XLA
    does not fold it.
    """
    a = x2.reshape(-1)[0]
    return scales + (a != a).astype(scales.dtype) * 0


def _materialized(x2):
    """x2 float32[R, K], computed once into its own buffer (bit-identical values).

    XLA:CPU fuses the producers of a one-row product's input (a norm, the
    attention heads' transpose, gelu * up) into the product's loop, which then
    recomputes them for every output and reads x through its original shape:
    up to 30x slower. It does not fuse an *expensive* producer (a division)
    into a consumer that reads each element many times, and
    ``optimization_barrier`` is removed before fusion: so x2 is divided by a
    1.0 that XLA cannot fold (``1 + 0 * x2``: IEEE forbids rewriting ``0 * a``
    as 0; elementwise, as XLA turns a division by a broadcast scalar into a
    multiplication). Exact for finite values (inf and NaN become NaN).
    """
    return x2 / (1 + 0 * x2)


def einsum(eq: str, x, w, *, compute_dtype=None):
    """``jnp.einsum(eq, x, w)`` -> float32 where ``w`` may be a QArray, under the numerics policy.

    Where the letters ``w`` shares with ``x`` and not with the output are exactly
    its contraction axes, in order (every product of the model), this is
    :func:`matmul` on ``x`` with those axes flattened; otherwise a QArray is
    dequantized in front of the product (``policy_einsum``), and a CpuQArray
    refuses.
    """
    from .model.common import policy_einsum

    if not isinstance(w, QArray):
        return policy_einsum(eq, x, w, compute_dtype)
    rows = _as_rows(eq, x, w)
    if rows is not None:  # x's contracted axes are the weight's, in order: a 2-D product
        x2, finish = rows
        return finish(matmul(x2, w, compute_dtype))
    if isinstance(w, CpuQArray):
        raise ValueError(
            f"einsum {eq!r}: the quantized weight contracts axes {w.in_axes}, the equation "
            "contracts other ones"
        )
    n = _chunks(w)
    if n == 1:
        return policy_einsum(eq, x, dequantize(w), compute_dtype)
    # A huge table (the 257152-row output layer): dequantize it chunk by chunk
    # (lax.map), so at most one chunk of float weights exists at a time.
    (xs, ws), out = (part.split(",") for part in eq.replace(" ", "").split("->"))
    out = out[0].replace("...", "." * (x.ndim - len(xs.replace("...", ""))))
    in_letters = {ws[a % len(ws)] for a in w.in_axes}
    at = out.index(next(c for c in ws if c not in in_letters))  # the one output axis
    # (checkpointed: a backward pass recomputes a chunk instead of keeping them all)
    chunk = jax.checkpoint(lambda c: policy_einsum(eq, x, dequantize(c), compute_dtype))
    ys = jax.lax.map(chunk, _split(w, n))
    ys = jnp.moveaxis(ys, 0, at)  # [..., n, V / n, ...]
    return ys.reshape(*ys.shape[:at], -1, *ys.shape[at + 2 :])


def _as_rows(eq: str, x, w: QArray):
    """``(x2, finish)`` with ``x2`` = x's contracted axes (the weight's, in order) moved
    last and flattened, and ``finish`` putting ``matmul(x2, w)``'s axes in ``eq``'s output
    order; None when the equation contracts other axes of the weight."""
    inputs, out = eq.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    if "..." in xs:
        fill = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
        fill = fill[: x.ndim - (len(xs) - 3)]
        xs, out = xs.replace("...", fill), out.replace("...", fill)
    nd = len(ws)
    contracted = [c for c in ws if c in xs and c not in out]
    want = [ws[a % nd] for a in w.in_axes]
    if contracted != want or any(c in xs for c in ws if c not in contracted):
        return None
    rest = [c for c in xs if c not in contracted]
    x = jnp.transpose(x, [xs.index(c) for c in rest + contracted])
    x2 = x.reshape(*x.shape[: len(rest)], -1)
    have = rest + [c for c in ws if c not in contracted]
    return x2, lambda y: jnp.transpose(y, [have.index(c) for c in out])


# ============================================================================ trees


def _keyed_map(fn: Callable, tree: dict, prefix: str = ""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out[k] = _keyed_map(fn, v, key + "/") if isinstance(v, dict) else fn(key, v)
    return out


def quantize_params(params: dict, scheme: str) -> dict:
    """The official tree with every weight named in ``RULES`` replaced by a QArray.

    Works on numpy or jax leaves; layer stacks are quantized one layer at a time.
    """
    check_scheme(scheme)

    def one(key, a):
        axes = contraction_axes(key)
        if axes is None or isinstance(a, QArray):
            return a
        return quantize_leaf(a, scheme, axes, place=_default_place)

    return _keyed_map(one, params)


def _default_place(a):
    """numpy -> jax, adopting the (aligned) host memory without a copy where JAX can."""
    if not isinstance(a, np.ndarray):
        return a
    try:
        return jax.device_put(a, may_alias=True)
    except TypeError:  # JAX without may_alias
        return jnp.asarray(a)


def quantize_leaf(a, scheme: str, in_axes, place: Callable = _default_place) -> QArray:
    """Quantize one leaf (numpy or jax), in slices along axis 0 when that axis is not contracted.

    Keeps the float temporaries at one slice (one layer of a stack, or ~16 MB of
    embedding rows); ``place`` puts the finished values and scales on a device.
    """
    shape = tuple(a.shape)
    if len(shape) < 2 or 0 in [x % len(shape) for x in in_axes]:
        rows = [(0, a)]
    else:
        n = max(1, (1 << 22) // max(1, math.prod(shape[1:])))
        rows = ((i, a[i : i + n]) for i in range(0, shape[0], n))
    q = quantize_rows_of(rows, shape, a.dtype, scheme, in_axes)
    return q._replace(place(q.values), place(q.scales))


def quantize_rows_of(rows: Iterable, shape, dtype, scheme: str, in_axes) -> QArray:
    """Quantize an array given as consecutive slices ``(start, a[start:start + n])``.

    Axis 0 must not be contracted unless there is a single slice. Returns a
    QArray of numpy arrays (page-aligned, so JAX can adopt them without a copy).
    Slices are quantized on a few threads (numpy lets go of the interpreter while
    it computes) while the next one is read: one slice per thread in memory, and
    the one being read.
    The result does not depend on the threads: each slice is quantized alone.
    A slice must not change after it is yielded (it may be quantized later).
    """
    from .model.common import aligned_empty, thread_pool

    values = scales = in_shape = None
    pool = thread_pool()
    pending = collections.deque()  # futures of the slices in flight, in order

    def quantize_into(start, part):  # on a thread: it also writes (first touches) the result
        q = quantize(part, scheme, in_axes)
        values[start : start + len(part)] = q.values
        scales[start : start + len(part)] = q.scales

    try:
        for start, part in rows:
            part = np.asarray(part)
            if values is None:  # the first slice here: it gives the result's shapes
                q = quantize(part, scheme, in_axes)
                if len(part) == shape[0]:  # one slice: the whole array
                    return QArray(q.values, q.scales, scheme, in_axes, q.in_shape, dtype)
                in_shape = q.in_shape
                values = aligned_empty((shape[0], *q.values.shape[1:]), np.int8)
                scales = aligned_empty((shape[0], *q.scales.shape[1:]), np.float32)
                values[: len(part)], scales[: len(part)] = q.values, q.scales
                del q
                continue
            pending.append(pool.submit(quantize_into, start, part))
            del part
            while len(pending) > pool._max_workers:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:
        for future in pending:  # the reader failed, or a slice did: drop the rest
            future.cancel()
    return QArray(values, scales, scheme, in_axes, in_shape, dtype)


def abstract_quantize_params(shapes: dict, scheme: str) -> dict:
    """``quantize_params`` for a tree of ``jax.ShapeDtypeStruct`` (allocates nothing)."""

    def one(key, s):
        axes = contraction_axes(key)
        if axes is None:
            return s
        return jax.eval_shape(lambda: quantize(jnp.zeros(s.shape, s.dtype), scheme, axes))

    return _keyed_map(one, shapes)


def dequantize_params(params: dict) -> dict:
    """Every QArray replaced by the float array it stands for (a reference model)."""
    return jax.tree.map(
        lambda a: dequantize(a) if isinstance(a, QArray) else a,
        params, is_leaf=lambda a: isinstance(a, QArray),
    )  # fmt: skip


def for_cpu(q: QArray) -> CpuQArray:
    """The same arrays as a CpuQArray: one-token products use the fused loop.

    ``kernel``: the values as column blocks ``int8[O, <= BLOCK bytes]`` and
    the scales as ``float32[O, groups]``, views of the QArray's memory (no
    copy): XLA:CPU's one-row loop takes rows of at most ~BLOCK bytes, and only
    contiguous ones, which is why ``quantize`` stores wider rows (the MLP's
    output matrix) in column blocks. Wide rows stored otherwise (a QArray built
    by hand, or blocks under several output groups) get ``(O, <= BLOCK)`` copies.
    """
    if isinstance(q, CpuQArray):
        return q
    from .model.common import BLOCK

    v, groups = q.values, q.scales.shape[-1]
    scales = _host_view(q.scales, (-1, groups))
    width = q.row_bytes
    blocks = (None,)
    if q.blocks > 1 and math.prod(v.shape[:-3]) == 1:  # stored as blocks: a view of each
        n, o, w = v.shape[-3:]
        blocks = tuple(_host_view(v, (n, o, w), i) for i in range(n))
    elif q.blocks == 1 and width <= BLOCK:
        blocks = (_host_view(v, (-1, width)),)
    wide = q.blocks > 1 or width > BLOCK
    if wide and any(b is None for b in blocks) and _host_view(v, (-1, v.shape[-1])) is not None:
        # rows too wide for the loop, no block views (misaligned): copies of column blocks
        host = np.asarray(out_in_values(q._replace(np.asarray(v), q.scales))).reshape(-1, width)
        unit = GROUP_SIZE // 2 if q.scheme == "int4" else 1
        n = -(-width // BLOCK)
        cuts = [unit * round(i * width / unit / n) for i in range(1, n)]
        blocks = tuple(_default_place(np.ascontiguousarray(p)) for p in np.split(host, cuts, 1))
    kernel = None if scales is None or any(b is None for b in blocks) else (blocks, scales)
    return CpuQArray(*q.children(), *q.tree_flatten()[1], kernel=kernel)


def _host_view(a, shape, index=None):
    """``a.reshape(shape)[index]`` sharing ``a``'s memory (a CPU array, 64-byte aligned), or None."""
    try:
        host = np.asarray(a)  # no copy for an array on the CPU
        if host.ctypes.data != a.unsafe_buffer_pointer():
            return None
        part = host.reshape(shape)
        part = part if index is None else part[index]
        view = jax.device_put(part, may_alias=True)
        return view if view.unsafe_buffer_pointer() == part.ctypes.data else None
    except Exception:  # not on one CPU, no may_alias, deleted, misaligned: no view
        return None


def cpu_layout(params):
    """Every QArray of a tree as a CpuQArray (see ``for_cpu``)."""
    return jax.tree.map(
        lambda a: for_cpu(a) if isinstance(a, QArray) else a, params, is_leaf=is_quantized
    )


def tree_nbytes(params) -> int:
    """Bytes held by a parameter tree (QArrays count values + scales)."""
    leaves = jax.tree.leaves(params)
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves)


def scheme_of(params) -> str | None:
    """ "int8"/"int4" if the tree holds QArrays, else None."""
    for leaf in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QArray)):
        if isinstance(leaf, QArray):
            return leaf.scheme
    return None
