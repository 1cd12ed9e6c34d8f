"""The CPU inference layout: the official weights arranged for XLA:CPU.

The model modules compute with the official stacked tree as plain einsums;
that is what GPUs, TPUs and training run. On CPU, three things make XLA:CPU
slow on that form, and this module (only) works around them, for inference:

1. Inside ``jit``, XLA:CPU copies ``w[i]`` out of a stacked weight before each
   matmul, for every layer on every call. The layout hands the compiled code
   one array per layer instead: on CPU these *alias* the stacked buffer
   (``split_leading``), so nothing is copied and no memory is added.
2. Products with 3-D operands and einsums over several weight axes get slow
   generic kernels, and XLA's dot merger concatenates weights that share an
   input (gate and up, the heads of q) on every call. Every weight becomes a
   :class:`Matrix`: a grid of plain 2-D matrices (per head, per gate/up), each
   multiplied separately, its input behind an ``optimization_barrier``.
3. XLA:CPU multiplies one row by a bfloat16/float16 ``(in, out)`` matrix through
   a slow generic kernel, but reads an ``(out, in)`` one at full memory speed
   when ``in`` is at most ~3000. For half-precision weights the LLM matrices are
   therefore copied once as ``(out, in)`` blocks of at most ``BLOCK`` columns
   (``out_in``), and the products of the blocks summed.
4. The attention products read a layer's keys as ``[B, K, S, H]`` and its
   values as ``[B, K, H, S]``; from the official ``[B, S, K, H]`` cache XLA:CPU
   copies every layer's whole cache into that order on every decode step.
   ``HeadMajorCache`` stores the cache in the products' order instead (axes of
   size 1 left out); its ``read`` hands the Attention the official order as a
   transpose, which XLA folds into the products (``cache_form`` picks it for
   the CPU layout). With ``cache_dtype="bfloat16"`` XLA still copies each
   layer's cache once before converting it to float32.

The numbers come out as the official tree's (the same products, in the same
numerics policy, see ``common.py``), up to float32 summation order.
``cpu_layout(params) -> run tree`` is the interface, with ``cache_form(run)``
for the KV cache that goes with it; ``inference_params`` applies the layout
only when the arrays live on one CPU.
"""

from __future__ import annotations

import ctypes
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from .. import quant
from . import accel
from .common import (
    BLOCK,
    einsum_labels,
    expand_ellipsis,
    narrow_range,
    scale_rows,
    thread_pool,
    to_device,
)
from .common import policy_matmul as matmul
from .gemma import KVCache


