"""The mask VQ-VAE of PaliGemma segmentation (spec 7.3, 7.4) in JAX; masks pasted into boxes.

    import pali_kit as pk
    from pali_kit.segmentation import with_masks
    vae = pk.load_vae("vae-oid.npz")                     # or "demo"
    masks64 = pk.reconstruct_masks(vae, codes)           # int [B, 16] -> float32 [B, 64, 64]
    dets = pk.parse_detections(text, width=w, height=h)
    dets = with_masks(dets, vae, w, h)                   # dets[i].mask: float32 [h, w] in [0, 1]

A ``segment`` answer gives, per object, a box (4 ``<loc>``) and 16 ``<seg>``
codes. Each code picks one of 128 codebook vectors (width D) for one cell of a
4x4 grid; the decoder turns that grid into a 64x64 mask with values about
[-1, 1] (> 0 means "object"), which is then resized into the box.

The weights come from big_vision's ``vae-oid.npz``, stored with PyTorch names and
layouts. They are converted once (kernels to HWIO) and the network is written
as pure functions over that parameter dict, so it can be jitted, differentiated
or read top to bottom. The parameter tree uses big_vision's flax names
(``Conv_0``, ``ResBlock_0``, ``ConvTranspose_0`` ...).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from .assets import asset_dir
from .detection import Detection, parse_detections
from .errors import ArgumentError, ArgumentTypeError, short_repr

MASK_SIZE = 64
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 convs even on TPU/GPU (no bf16/tf32 passes)
_DIMS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class MaskVAE:
    """The VQ-VAE weights in JAX layout.

    Attributes:
      params: ``{"codebook": float32 [K=128, D], "decoder": {...}, "encoder": {...} or None}``;
        every conv is ``{"kernel": float32 [kh, kw, in, out], "bias": float32 [out]}``
        (transposed convs: ``[kh, kw, out, in]``, flax's ``transpose_kernel`` layout).
      source: where the weights came from (for messages).
    """

    params: dict[str, Any]
    source: str = ""

    @property
    def codebook_dim(self) -> int:
        """D, the width of a codebook vector (read from the file)."""
        return int(self.params["codebook"].shape[1])

    @property
    def num_codes(self) -> int:
        """K, the number of codebook entries (128 for vae-oid)."""
        return int(self.params["codebook"].shape[0])

    @property
    def has_encoder(self) -> bool:
        return self.params["encoder"] is not None


# ----------------------------------------------------------------------------- loading


def load_vae(source: str | os.PathLike | Mapping[str, np.ndarray] = "demo") -> MaskVAE:
    """Load the mask VQ-VAE.

    Args:
      source: ``"demo"`` (``vae.npz`` in ``pk.asset_dir()``, installed with the kit),
        a path to ``vae-oid.npz`` (``gs://big_vision/paligemma/vae-oid.npz``,
        also in the HF Space ``google/paligemma-hf``), or a dict of its arrays.

    The codebook width D is read from ``_vq_vae._embedding`` (K, D). The file is
    read with ``allow_pickle=False``. The encoder is loaded when its keys are
    present (``encode_masks`` needs it).
    """
    if isinstance(source, Mapping):
        return _from_arrays(dict(source), "<dict>")
    path = asset_dir() / "vae.npz" if str(source) == "demo" else Path(source)
    if not path.is_file():
        hint = (
            "the demo VAE is missing from the kit's assets (set PALI_KIT_DATA to a folder"
            " that holds vae.npz, or unset it to use the one installed with the kit)"
            if str(source) == "demo"
            else "download gs://big_vision/paligemma/vae-oid.npz"
        )
        raise FileNotFoundError(f"mask VAE file not found: {path}: {hint}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz of arrays (vae-oid.npz?): {e}") from e
    return _from_arrays(arrays, str(path))


def _from_arrays(arrays: dict[str, np.ndarray], source: str) -> MaskVAE:
    """PyTorch-named arrays -> MaskVAE (checks presence and shapes)."""
    missing = [k for k in _decoder_keys() if k not in arrays]
    if missing:
        raise ValueError(
            f"{source}: missing {len(missing)} VAE parameters, e.g. {missing[:3]}:"
            " is this PaliGemma's vae-oid.npz?"
        )
    codebook = np.asarray(arrays["_vq_vae._embedding"], np.float32)
    if codebook.ndim != 2:
        raise ValueError(f"{source}: _vq_vae._embedding must be (K, D), got {codebook.shape}")
    w0 = arrays["decoder.0.weight"]
    if w0.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{source}: decoder.0.weight {w0.shape} does not take the codebook width"
            f" D={codebook.shape[1]}"
        )
    has_encoder = all(k in arrays for k in _encoder_keys())
    params = {
        "codebook": jnp.asarray(codebook),
        "decoder": _decoder_params(arrays),
        "encoder": _encoder_params(arrays) if has_encoder else None,
    }
    return MaskVAE(params, source)


def _conv_keys(name: str) -> list[str]:
    return [f"{name}.weight", f"{name}.bias"]


def _resblock_keys(name: str) -> list[str]:
    return [k for i in (0, 2, 4) for k in _conv_keys(f"{name}.{i}")]


def _decoder_keys() -> list[str]:
    keys = ["_vq_vae._embedding", *_conv_keys("decoder.0"), *_conv_keys("decoder.12")]
    keys += _resblock_keys("decoder.2.net") + _resblock_keys("decoder.3.net")
    return keys + [k for i in (4, 6, 8, 10) for k in _conv_keys(f"decoder.{i}")]


def _encoder_keys() -> list[str]:
    keys = [k for i in (0, 2, 4, 6, 10) for k in _conv_keys(f"encoder.{i}")]
    return keys + _resblock_keys("encoder.8.net") + _resblock_keys("encoder.9.net")


def _conv(arrays, name):
    """PyTorch (out, in, kh, kw) or transposed (in, out, kh, kw) -> (kh, kw, ., .)."""
    kernel = np.transpose(np.asarray(arrays[f"{name}.weight"], np.float32), (2, 3, 1, 0))
    return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(arrays[f"{name}.bias"], np.float32)}


def _resblock(arrays, name):
    return {f"Conv_{j}": _conv(arrays, f"{name}.{i}") for j, i in enumerate((0, 2, 4))}


def _decoder_params(arrays):
    params = {"Conv_0": _conv(arrays, "decoder.0"), "Conv_1": _conv(arrays, "decoder.12")}
    params["ResBlock_0"] = _resblock(arrays, "decoder.2.net")
    params["ResBlock_1"] = _resblock(arrays, "decoder.3.net")
    for j, i in enumerate((4, 6, 8, 10)):
        params[f"ConvTranspose_{j}"] = _conv(arrays, f"decoder.{i}")
    return params


def _encoder_params(arrays):
    params = {f"Conv_{j}": _conv(arrays, f"encoder.{i}") for j, i in enumerate((0, 2, 4, 6))}
    params["ResBlock_0"] = _resblock(arrays, "encoder.8.net")
    params["ResBlock_1"] = _resblock(arrays, "encoder.9.net")
    params["Conv_4"] = _conv(arrays, "encoder.10")
    return params


# ----------------------------------------------------------------------------- the network


def _conv2d(x, p, stride: int = 1):
    """Conv with TF "SAME" padding: PyTorch's padding=k//2 for odd k at stride 1;
    for stride 2 the extra pixel (if any) goes after, as in big_vision's encoder."""
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), "SAME", dimension_numbers=_DIMS, precision=_HIGHEST
    )
    return y + p["bias"]


