"""Train the demo mask VQ-VAE (data/vae.npz) on the synthetic shapes, in the layout of vae-oid.npz.

Builds: ``data/vae.npz``. Takes about 27 min (below). Deterministic: seeded
(scene seeds 0-3, outline seed 7, ``--seed`` for the weights and batches): the
same command gives the same file on the same machine.

    nice -n 10 python scripts/train_demo_vae.py data/vae.npz

(27 min of wall time on a shared 2-core machine, 12 min of CPU: 4 min making the
masks, 21 min for 1000 steps of 32 masks, 1.5 min evaluating.)

The demo PaliGemma answers ``segment circle`` with 4 ``<loc>`` + 16 ``<seg>``
tokens; the codes need a VQ-VAE that decodes them to masks of the demo shapes.
This script trains one with exactly the architecture and PyTorch key layout of
big_vision's ``vae-oid.npz`` (spec 7.3/7.4; the keys and shapes of
``scripts/make_random_vae.vae_shapes``), with a 128-entry codebook of width D
(default 32; the loader reads D from the file), so ``pk.load_vae("demo")``
loads it through the normal code path.

One implementation of the network: the loss runs the kit's own pure functions
``segmentation.encode_features`` (encoder), ``nearest_codes`` (quantiser) and
``decode_codes`` (decoder), on the parameters ``load_vae`` makes from the
PyTorch-layout arrays. ``decode_codes`` looks its input up in a codebook; for
the straight-through gradient it is given the batch's quantised vectors as the
"codebook" and the indices 0..16B-1, which computes the decoder on them. Only
the decoder's backward pass is written out again (``decode_rows``): XLA:CPU
differentiates the transposed convolutions very slowly, so the gradient comes
from the same decoder with each ConvTranspose split into its 4 output phases;
``check_gradients`` compares it with ``jax.grad`` through ``decode_codes`` at
start-up.

Training data: 64x64 masks made as spec 7.4 / ``mask_to_codes`` makes them,
``segmentation.crop_and_resize(mask, box)``:
  * every distinct object of ``data.make_scene`` scenes (seeds 0-3, sizes
    32-256 px, so sides of about 6-115 px). A shape's crop depends only on its
    kind and side, so a few thousand scenes give a few hundred distinct masks;
  * random variety masks (rotated ellipses, star polygons, rotated rectangles,
    triangles, rings, pairs of blobs) on canvases of 8-128 px, with flips and
    transposes, so that the codebook is used beyond the three demo shapes.
A batch is half shapes, half variety.

Loss: MSE of the decoder output to ``2 * mask - 1`` (the decoder of vae-oid
gives values in about [-1, 1], > 0 inside; the soft resized mask makes the 0
crossing sit at the mask's 0.5 level) + 0.25 x commitment. The codebook is an
exponential moving average of the encoder outputs assigned to each code (decay
0.99), and codes unused for a while are restarted on random encoder outputs.
Adam, warmup + cosine decay. Everything is seeded: the same command gives the
same file on the same machine.

At the end the weights are written as float16 (PyTorch names and layouts;
``load_vae`` reads them as float32) and the *saved file* is evaluated: mean
mask IoU of ``reconstruct_masks(encode_masks(crop))`` pasted back into the box
with ``paste_binary_mask`` (> 0) against the object's exact mask, on held-out
objects of unseen seeds, per shape, plus the codebook usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from pali_kit import data as pdata  # noqa: E402
from pali_kit.atomic import atomic_write  # noqa: E402
from pali_kit.segmentation import (  # noqa: E402
    _DIMS,
    _conv2d,
    _resblock_apply,
    crop_and_resize,
    decode_codes,
    encode_features,
    encode_masks,
    load_vae,
    nearest_codes,
    paste_binary_mask,
    reconstruct_masks,
)

NUM_CODES = 128
TRAIN_SEEDS = (0, 1, 2, 3)  # make_scene seeds used for training
EVAL_SEED = 1000  # held-out objects: make_scene(EVAL_SEED, ...) (and up)
VARIETY_SIZES = (8, 12, 16, 24, 32, 48, 64, 96, 128)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- data


def _crops(cache: dict, mask: np.ndarray, box) -> np.ndarray:
    """crop_and_resize, memoised on the crop's pixels (it is slow in eager JAX)."""
    x0, y0, x1, y1 = box
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1])
    key = (crop.shape, crop.tobytes())
    if key not in cache:
        cache[key] = crop_and_resize(mask, box)
    return cache[key]