@jax.tree_util.register_pytree_node_class
class Matrix:
    """One official weight as a grid of 2-D matrices; multiplies like the array it replaces.

    groups: one entry per index of the weight's leading *group* axes (``gshape``:
    heads, gate/up, key/value), each a tuple of arrays:
      - ``transposed=False``: one array, the group's slice ``(*in, *out)`` as stored
        (a view on CPU), reshaped to ``(in, out)`` inside the compiled code;
      - ``transposed=True``: ``(out, in_block)`` copies covering ``in`` in order
        (``fshape`` is then the ``out`` shape, ``shape`` the official array's).
    """

    def __init__(self, groups, gshape=(), transposed=False, fshape=None, shape=None):
        self.groups = tuple(tuple(g) for g in groups)
        self.gshape = tuple(gshape)
        self.transposed = transposed
        self.fshape = None if fshape is None else tuple(fshape)
        self.shape = None if shape is None else tuple(shape)  # the official array's shape

    def tree_flatten(self):
        return self.groups, (self.gshape, self.transposed, self.fshape, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children, *aux)

    @property
    def dtype(self):
        return self.groups[0][0].dtype

    def __getitem__(self, index):
        """Row lookup, for the embedding table (stored as one (V, W) block)."""
        if len(self.groups) != 1 or len(self.groups[0]) != 1:
            raise TypeError("only a one-block Matrix (the embedding table) supports indexing")
        return self.groups[0][0][index]

    def einsum(self, eq: str, x, compute_dtype=None):
        """``jnp.einsum(eq, x, W)`` for the official array W this Matrix stands for.

        W's axes in ``eq``: the group axes first, then the contracted axes (which
        must be x's trailing axes, in the same order) and the output axes in any order.
        """
        xl, wl, ol = einsum_labels(expand_ellipsis(eq, x.ndim))
        g_labels, rest = wl[: len(self.gshape)], wl[len(self.gshape) :]
        c_labels = "".join(c for c in rest if c in xl)
        f_labels = "".join(c for c in rest if c not in xl)
        if not xl.endswith(c_labels):
            raise ValueError(f"{eq}: the contracted axes must be the input's last axes")
        lead = x.shape[: x.ndim - len(c_labels)]
        k = math.prod(x.shape[len(lead) :])
        x2, scale = x.reshape(-1, k), None
        if compute_dtype is None and narrow_range(self.dtype):
            # float16: scale each row once for all groups and blocks (see common.py),
            # then the products cast without scaling again.
            x2, scale = scale_rows(x2.astype(jnp.float32), (1,))
            compute_dtype = jnp.dtype(self.dtype).name
        # A barrier per group gives each product its own copy of the input as far
        # as XLA can tell; otherwise the dot merger concatenates the weights that
        # share it (heads, gate and up) on every call.
        ys = [
            self._product(jax.lax.optimization_barrier(x2), group, compute_dtype)
            for group in self.groups
        ]
        y = jnp.stack(ys) if len(ys) > 1 else ys[0]  # [G, M, F] or [M, F]
        y = y if scale is None else y * scale
        fshape = self.fshape or self.groups[0][0].shape[len(c_labels) :]
        y = y.reshape(*self.gshape, *lead, *fshape)
        src = g_labels + xl[: len(lead)] + f_labels
        return y if src == ol else jnp.einsum(f"{src}->{ol}", y)

    def _product(self, x2, blocks, compute_dtype):
        if not self.transposed:
            return matmul(x2, blocks[0].reshape(x2.shape[1], -1), compute_dtype)
        parts, start = [], 0
        for block in blocks:
            part = x2[:, start : start + block.shape[1]]
            start += block.shape[1]
            # One row: x @ block.T is XLA:CPU's fast row-major matrix-vector kernel;
            # several rows: the direct contraction is the fast form.
            if x2.shape[0] == 1:
                parts.append(matmul(part, block.T, compute_dtype))
            else:
                parts.append(matmul(part, block, compute_dtype, contract_rhs=1))
        if len(parts) == 1:
            return parts[0]
        # Summing behind a barrier keeps each product a separate matmul kernel
        # (an add fused into it would make XLA:CPU convert the block first).
        return sum(jax.lax.optimization_barrier(tuple(parts)))


# --- the KV cache in the attention products' order --------------------------------------


def _head_major(batch: int, kv_heads: int, *tail: int) -> tuple[int, ...]:
    """The stored shape: [B, K, *tail] without the batch/head axes of size 1.

    XLA:CPU drops those axes from the attention products' operands; an array
    stored with them reaches the product through a reshape, and XLA then fuses a
    second copy of the cache update into the product, copying the whole cache.
    """
    return (*(d for d in (batch, kv_heads) if d > 1), *tail)


@jax.tree_util.register_pytree_node_class
class HeadMajorLayer:
    """One layer's cache stored in the order the attention products read it:
    keys as [B, K, S, H], values as [B, K, H, S] (axes of size 1 among B and K
    left out, see ``_head_major``). ``write`` and ``read`` speak the official
    [B, T|S, K, H], so the Attention cannot tell it from a LayerCache."""

    def __init__(self, k, v, batch: int, kv_heads: int):
        self.k, self.v, self.batch, self.kv_heads = k, v, batch, kv_heads

    def tree_flatten(self):
        return (self.k, self.v), (self.batch, self.kv_heads)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def write(self, k, v, slot) -> HeadMajorLayer:
        """Keys and values float[B, T, K, H] written at slots ``slot .. slot+T-1``."""
        b, t, kv, h = k.shape
        k = k.astype(self.k.dtype).transpose(0, 2, 1, 3).reshape(_head_major(b, kv, t, h))
        v = v.astype(self.v.dtype).transpose(0, 2, 3, 1).reshape(_head_major(b, kv, h, t))
        lead = (0,) * (self.k.ndim - 2)
        update = jax.lax.dynamic_update_slice
        k, v = update(self.k, k, (*lead, slot, 0)), update(self.v, v, (*lead, 0, slot))
        return HeadMajorLayer(k, v, self.batch, self.kv_heads)

    def read(self):
        """All slots: (keys, values) float32[B, S, K, H], transposes of the stored arrays
        (XLA folds them into the products' dimension numbers: nothing is copied)."""
        b, kv = self.batch, self.kv_heads
        k = self.k.astype(jnp.float32).reshape(b, kv, *self.k.shape[-2:]).transpose(0, 2, 1, 3)
        v = self.v.astype(jnp.float32).reshape(b, kv, *self.v.shape[-2:]).transpose(0, 3, 1, 2)
        return k, v