def _conv_transpose(x, p):
    """PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1): 2x upsampling.

    Equals a stride-1 conv of the input dilated by 2 and padded by k-1-p = 2 on
    each side, with the kernel flipped in space (flax: padding=2,
    transpose_kernel=True).
    """
    y = jax.lax.conv_transpose(
        x,
        p["kernel"],
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        dimension_numbers=_DIMS,
        transpose_kernel=True,
        precision=_HIGHEST,
    )
    return y + p["bias"]


def _resblock_apply(x, p):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(Conv3x3(x))))); no activation after the add."""
    h = jax.nn.relu(_conv2d(x, p["Conv_0"]))
    h = jax.nn.relu(_conv2d(h, p["Conv_1"]))
    return x + _conv2d(h, p["Conv_2"])


@jax.jit
def decode_codes(params: dict[str, Any], indices: jax.Array) -> jax.Array:
    """Codes -> masks, the decoder of spec 7.3 (pure and jitted).

    Args:
      params: ``MaskVAE.params``.
      indices: int [B, 16] in [0, K).
    Returns:
      float32 [B, 64, 64], about [-1, 1]; > 0 is inside the object.
    """
    dec = params["decoder"]
    x = jnp.take(params["codebook"], indices, axis=0)  # [B, 16, D]
    x = x.reshape(indices.shape[0], 4, 4, -1)  # token t -> row t // 4, column t % 4
    x = jax.nn.relu(_conv2d(x, dec["Conv_0"]))
    x = _resblock_apply(x, dec["ResBlock_0"])
    x = _resblock_apply(x, dec["ResBlock_1"])
    for i in range(4):  # 4 -> 8 -> 16 -> 32 -> 64
        x = jax.nn.relu(_conv_transpose(x, dec[f"ConvTranspose_{i}"]))
    return _conv2d(x, dec["Conv_1"])[..., 0]


@jax.jit
def encode_features(params: dict[str, Any], masks: jax.Array) -> jax.Array:
    """Masks -> encoder output before quantisation (spec 7.4).

    Args:
      params: ``MaskVAE.params`` (with an encoder).
      masks: float [B, 64, 64] in [0, 1].
    Returns:
      float32 [B, 4, 4, D].
    """
    enc = params["encoder"]
    x = 2.0 * (masks[..., None].astype(jnp.float32) - 0.5)
    for i in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
        x = jax.nn.relu(_conv2d(x, enc[f"Conv_{i}"], stride=2))
    x = _resblock_apply(x, enc["ResBlock_0"])
    x = _resblock_apply(x, enc["ResBlock_1"])
    return _conv2d(x, enc["Conv_4"])


@jax.jit
def nearest_codes(codebook: jax.Array, features: jax.Array) -> jax.Array:
    """float [B, 4, 4, D] -> int32 [B, 16]: nearest codebook row by squared L2."""
    flat = features.reshape(-1, codebook.shape[1])
    dist = (
        jnp.sum(flat**2, axis=1, keepdims=True)
        + jnp.sum(codebook**2, axis=1)
        - 2 * jnp.matmul(flat, codebook.T, precision=_HIGHEST)
    )
    return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(features.shape[0], 16)


def reconstruct_masks(vae: MaskVAE, indices) -> np.ndarray:
    """int [B, 16] (or [16]) codes -> float32 [B, 64, 64] (or [64, 64]) masks, about [-1, 1].

    vae: from ``load_vae``; indices: integers (a list, tuple or int array; a
    Detection's ``seg_codes``). Raises the kit's ArgumentTypeError for a wrong
    type (e.g. floats, or the arguments swapped) and ArgumentError for codes
    outside [0, K) or a shape other than [16] / [B, 16].
    """
    where = "reconstruct_masks"
    if not isinstance(vae, MaskVAE):
        raise ArgumentTypeError(
            f"{where}: vae={short_repr(vae)} must be a MaskVAE from pk.load_vae('demo') or "
            "pk.load_vae('vae-oid.npz'); the call is reconstruct_masks(vae, codes)"
        )
    if indices is None:
        raise ArgumentTypeError(
            f"{where}: indices=None: pass 16 codes, e.g. a detection's seg_codes"
        )
    try:
        indices = np.asarray(indices)
    except Exception:
        indices = np.asarray(None, object)
    if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer):
        if indices.size == 0 and indices.dtype == np.float64:  # [] or np.zeros((0, 16))
            indices = indices.astype(np.int32)
        else:
            raise ArgumentTypeError(
                f"{where}: indices={short_repr(indices)} must be integer codes (int [16] or "
                f"[B, 16]), got dtype {indices.dtype}"
            )
    single = indices.ndim == 1
    indices = indices[None] if single else indices
    if indices.ndim != 2 or indices.shape[1] != 16:
        raise ArgumentError(
            f"{where}: indices has shape {indices.shape if not single else indices.shape[1:]}, "
            "expected [16] or [B, 16] (16 <seg> codes per mask)"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= vae.num_codes):
        raise ArgumentError(
            f"{where}: codes must be in [0, {vae.num_codes}), got {indices.min()}..{indices.max()}"
        )
    if len(indices) == 0:
        return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
    out = np.asarray(decode_codes(vae.params, jnp.asarray(indices, jnp.int32)))
    return out[0] if single else out


def encode_masks(vae: MaskVAE, masks64) -> np.ndarray:
    """float [B, 64, 64] (or [64, 64]) masks in [0, 1] -> int32 [B, 16] (or [16]) codes."""
    if not vae.has_encoder:
        raise ArgumentError(
            f"encode_masks: {vae.source}: this VAE file has no encoder.* weights (decoding only)"
        )
    masks64 = np.asarray(masks64, np.float32)
    single = masks64.ndim == 2
    masks64 = masks64[None] if single else masks64
    if masks64.shape[1:] != (MASK_SIZE, MASK_SIZE):
        raise ArgumentError(
            f"encode_masks: masks have shape {masks64.shape}, expected [64, 64] or [B, 64, 64]: "
            "crop and resize with crop_and_resize(mask, box) first"
        )
    features = encode_features(vae.params, jnp.asarray(masks64))
    codes = np.asarray(nearest_codes(vae.params["codebook"], features))
    return codes[0] if single else codes


def crop_and_resize(mask, box: Sequence[float]) -> np.ndarray:
    """Crop a [H, W] mask to a pixel box (x0, y0, x1, y1), resize to float32 [64, 64].

    As big_vision's pre-processing: box coords rounded to pixels, bilinear
    resize with antialiasing (``jax.image.resize`` follows ``tf.image.resize``);
    values in [0, 1] for a bool or {0, 1} mask (uint8 0/255 masks are scaled).
    """
    mask = np.asarray(mask)
    scale = 255.0 if mask.dtype == np.uint8 and mask.max() > 1 else 1.0
    h, w = mask.shape
    x0, y0, x1, y1 = _pixel_box(box, w, h)
    if x1 <= x0 or y1 <= y0:
        raise ArgumentError(f"crop_and_resize: box={tuple(box)} is empty inside a {w}x{h} mask")
    crop = jnp.asarray(mask[y0:y1, x0:x1], jnp.float32) / scale
    resized = jax.image.resize(crop, (MASK_SIZE, MASK_SIZE), "bilinear", antialias=True)
    return np.asarray(resized)


def mask_to_codes(vae: MaskVAE, mask, box: Sequence[float]) -> tuple[int, ...]:
    """Binary mask [H, W] of the whole image + pixel box (x0, y0, x1, y1) -> 16 codes.

    The inverse of decoding, for building ``segment`` training targets, e.g.
    ``detections_to_text([(label, box, mask_to_codes(vae, mask, box))], w, h)``.
    """
    return tuple(int(c) for c in encode_masks(vae, crop_and_resize(mask, box)))


# ----------------------------------------------------------------------------- placement


def _pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Round a float box to pixels and clip it to the image."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return (min(max(x0, 0), width), min(max(y0, 0), height),
            min(max(x1, 0), width), min(max(y1, 0), height))  # fmt: skip


def paste_mask(mask64, box: Sequence[float], width: int, height: int) -> np.ndarray:
    """Resize a 64x64 float mask into a pixel box of a zero [height, width] canvas.

    Args:
      mask64: float [64, 64] (any values, e.g. the decoder output in [-1, 1]).
      box: (x0, y0, x1, y1) in pixels; rounded to the nearest pixel (Google's
        demo; big_vision's evaluator truncates with ``int``).
      width, height: canvas size.
    Returns:
      float32 [height, width]: the box holds the mask resized with PIL BILINEAR
      on float data (mode "F", as big_vision's evaluator), zero elsewhere. A box
      partly outside the image is resized whole and clipped; an empty box gives
      an all-zero canvas.
    """
    canvas = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    if x1 <= x0 or y1 <= y0:
        return canvas
    image = PIL.Image.fromarray(np.asarray(mask64, np.float32), mode="F")
    resized = np.asarray(image.resize((x1 - x0, y1 - y0), PIL.Image.BILINEAR))
    cx0, cy0, cx1, cy1 = _pixel_box(box, width, height)
    canvas[cy0:cy1, cx0:cx1] = resized[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return canvas


def paste_binary_mask(mask64, box: Sequence[float], width: int, height: int) -> np.ndarray:
    """bool [height, width]: ``paste_mask(...) > 0``, big_vision's evaluator threshold."""
    return paste_mask(mask64, box, width, height) > 0.0


def soft_mask(mask64) -> np.ndarray:
    """Decoder output (about [-1, 1]) -> float32 in [0, 1], as Google's demo shows it."""
    return np.clip(np.asarray(mask64, np.float32) * 0.5 + 0.5, 0.0, 1.0)


def with_masks(
    detections: Sequence[Detection], vae: MaskVAE, width: int, height: int
) -> list[Detection]:
    """Fill ``mask`` and ``binary_mask`` of every Detection that has seg codes.

    Args:
      detections: from ``parse_detections(text, width, height)``.
      vae: from ``load_vae``.
      width, height: the image size the boxes are in (the canvas size).
    Returns:
      new Detection objects; those without seg codes are returned unchanged.
      ``mask``: float32 [height, width], ``soft_mask`` of the decoder output
      resized into the box (0 outside). ``binary_mask``: bool [height, width],
      decoder output resized into the box > 0 (big_vision's rule).
    """
    with_codes = [i for i, d in enumerate(detections) if d.seg_codes is not None]
    out = list(detections)
    if not with_codes:
        return out
    masks64 = reconstruct_masks(vae, [detections[i].seg_codes for i in with_codes])
    for i, m64 in zip(with_codes, masks64):
        box = detections[i].box
        out[i] = dataclasses.replace(
            detections[i],
            mask=paste_mask(soft_mask(m64), box, width, height),
            binary_mask=paste_binary_mask(m64, box, width, height),
        )
    return out


def parse_segments(text: str, vae: MaskVAE, width: int, height: int, **kw) -> list[Detection]:
    """``parse_detections`` then ``with_masks``, in one call (``kw`` go to the parser)."""
    return with_masks(parse_detections(text, width, height, **kw), vae, width, height)