def shape_masks(num_scenes: int, seeds=TRAIN_SEEDS, sizes=(32, 256)):
    """Distinct 64x64 masks of make_scene objects -> (float32 [N, 64, 64], labels [N])."""
    rng = np.random.default_rng(12345)
    cache, labels = {}, {}
    for seed in seeds:
        for index in range(num_scenes):
            size = int(rng.integers(sizes[0], sizes[1] + 1))
            for obj in pdata.make_scene(seed, index, size).objects:
                x0, y0, x1, y1 = obj.box
                crop = np.ascontiguousarray(obj.mask[y0:y1, x0:x1])
                labels[(crop.shape, crop.tobytes())] = obj.label
                _crops(cache, obj.mask, obj.box)
    keys = sorted(cache, key=lambda k: (labels[k], k[0]))
    return np.stack([cache[k] for k in keys]), [labels[k] for k in keys]


def _polygon(rng) -> np.ndarray:
    """Vertices (n, 2) in a unit-ish frame of one random shape outline."""
    kind = rng.integers(6)
    angle = rng.uniform(0, 2 * np.pi)
    if kind == 0:  # ellipse
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), rng.uniform(0.3, 1.0) * np.sin(t)], 1)
    elif kind == 1:  # star-shaped polygon
        n = int(rng.integers(3, 9))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.3, 1.0, n)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif kind == 2:  # rectangle
        a = rng.uniform(0.2, 1.0)
        pts = np.array([[-1, -a], [1, -a], [1, a], [-1, a]], float)
    elif kind == 3:  # triangle
        pts = rng.uniform(-1, 1, (3, 2))
    elif kind == 4:  # regular polygon
        n = int(rng.integers(5, 9))
        t = np.arange(n) * 2 * np.pi / n
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    else:  # rounded blob: smooth random radius
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = 1 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * t + rng.uniform(0, 6)) for k in (2, 3))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T


def _draw(polys, holes, w: int, h: int) -> np.ndarray:
    """Rasterise polygons (filled) minus holes, scaled together to span a w x h canvas."""
    allpts = np.concatenate(polys)
    lo, hi = allpts.min(0), allpts.max(0)
    scale = np.array([w - 1, h - 1]) / np.maximum(hi - lo, 1e-6)
    image = PIL.Image.new("L", (w, h), 0)
    draw = PIL.ImageDraw.Draw(image)
    for fill, group in ((1, polys), (0, holes)):
        for pts in group:
            draw.polygon([tuple(p) for p in (pts - lo) * scale], fill=fill)
    return np.asarray(image) > 0


def variety_masks(num: int, seed: int = 7) -> np.ndarray:
    """float32 [num, 64, 64]: random outlines on canvases of VARIETY_SIZES, via crop_and_resize."""
    rng = np.random.default_rng(seed)
    cache, out = {}, []
    while len(out) < num:
        w, h = (int(v) for v in rng.choice(VARIETY_SIZES, 2))
        polys, holes = [_polygon(rng)], []
        extra = rng.integers(4)
        if extra == 1:  # union with a second, shifted shape
            polys.append(_polygon(rng) * rng.uniform(0.3, 0.8) + rng.uniform(-1, 1, 2))
        elif extra == 2:  # a hole
            holes.append(polys[0] * rng.uniform(0.3, 0.6) + rng.uniform(-0.15, 0.15, 2))
        mask = _draw(polys, holes, w, h)
        if mask.sum() < 4:
            continue
        out.append(_crops(cache, mask, (0, 0, w, h)))
    return np.stack(out)


def _augment(masks: np.ndarray, rng) -> np.ndarray:
    """Random flips / transposes (exact symmetries of crop + resize)."""
    out = masks.copy()
    for i in range(len(out)):
        k = rng.integers(8)
        m = out[i]
        m = m.T if k & 4 else m
        m = m[::-1] if k & 2 else m
        out[i] = m[:, ::-1] if k & 1 else m
    return out