@jax.tree_util.register_pytree_node_class
class HeadMajorCache:
    """The KV cache for the CPU layout: per layer keys float[B, K, S, H] and
    values float[B, K, H, S] (axes of size 1 among B and K left out), the
    order XLA:CPU's attention products read, so a decode step copies no cache.
    Same interface as ``gemma.KVCache`` (``zeros``, ``layer``, ``of_layers``,
    ``take``); ``k``, ``v``: tuples of L arrays."""

    def __init__(self, k: tuple, v: tuple, batch: int, kv_heads: int):
        self.k, self.v, self.batch, self.kv_heads = tuple(k), tuple(v), batch, kv_heads

    def tree_flatten(self):
        return (self.k, self.v), (self.batch, self.kv_heads)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @classmethod
    def zeros(cls, config, batch: int, size: int, dtype=jnp.float32) -> HeadMajorCache:
        kv, h = config.num_kv_heads, config.head_dim
        k = tuple(jnp.zeros(_head_major(batch, kv, size, h), dtype) for _ in range(config.depth))
        v = tuple(jnp.zeros(_head_major(batch, kv, h, size), dtype) for _ in range(config.depth))
        return cls(k, v, batch, kv)

    def layer(self, i: int) -> HeadMajorLayer:
        return HeadMajorLayer(self.k[i], self.v[i], self.batch, self.kv_heads)

    def of_layers(self, layers) -> HeadMajorCache:
        k, v = tuple(layer.k for layer in layers), tuple(layer.v for layer in layers)
        return HeadMajorCache(k, v, self.batch, self.kv_heads)

    def take(self, rows) -> HeadMajorCache:
        """Reorder/select batch rows (beam search): every array indexed by ``rows``."""
        n, kv = rows.shape[0], self.kv_heads

        def pick(a):
            full = a.reshape(self.batch, kv, *a.shape[-2:])
            return jnp.take(full, rows, axis=0).reshape(_head_major(n, kv, *a.shape[-2:]))

        return HeadMajorCache(tuple(map(pick, self.k)), tuple(map(pick, self.v)), n, kv)


def cache_form(run) -> type:
    """The KV cache class for a run tree: ``HeadMajorCache`` for the CPU layout
    (``cpu_layout`` / ``abstract_layout``: its token table is a Matrix or a
    quantized CPU form), else the official ``gemma.KVCache``."""
    try:
        table = run["llm"]["embedder"]["input_embedding"]
    except (KeyError, TypeError):
        return KVCache
    return HeadMajorCache if isinstance(table, (Matrix, quant.CpuQArray)) else KVCache


# --- building the layout ---------------------------------------------------------------


def inference_params(params, out_in: bool | None = None, in_place: bool = False):
    """The run tree for compiled inference: ``cpu_layout`` where the arrays live on
    one CPU, ``accel.split_stacks`` (one array per layer, each sharded as its
    stack; with ``in_place`` each stack is freed once split) where they live on
    GPU/TPU devices of this process (one, or a mesh), otherwise ``params``
    unchanged."""
    if accel.on_accelerators(params):
        return accel.split_stacks(params, release=in_place)
    if not all(_on_one_cpu(a) for a in jax.tree.leaves(params)):
        return params
    return cpu_layout(params, out_in, in_place)