# ----------------------------------------------------------------------------- parameters


def init_arrays(codebook_dim: int, seed: int) -> dict[str, np.ndarray]:
    """He-scaled random weights in vae-oid's PyTorch layout, zero biases."""
    arrays = _load_script("make_random_vae").random_vae_arrays(codebook_dim, seed)
    return {k: np.zeros_like(v) if k.endswith(".bias") else v for k, v in arrays.items()}


def _torch_conv(p) -> tuple[np.ndarray, np.ndarray]:
    """JAX {kernel (kh, kw, a, b), bias} -> PyTorch weight (b, a, kh, kw), bias.

    The inverse of segmentation._conv (transpose (2, 3, 1, 0)), for both plain
    and transposed convolutions.
    """
    return np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)), np.asarray(p["bias"])


def to_torch_arrays(params: dict, codebook) -> dict[str, np.ndarray]:
    """{"encoder", "decoder"} in the JAX layout of MaskVAE.params -> vae-oid.npz arrays."""
    names = {
        "decoder": {"Conv_0": "decoder.0", "Conv_1": "decoder.12",
                    **{f"ConvTranspose_{j}": f"decoder.{i}" for j, i in enumerate((4, 6, 8, 10))}},
        "encoder": {**{f"Conv_{j}": f"encoder.{i}" for j, i in enumerate((0, 2, 4, 6))},
                    "Conv_4": "encoder.10"},
    }  # fmt: skip
    arrays = {"_vq_vae._embedding": np.asarray(codebook)}
    for part, start in (("decoder", 2), ("encoder", 8)):
        for name, torch_name in names[part].items():
            w, b = _torch_conv(params[part][name])
            arrays[f"{torch_name}.weight"], arrays[f"{torch_name}.bias"] = w, b
        for r in range(2):
            for j, i in enumerate((0, 2, 4)):
                w, b = _torch_conv(params[part][f"ResBlock_{r}"][f"Conv_{j}"])
                arrays[f"{part}.{start + r}.net.{i}.weight"] = w
                arrays[f"{part}.{start + r}.net.{i}.bias"] = b
    return arrays


# ----------------------------------------------------------------------------- training


def _decode_rows(dec, rows):
    """decode_codes on given 4x4 grids of vectors: rows [B, 16, D] -> [B, 64, 64].

    decode_codes looks its input up in a codebook; with the rows themselves as
    the codebook and the indices 0..16B-1 it decodes exactly these vectors.
    """
    batch = rows.shape[0]
    ids = jnp.arange(batch * 16, dtype=jnp.int32).reshape(batch, 16)
    return decode_codes({"codebook": rows.reshape(batch * 16, -1), "decoder": dec}, ids)


# The gradient of decode_codes. XLA:CPU differentiates a transposed convolution
# (a convolution of the input dilated by 2) very slowly with respect to its
# kernel: 10x its forward pass, 4/5 of a training step. The backward pass below
# uses the same decoder with each ConvTranspose written as its 4 output phases
# (2x2 convolutions of the undilated input), which is the same function: the
# forward values and the loss still come from decode_codes, and
# check_gradients() compares both gradients at start-up.

_PHASE_TAPS = ((3, 1), (2, 0))  # output phase a: kernel rows of input rows (m - 1 + a, m + a)


def _conv_transpose_phases(x, p):
    """= segmentation._conv_transpose(x, p) (PyTorch ConvTranspose2d k4 s2 p1), by output phase.

    out[2m + a, 2n + c] = sum over the 2x2 input window at (m - 1 + a, n - 1 + c)
    of kernel[_PHASE_TAPS[a], _PHASE_TAPS[c]] (kernel [kh, kw, out, in]).
    """
    kernel = p["kernel"]
    batch, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for a in (0, 1):
        cols = []
        for c in (0, 1):
            k = kernel[np.array(_PHASE_TAPS[a])][:, np.array(_PHASE_TAPS[c])]
            cols.append(
                jax.lax.conv_general_dilated(
                    xp[:, a : a + h + 1, c : c + w + 1],
                    jnp.swapaxes(k, 2, 3),
                    (1, 1),
                    "VALID",
                    dimension_numbers=_DIMS,
                    precision=jax.lax.Precision.HIGHEST,
                )  # fmt: skip
            )
        rows.append(jnp.stack(cols, 3))  # [B, h, w, 2, out]
    y = jnp.stack(rows, 2)  # [B, h, 2, w, 2, out]
    return y.reshape(batch, 2 * h, 2 * w, kernel.shape[2]) + p["bias"]