def cpu_layout(params, out_in: bool | None = None, in_place: bool | str = False):
    """Official tree -> CPU layout (same nesting; inference only).

    Layer stacks become per-layer views (leaves are tuples over layers), every
    matrix a :class:`Matrix`. ``out_in`` (default: for bfloat16/float16 weights)
    stores the LLM's matrices as (out, in) blocks: a copy of them, or with
    ``in_place`` written over the official arrays' own memory (no memory added;
    those official arrays then hold the blocks and must be dropped: see
    ``IN_PLACE_LEAVES`` and ``official_params``). ``in_place="written"``: those
    arrays already hold the blocks (``out_in_blocks``; the .npz reader writes them
    so, see ``checkpoints.load_cpu_inference``). Arrays that cannot be viewed (not
    on one CPU) are left as they are.
    """
    img, llm = dict(params["img"]), dict(params["llm"])
    if out_in is None:
        out_in = llm["final_norm"]["scale"].dtype in (jnp.bfloat16, jnp.float16)

    img = _map_kernels(img, _own_form(lambda k: Matrix([[k]])))
    transformer = dict(img["Transformer"])
    layers = _split_layers(params["img"]["Transformer"]["encoderblock"])
    if layers is not None:
        transformer["encoderblock"] = _stack_of(
            [_map_kernels(layer, _own_form(lambda k: Matrix([[k]]))) for layer in layers]
        )
    img["Transformer"] = transformer

    table = llm["embedder"]["input_embedding"]  # (V, W) is already (out, in)
    llm["embedder"] = {
        "input_embedding": _own_form(lambda t: Matrix([[t]], (), True, t.shape[:1]))(table)
    }
    layers = _split_layers(llm["layers"])
    if layers is not None:
        llm["layers"] = _stack_of([_llm_layer(layer, out_in, in_place) for layer in layers])
    return {**params, "img": img, "llm": llm}


# The LLM matrices that (out, in) blocks replace, by their path under llm/layers.
IN_PLACE_LEAVES = (
    ("attn", "q_einsum", "w"),
    ("attn", "kv_einsum", "w"),
    ("attn", "attn_vec_einsum", "w"),
    ("mlp", "gating_einsum"),
    ("mlp", "linear"),
)
# How many leading axes of one layer's slice of each index groups (heads, key/value,
# gate/up): (Nh | W, H), (2, K | W, H), (Nh, H, W) (no groups: in = Nh * H),
# (2 | W, F), (F, W).
GROUP_AXES = {
    "attn/q_einsum/w": 1,
    "attn/kv_einsum/w": 2,
    "attn/attn_vec_einsum/w": 0,
    "mlp/gating_einsum": 1,
    "mlp/linear": 0,
}


def _llm_layer(layer, out_in: bool, in_place: bool | str = False):
    """One LLM layer's matrices as Matrix grids (per head, per key/value, gate/up)."""
    if out_in:
        matrix = _own_form(lambda w, n: _out_in_matrix(w, n, in_place))
    else:
        matrix = _own_form(_view_matrix)
    return _map_llm_matrices(layer, matrix)


def _map_llm_matrices(layer, matrix):
    """``layer`` with each LLM matrix ``w`` replaced by ``matrix(w, GROUP_AXES[its name])``."""
    attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
    n = GROUP_AXES
    attn["q_einsum"] = {"w": matrix(attn["q_einsum"]["w"], n["attn/q_einsum/w"])}
    attn["kv_einsum"] = {"w": matrix(attn["kv_einsum"]["w"], n["attn/kv_einsum/w"])}
    attn["attn_vec_einsum"] = {
        "w": matrix(attn["attn_vec_einsum"]["w"], n["attn/attn_vec_einsum/w"])
    }
    mlp["gating_einsum"] = matrix(mlp["gating_einsum"], n["mlp/gating_einsum"])
    mlp["linear"] = matrix(mlp["linear"], n["mlp/linear"])
    return {**layer, "attn": attn, "mlp": mlp}


def _own_form(fn):
    """``fn`` for float weights; a quantized weight (``pali_kit.quant``) brings its own CPU form."""
    return lambda w, *args: quant.for_cpu(w) if isinstance(w, quant.QArray) else fn(w, *args)


def _view_matrix(w, n_group: int, split=None):
    """Groups as views of ``w`` (no copy): w's first ``n_group`` axes index them.

    Where JAX cannot view a piece (misaligned), ``w`` stays a plain array.
    ``split``: ``split_leading`` (default), or its shapes-only mirror for ``abstract_layout``.
    """
    split = split or split_leading
    groups = [w]
    for _ in range(n_group):
        parts = [split(g) for g in groups]
        if any(p is None for p in parts):
            return w
        groups = [piece for p in parts for piece in p]
    return Matrix([[g] for g in groups], w.shape[:n_group])


def _out_in_matrix(w, n_group: int, in_place: bool | str = False):
    """Groups as (out, in) blocks of at most ``BLOCK`` columns.

    The group's axes after the groups are (in..., out) with a single out axis
    last (q, kv, gating: (W, H/F); attn_vec: (Nh, H, W) -> in = Nh * H). The
    blocks are copies, or with ``in_place`` written over ``w``'s own buffer
    (one group at a time through a temporary copy): then ``w`` holds the blocks
    afterwards and must not be used as the official array any more. With
    ``in_place="written"`` ``w``'s buffer already holds them in that arrangement
    (``out_in_blocks``, as the checkpoint reader writes it): they are only viewed.
    """
    host = np.asarray(w)  # a view for a CPU array; keeps w's buffer alive
    gshape = host.shape[:n_group]
    flat = host.reshape(math.prod(gshape), -1, host.shape[-1])  # (groups, in, out)
    written = in_place == "written"
    target = _writable(w) if in_place and not written else None
    scratch = np.empty_like(flat[0]) if target is not None else None
    groups, offset = [], 0
    for m in flat:
        if target is None and not written:
            blocks = [to_device(np.ascontiguousarray(p.T)) for p in _split_rows(m)]
        else:
            blocks = []
            if not written:
                np.copyto(scratch, m)  # one group, e.g. 64 MB: its memory is written over next
            for part in _split_rows(scratch if not written else m):
                size = part.size
                if not written:
                    transpose_into(part, target[offset : offset + size].reshape(part.shape[::-1]))
                view = host.reshape(-1)[offset : offset + size].reshape(part.shape[::-1])
                blocks.append(_alias(view))
                offset += size
        groups.append(blocks)
    return Matrix(groups, gshape, True, host.shape[-1:], host.shape)