def _decode_rows_phases(dec, rows):
    """The decoder of decode_codes, step for step, with _conv_transpose_phases (gradients only)."""
    x = rows.reshape(rows.shape[0], 4, 4, -1)
    x = jax.nn.relu(_conv2d(x, dec["Conv_0"]))
    x = _resblock_apply(x, dec["ResBlock_0"])
    x = _resblock_apply(x, dec["ResBlock_1"])
    for i in range(4):
        x = jax.nn.relu(_conv_transpose_phases(x, dec[f"ConvTranspose_{i}"]))
    return _conv2d(x, dec["Conv_1"])[..., 0]


@jax.custom_vjp
def decode_rows(dec, rows):
    return _decode_rows(dec, rows)


def _decode_rows_fwd(dec, rows):
    return _decode_rows(dec, rows), (dec, rows)


def _decode_rows_bwd(residuals, grad):
    return jax.vjp(_decode_rows_phases, *residuals)[1](grad)


decode_rows.defvjp(_decode_rows_fwd, _decode_rows_bwd)


def check_gradients(dec, dim: int, seed: int = 0) -> None:
    """decode_rows (and its gradient) == decode_codes (and jax.grad through it)."""
    rows = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 16, dim)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(2, 64, 64)), jnp.float32)

    def loss(f):
        return lambda d, r: jnp.sum(jnp.sin(f(d, r)) * target)

    exact = jax.grad(loss(_decode_rows), argnums=(0, 1))(dec, rows)
    ours = jax.grad(loss(decode_rows), argnums=(0, 1))(dec, rows)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(ours)):
        err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
        assert err < 1e-3, f"gradient of {jax.tree_util.keystr(path)} differs: {err:.1e}"
    out = _decode_rows_phases(dec, rows)
    err = float(jnp.max(jnp.abs(out - _decode_rows(dec, rows))))
    assert err < 1e-4, f"phase decoder differs from decode_codes by {err:.1e}"


def forward(params, codebook, masks):
    """-> (decoder output [B, 64, 64], encoder features [B, 4, 4, D], codes [B, 16]).

    The straight-through estimator: the decoder sees the quantised vectors,
    its gradient goes to the encoder features unchanged.
    """
    z = encode_features({"encoder": params["encoder"]}, masks)
    codes = nearest_codes(codebook, z)
    q = jnp.take(codebook, codes, axis=0).reshape(z.shape)
    z_st = z + jax.lax.stop_gradient(q - z)
    out = decode_rows(params["decoder"], z_st.reshape(masks.shape[0], 16, -1))
    return out, z, codes