def _split_rows(m: np.ndarray) -> list[np.ndarray]:
    """A group's (in, out) matrix as consecutive row ranges of at most ``BLOCK`` rows."""
    return np.array_split(m, -(-m.shape[0] // BLOCK))


def out_in_blocks(layer_shape, n_group: int, layers: int = 1):
    """``(offset, rows)`` of each (out, in) block in the order ``_out_in_matrix``
    with ``in_place`` writes them over a stacked ``(layers, *layer_shape)`` buffer:
    layer by layer, group by group, block by block. Each block holds the next
    ``rows`` rows (in the file's order) of a layer's ``(in, out)`` group matrix,
    transposed: ``(out, rows)`` in C order from ``offset`` (counted in values).
    """
    width = layer_shape[-1]
    groups = math.prod(layer_shape[:n_group])
    rows_per_group = math.prod(layer_shape[n_group:-1])
    sizes = [len(p) for p in _split_rows(np.empty((rows_per_group, 0)))]
    offset = 0
    for _ in range(layers * groups):
        for rows in sizes:
            yield offset, rows
            offset += rows * width


STRIPE = 16  # input rows transposed at a time: 16 x 2 bytes = one 32-byte write per out row


def transpose_into(part: np.ndarray, out: np.ndarray, checksum=None) -> list:
    """``out[...] = part.T`` for a 2-D ``part``, in stripes of ``STRIPE`` rows.

    numpy's plain strided transpose of a large matrix misses the cache on every
    element; a stripe reads ``STRIPE`` contiguous input rows and writes
    ``STRIPE`` contiguous values into each output row, several times faster.
    Values are moved as unsigned integers of the same width (numpy copies its
    own integer types faster than extension dtypes such as bfloat16): the bits
    are unchanged. numpy releases the GIL while it copies, so the stripes are
    shared among a few threads (disjoint columns of ``out``).

    ``checksum(bytes, value) -> value`` (e.g. a CRC-32; ``part`` must then be
    C-contiguous) runs over each stripe just before it is copied (while it is in
    the cache); each thread sums its own consecutive rows. Returns ``[(value,
    nbytes), ...]`` for consecutive byte ranges of ``part``, in order.
    """
    as_bits = np.dtype(f"u{part.dtype.itemsize}")
    src, dst = part.view(as_bits), out.view(as_bits)
    rows = src.shape[0]
    row_bytes = src[:1].nbytes

    def stripes(lo, hi):
        value = 0
        for i in range(lo, hi, STRIPE):
            stripe = src[i : min(i + STRIPE, hi)]
            if checksum is not None:  # the stripe is then in the cache for the copy
                value = checksum(stripe.reshape(-1).view(np.uint8), value)
            dst[:, i : min(i + STRIPE, hi)] = stripe.T
        return value, (hi - lo) * row_bytes

    pool = thread_pool()
    step = -(-rows // (pool._max_workers * STRIPE)) * STRIPE  # a multiple of STRIPE
    return list(pool.map(lambda lo: stripes(lo, min(lo + step, rows)), range(0, rows, step)))


HEAP_ARENAS = 2  # the C heap's arenas once pk.load has run (``limit_heap_arenas``)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_heap_arenas(n: int = HEAP_ARENAS) -> bool:
    """Cap the C heap (glibc malloc) at ``n`` arenas; True where the cap was set.

    glibc gives each thread that allocates its own arena, up to 8 per core, and
    memory freed into one arena serves only the threads of that arena. XLA
    compiles and runs programs on several threads, and the loader and the
    compile ahead run on threads of their own: what one thread's compile frees
    stays resident while the next compile or run, on another thread, takes new
    memory. With the arenas capped, load + generate of PaliGemma 2 3B in
    bfloat16 (empty compilation cache) peaked at 1.128-1.130x the weights
    against 1.151-1.166x (``bench/rss_phases.py``). The cap only stops new
    arenas; those made before it stay in use, so ``pk.load`` calls this first,
    before the backend starts its threads (called after, it measured no effect). It concerns host memory on any
    backend. Left alone where ``MALLOC_ARENA_MAX`` is set (the user's choice) or
    where the C library has no ``mallopt`` (False then).
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not a glibc-like C library (e.g. macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_ARENA_MAX, n) == 1


def _writable(w):
    """A writable flat numpy view of a CPU array's buffer, or None if there is none."""
    host = np.asarray(w)
    if not _on_one_cpu(w) or host.ctypes.data != w.unsafe_buffer_pointer():
        return None
    raw = (ctypes.c_uint8 * host.nbytes).from_address(host.ctypes.data)
    return np.frombuffer(raw, np.uint8).view(host.dtype)


def _alias(view):
    """A JAX array on ``view``'s memory (no copy) when JAX can adopt it, else a copy."""
    try:
        a = jax.device_put(view, may_alias=True)
    except TypeError:  # JAX without may_alias
        return jnp.array(view)
    if a.unsafe_buffer_pointer() != view.ctypes.data:
        return jnp.array(view)
    return a


def official_params(run, skeleton):
    """The official tree again: ``skeleton`` (the official tree with the in-place
    converted leaves set to None or to their ``jax.ShapeDtypeStruct``) completed from the (out, in) blocks of ``run``.

    The rebuilt leaves are new arrays (a copy of those matrices while they live).
    """

    def fill(skel, r):
        if isinstance(skel, dict):
            return {k: fill(v, r[k]) for k, v in skel.items()}
        if skel is not None and not isinstance(skel, jax.ShapeDtypeStruct):
            return skel
        return to_device(np.stack([_unblock(m) for m in r]))  # r: per-layer Matrices

    return fill(skeleton, run)


def _unblock(m: Matrix) -> np.ndarray:
    """(out, in) blocks -> the official (groups..., in..., out) array of one layer."""
    groups = [np.concatenate([np.asarray(b).T for b in blocks]) for blocks in m.groups]
    return np.stack(groups).reshape(m.shape)


def _map_kernels(tree, fn):
    """Apply ``fn`` to every ``kernel`` leaf outside the layer stack."""
    out = {}
    for key, value in tree.items():
        if key == "encoderblock":
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _map_kernels(value, fn)
        else:
            out[key] = fn(value) if key == "kernel" else value
    return out


def _split_layers(stacked):
    """Per-layer trees of views of a stacked tree, or None where views are impossible."""
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [split_leading(a) or _small_pieces(a) for a in leaves]
    if not leaves or any(p is None for p in parts):
        return None
    return [jax.tree.unflatten(treedef, layer) for layer in zip(*parts)]


SMALL = 1 << 22  # bytes: a stacked leaf this small may be copied per layer when it can't be viewed


def _small_pieces(a) -> tuple[jax.Array, ...] | None:
    """Copies ``a[0], a[1], ...`` of a small stacked CPU array that cannot be viewed.

    A layer's slice of e.g. a bfloat16 ``(27, 4304)`` bias starts 8608 bytes
    apart: not 64-byte aligned, so JAX won't adopt it as a view. Copying such
    small leaves (kilobytes) keeps the big matrices of the same layers viewable;
    otherwise the compiled code would slice every layer's weights out of the
    stacks, holding copies of all of them at once (0.8 GB for SigLIP So400m in bfloat16).
    """
    if not _on_one_cpu(a) or a.ndim < 1 or a.nbytes > SMALL:
        return None
    host = np.asarray(a)
    return tuple(to_device(np.array(host[i])) for i in range(a.shape[0]))


def _stack_of(layers):
    """Per-layer trees -> one tree of the same nesting whose leaves are tuples over layers.

    (``common.layer_slice`` indexes these tuples as it indexes stacked arrays.)
    """
    first = layers[0]
    if isinstance(first, dict):
        return {k: _stack_of([layer[k] for layer in layers]) for k in first}
    return tuple(layers)


def split_leading(a) -> tuple[jax.Array, ...] | None:
    """Views ``a[0], a[1], ...`` sharing ``a``'s memory, or None where that's impossible.

    On CPU a JAX array's buffer is host memory: numpy can view it, and JAX can
    adopt any 64-byte-aligned piece of it without copying (``may_alias``). On
    GPU/TPU (or for arrays JAX won't alias) this returns None.
    """
    if not _on_one_cpu(a) or a.ndim < 1:
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


def _on_one_cpu(a) -> bool:
    try:
        return (
            isinstance(a, jax.Array)
            and a.is_fully_addressable
            and len(a.devices()) == 1
            and next(iter(a.devices())).platform == "cpu"
        )
    except Exception:  # deleted or unusual arrays: leave them alone
        return False


# --- the layout's shapes before the weights exist ----------------------------------------

ALIGN = 64  # bytes: JAX adopts a piece of a CPU buffer without copying at this alignment


def abstract_layout(shapes):
    """``cpu_layout``'s tree with ``jax.ShapeDtypeStruct`` leaves, from the official tree's
    shapes (e.g. read from a checkpoint's headers), without any array: what the compiled
    code will be handed, so it can be compiled while the weights load. Assumes arrays
    that start ``ALIGN``-byte aligned, as the loader's do; float weights only."""
    img, llm = dict(shapes["img"]), dict(shapes["llm"])
    out_in = llm["final_norm"]["scale"].dtype in (jnp.bfloat16, jnp.float16)
    img = _map_kernels(img, lambda k: Matrix([[k]]))
    transformer = dict(img["Transformer"])
    layers = _abstract_layers(shapes["img"]["Transformer"]["encoderblock"])
    if layers is not None:
        transformer["encoderblock"] = _stack_of(
            [_map_kernels(layer, lambda k: Matrix([[k]])) for layer in layers]
        )
    img["Transformer"] = transformer
    table = llm["embedder"]["input_embedding"]
    llm["embedder"] = {"input_embedding": Matrix([[table]], (), True, table.shape[:1])}
    layers = _abstract_layers(llm["layers"])
    if layers is not None:
        matrix = _abstract_out_in if out_in else _abstract_views
        llm["layers"] = _stack_of([_map_llm_matrices(layer, matrix) for layer in layers])
    return {**shapes, "img": img, "llm": llm}


def _abstract_split(a, small: bool = False):
    """The pieces ``split_leading`` (or, with ``small``, ``_small_pieces``) gives, or None."""
    if len(a.shape) < 1:
        return None
    piece = jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    nbytes = math.prod(piece.shape) * jnp.dtype(a.dtype).itemsize
    if a.shape[0] == 1 or nbytes % ALIGN == 0 or (small and nbytes * a.shape[0] <= SMALL):
        return (piece,) * a.shape[0]
    return None


def _abstract_layers(stacked):
    leaves, treedef = jax.tree.flatten(stacked)
    parts = [_abstract_split(a, small=True) for a in leaves]
    if not leaves or any(p is None for p in parts):
        return None
    return [jax.tree.unflatten(treedef, layer) for layer in zip(*parts)]


def _abstract_views(w, n_group: int):
    return _view_matrix(w, n_group, split=_abstract_split)


def _abstract_out_in(w, n_group: int):
    gshape = w.shape[:n_group]
    rows, out = math.prod(w.shape[n_group:-1]), w.shape[-1]
    n = -(-rows // BLOCK)
    sizes = [rows // n + (i < rows % n) for i in range(n)]  # as np.array_split
    blocks = [jax.ShapeDtypeStruct((out, size), w.dtype) for size in sizes]
    return Matrix([blocks] * math.prod(gshape), gshape, True, w.shape[-1:], w.shape)