def make_step(optimizer, beta: float, decay: float):
    def loss_fn(params, codebook, masks):
        out, z, codes = forward(params, codebook, masks)
        rec = jnp.mean((out - (2.0 * masks - 1.0)) ** 2)
        q = jnp.take(codebook, codes, axis=0).reshape(z.shape)
        commit = jnp.mean((z - jax.lax.stop_gradient(q)) ** 2)
        return rec + beta * commit, (rec, commit, z, codes, out)

    @jax.jit
    def step(params, opt_state, ema, masks):
        codebook = ema["sum"] / ema["count_smoothed"][:, None]
        (loss, (rec, commit, z, codes, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, codebook, masks
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # EMA codebook (van den Oord et al. 2017, appendix): counts and sums of assignments.
        flat = z.reshape(-1, z.shape[-1])
        onehot = jax.nn.one_hot(codes.reshape(-1), NUM_CODES, dtype=jnp.float32)
        count = decay * ema["count"] + (1 - decay) * onehot.sum(0)
        total = count.sum()
        smoothed = (count + 1e-5) / (total + NUM_CODES * 1e-5) * total
        ema = {
            "count": count,
            "count_smoothed": smoothed,
            "sum": decay * ema["sum"] + (1 - decay) * onehot.T @ flat,
        }
        iou = _iou(out > 0, masks > 0.5)
        return params, opt_state, ema, {"loss": loss, "rec": rec, "commit": commit, "iou": iou}

    return step


def _iou(pred, target):
    inter = jnp.sum(pred & target, axis=(-2, -1))
    union = jnp.sum(pred | target, axis=(-2, -1))
    return jnp.mean(jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0))


@jax.jit
def _features(params, masks):
    return encode_features({"encoder": params["encoder"]}, masks)


def _restart_dead(ema, params, masks, rng, threshold: float):
    """Codes whose EMA count fell below ``threshold`` move to random encoder outputs."""
    count = np.asarray(ema["count"])
    dead = np.flatnonzero(count < threshold)
    if len(dead) == 0:
        return ema, 0
    flat = np.asarray(_features(params, masks)).reshape(-1, ema["sum"].shape[1])
    picks = flat[rng.choice(len(flat), len(dead), replace=len(dead) > len(flat))]
    picks = picks + rng.normal(0, 0.01, picks.shape).astype(np.float32)
    new_count = count.copy()
    new_count[dead] = threshold * 2  # give it a grace period
    total = new_count.sum()
    smoothed = (new_count + 1e-5) / (total + len(count) * 1e-5) * total
    new_sum = np.asarray(ema["sum"]).copy()
    new_sum[dead] = picks * smoothed[dead, None]
    ema = dict(ema, count=jnp.asarray(new_count), count_smoothed=jnp.asarray(smoothed),
               sum=jnp.asarray(new_sum))  # fmt: skip
    return ema, len(dead)


def train(args) -> dict[str, np.ndarray]:
    t0 = time.time()
    shapes, _ = shape_masks(args.scenes)
    print(f"{len(shapes)} distinct shape masks ({time.time() - t0:.0f} s)", flush=True)
    t1 = time.time()
    variety = variety_masks(args.variety)
    print(f"{len(variety)} variety masks ({time.time() - t1:.0f} s)", flush=True)

    arrays = init_arrays(args.codebook_dim, args.seed)
    vae0 = load_vae(arrays)  # the loader's own conversion to the JAX layout
    params = {"encoder": vae0.params["encoder"], "decoder": vae0.params["decoder"]}

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(200, args.steps // 10), args.steps, args.lr * 0.01
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    step_fn = make_step(optimizer, args.beta, args.decay)
    check_gradients(params["decoder"], args.codebook_dim)

    rng = np.random.default_rng(args.seed)

    def batch():
        half = round(args.batch * args.shape_fraction)
        a = shapes[rng.integers(len(shapes), size=half)]
        b = _augment(variety[rng.integers(len(variety), size=args.batch - half)], rng)
        return jnp.asarray(np.concatenate([a, b]))

    # Codebook starts on encoder outputs of the first batch.
    first = batch()
    flat = np.asarray(_features(params, first)).reshape(-1, args.codebook_dim)
    init = flat[rng.choice(len(flat), NUM_CODES, replace=False)]
    ema = {
        "count": jnp.ones(NUM_CODES),
        "count_smoothed": jnp.ones(NUM_CODES),
        "sum": jnp.asarray(init),
    }
    threshold = args.dead_threshold * args.batch * 16 / NUM_CODES  # of the mean count
    t2 = time.time()
    for step in range(1, args.steps + 1):
        masks = batch()
        params, opt_state, ema, metrics = step_fn(params, opt_state, ema, masks)
        restarted = 0
        if step % args.restart_every == 0 and step <= int(0.8 * args.steps):
            ema, restarted = _restart_dead(ema, params, masks, rng, threshold)
        if step % args.log_every == 0 or step == 1:
            m = {k: float(v) for k, v in metrics.items()}
            used = int(np.sum(np.asarray(ema["count"]) > threshold))
            rate = (time.time() - t2) / step
            print(
                f"step {step:5d}  loss {m['loss']:.4f}  rec {m['rec']:.4f}  commit"
                f" {m['commit']:.4f}  iou64 {m['iou']:.3f}  live codes {used:3d}"
                f"  restarted {restarted:3d}  {rate:.2f} s/step",
                flush=True,
            )
    print(f"trained {args.steps} steps in {time.time() - t2:.0f} s", flush=True)
    codebook = ema["sum"] / ema["count_smoothed"][:, None]
    return to_torch_arrays(params, codebook)


# ----------------------------------------------------------------------------- evaluation


def held_out_objects(num: int, seed: int = EVAL_SEED, sizes=(64, 224)):
    """The first ``num`` objects of scenes make_scene(seed, i, size), size random in ``sizes``."""
    rng = np.random.default_rng(seed)
    objects, index = [], 0
    while len(objects) < num:
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        for obj in pdata.make_scene(seed, index, size).objects:
            objects.append((size, obj))
        index += 1
    return objects[:num]


def evaluate(vae, objects) -> dict:
    """Per shape: mean IoU of the pasted reconstruction (> 0) with the exact mask, and at 64x64."""
    cache = {}
    crops = np.stack([_crops(cache, obj.mask, obj.box) for _, obj in objects])
    codes = encode_masks(vae, crops)
    recon = reconstruct_masks(vae, codes)
    per = {}
    for (size, obj), crop, rec in zip(objects, crops, recon):
        pasted = paste_binary_mask(rec, obj.box, size, size)
        iou = np.sum(pasted & obj.mask) / max(np.sum(pasted | obj.mask), 1)
        small = rec > 0
        iou64 = np.sum(small & (crop > 0.5)) / max(np.sum(small | (crop > 0.5)), 1)
        per.setdefault(obj.label, []).append((iou, iou64))
    report = {
        label: {"n": len(v), "iou": float(np.mean([a for a, _ in v])),
                "iou64": float(np.mean([b for _, b in v])),
                "min_iou": float(np.min([a for a, _ in v]))}
        for label, v in sorted(per.items())
    }  # fmt: skip
    report["all"] = {
        "n": len(objects),
        "iou": float(np.mean([a for v in per.values() for a, _ in v])),
        "iou64": float(np.mean([b for v in per.values() for _, b in v])),
    }
    report["codes_used_by_shapes"] = int(len(np.unique(codes)))
    return report, codes


def evaluate_variety(vae, masks) -> dict:
    """Held-out variety masks: mean IoU at 64x64 (> 0 against > 0.5) and the codes they use."""
    codes = encode_masks(vae, masks)
    rec = reconstruct_masks(vae, codes) > 0
    target = masks > 0.5
    iou = np.sum(rec & target, axis=(1, 2)) / np.maximum(np.sum(rec | target, axis=(1, 2)), 1)
    report = {"n": len(masks), "iou64": float(np.mean(iou)), "codes_used": len(np.unique(codes))}
    return report, codes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "data" / "vae.npz"))
    parser.add_argument("--codebook-dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape-fraction", type=float, default=0.5,
                        help="part of a batch from make_scene objects (the rest: variety)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    parser.add_argument("--decay", type=float, default=0.99, help="EMA codebook decay")
    parser.add_argument("--dead-threshold", type=float, default=0.03,
                        help="restart codes whose EMA count is below this fraction of the mean")  # fmt: skip
    parser.add_argument("--restart-every", type=int, default=100)
    parser.add_argument("--scenes", type=int, default=1500, help="training scenes per seed")
    parser.add_argument("--variety", type=int, default=2000, help="random variety masks")
    parser.add_argument("--eval-objects", type=int, default=500)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)

    start = time.time()
    arrays = train(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        np.savez(f, **{k: v.astype(args.dtype) for k, v in arrays.items()})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.dtype})", flush=True)

    vae = load_vae(out)  # evaluate what was saved, through the normal loader
    report, shape_codes = evaluate(vae, held_out_objects(args.eval_objects))
    report["variety"], variety_codes = evaluate_variety(vae, variety_masks(500, seed=99))
    report["codes_used"] = len(np.unique(np.concatenate([shape_codes, variety_codes])))
    report["wall_s"] = round(time.time() - start)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
