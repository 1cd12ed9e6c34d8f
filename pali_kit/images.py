"""Any image in -> float32 [B, size, size, 3] in [-1, 1], as PaliGemma expects.

    import pali_kit as pk
    x = pk.preprocess("data/images/shapes_0.png", 224)        # float32 [1, 224, 224, 3]
    x = pk.preprocess([path, png_bytes, pil_image, array], 224)  # float32 [4, 224, 224, 3]
    pixels = pk.images.to_uint8(x[0])                         # uint8 [224, 224, 3], to show

What it does, as the reference colab (big_vision ``finetune_paligemma.ipynb``):
  1. read the image as RGB (grayscale copied to 3 channels, alpha dropped as
     ``[..., :3]`` with no compositing) and turn it upright (EXIF orientation);
  2. resize to size x size, aspect ratio NOT preserved, with
     ``tf.image.resize(img, (size, size), "bilinear", antialias=True)`` on float
     pixels (reimplemented here in numpy, no TensorFlow), result kept as float;
  3. map [0, 255] to [-1, 1] with ``x / 127.5 - 1``.
Input that cannot be read raises ``ImageError`` (a ValueError) saying what to do.

Pixel values read from each input kind:
  uint8 arrays, 8-bit images           0..255
  uint16 arrays, 16-bit images (I;16)  0..65535 (scaled by 255/65535, precision kept)
  other integer and bool arrays        0..255 (bool: False 0, True 255)
  float arrays, float ("F") images     the float rule below

The float rule, one for the whole kit (``pk.preprocess``, ``Model.preprocess`` and
every Model call that takes images, the prompt panel, ``viz``; see ``float_range``):
a float array (float16/32/64, bfloat16; numpy or JAX) must be finite with values in
[-1, 1]. If any value is negative it is on the model's scale [-1, 1] (what
``pk.preprocess`` returns, so its output can be passed back in anywhere); otherwise
it is an image in [0, 1] (matplotlib's, PIL's and scikit-image's convention).
Values below -1 or above 1 (e.g. floats on the 0..255 scale), NaN and infinity are
an ``ImageError``. A batch array [B, H, W, C] is judged as a whole. The rule's one
blind spot: a [-1, 1] array with no negative value at all (every channel of every
pixel at least mid-grey) reads as [0, 1], i.e. darker; pass such images as uint8
(``pk.images.to_uint8(x)``) or as their file.
Arrays are [H, W] or [H, W, C] with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or
4 (RGBA). CMYK, palette and other PIL modes go through ``PIL.Image.convert("RGB")``
(no colour management).

The resize (``resize``): TensorFlow's scale-and-translate with a triangle kernel.
Output pixel i has its centre at input coordinate c = (i + 0.5) * in / out; its value
is the weighted mean of input pixels j with weight max(0, 1 - |j + 0.5 - c| / s),
where s = max(in / out, 1). So upsampling is plain bilinear interpolation with
half-pixel centres and downsampling averages over the whole footprint of the output
pixel (antialiasing). The filter is separable: one small [out, in] weight matrix per
axis, applied with two matrix products.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError  # an ArgumentError, so a ValueError

__all__ = [
    "ImageError",
    "float_range",
    "preprocess",
    "load_image",
    "resize",
    "resize_weights",
    "normalize",
    "to_uint8",
]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# --------------------------------------------------------------------------- resize


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """The antialiased bilinear weights of one axis. float32 [out_size, in_size], rows sum to 1.

    Example: resize_weights(4, 2)[0] == [3/7, 3/7, 1/7, 0]: downsampling by 2 widens
    the triangle kernel to reach 2 input pixels on each side of the output centre.
    """
    # float32 in TensorFlow's order of operations: at a sharp edge a sample position
    # rounded differently moves the output by ~1e-5 (on [-1, 1]); this way ~1e-7.
    f32 = np.float32
    inv_scale = f32(1.0 / float(f32(out_size) / f32(in_size)))  # output -> input coordinates
    kernel_scale = max(inv_scale, f32(1.0))  # widened only when downsampling
    centres = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale
    offsets = (np.arange(in_size, dtype=f32) + f32(0.5)) - centres[:, None]
    distance = np.abs(offsets * (f32(1.0) / kernel_scale))
    weights = np.where(distance < 1, f32(1.0) - distance, f32(0.0))
    return weights * (f32(1.0) / weights.sum(axis=1, keepdims=True, dtype=f32))


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize, as tf.image.resize(..., "bilinear", antialias=True).

    image: float [..., H, W, C] (any value range; leading batch/frame axes allowed).
    size:  int (square) or (height, width); the aspect ratio is not preserved.
    Returns float32 [..., height, width, C], on the same value scale as the input.
    """
    out_h, out_w = _check_size(size)
    x = np.asarray(image, dtype=np.float32)
    if x.ndim < 3 or 0 in x.shape[-3:-1]:
        raise ImageError(f"resize needs a [..., H, W, C] array with H, W > 0, got shape {x.shape}")
    in_h, in_w = x.shape[-3:-1]
    if (in_h, in_w) != (out_h, out_w):
        wy, wx = resize_weights(in_h, out_h), resize_weights(in_w, out_w)
        x = np.einsum("oh,...hwc->...owc", wy, x, optimize=True)
        x = np.einsum("pw,...owc->...opc", wx, x, optimize=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[0, 255] -> [-1, 1] as the reference: x / 127.5 - 1. Returns float32, same shape."""
    return np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """[-1, 1] -> uint8 [0, 255] for display (rounded, clipped). Any shape; numpy or jax in."""
    x = np.asarray(images, dtype=np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------- reading


def load_image(image) -> np.ndarray:
    """Read one image as upright RGB. Returns uint8 [H, W, 3].

    image: a path (str or Path), bytes, a binary file object, a PIL image, or an array
    ([H, W] or [H, W, C]; see the module docstring for value ranges). 16-bit and float
    inputs are rounded to 8 bits here; ``preprocess`` keeps their precision.
    """
    return np.round(read_pixels(image)).astype(np.uint8)


def read_pixels(image) -> np.ndarray:
    """One image of any supported kind -> float32 [H, W, 3] on the [0, 255] scale."""
    if isinstance(image, (str, os.PathLike)):
        pixels = _pil_pixels(_open_path(image))
    elif isinstance(image, (bytes, bytearray, memoryview)) or hasattr(image, "read"):
        pixels = _pil_pixels(_open_bytes(image))
    elif isinstance(image, Image.Image):
        pixels = _pil_pixels(_upright(_load(image, "the PIL image")))
    elif is_array(image):
        pixels = _array_pixels(np.asarray(image))
    else:
        raise ImageError(
            f"cannot read an image from a {type(image).__name__}: pass a file path, "
            "bytes, a PIL image or a numpy array"
        )
    if 0 in pixels.shape:
        raise ImageError(
            f"the image is empty (height x width = {pixels.shape[0]} x {pixels.shape[1]})"
        )
    return pixels


def _open_path(path) -> Image.Image:
    text = os.fspath(path)
    if text.startswith(("http://", "https://")):
        raise ImageError(f"{text!r} is a URL: download the file first and pass its path or bytes")
    path = Path(text).expanduser()
    if not path.exists():
        raise ImageError(f"image file not found: {text!r} (current directory: {os.getcwd()})")
    if path.is_dir():
        raise ImageError(f"{text!r} is a directory, not an image file")
    return _decode(path.read_bytes(), f"image file {text!r}")


def _open_bytes(data) -> Image.Image:
    raw = data.read() if hasattr(data, "read") else bytes(data)
    if isinstance(raw, str):
        raise ImageError("the file object is in text mode: open the image with open(path, 'rb')")
    return _decode(raw, "the image data")


def _decode(raw: bytes, what: str) -> Image.Image:
    """Bytes -> a fully decoded, upright PIL image."""
    if not raw:
        raise ImageError(f"{what} is empty (0 bytes): nothing to decode")
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as error:
        raise ImageError(_bomb_message(what, error)) from error
    except UnidentifiedImageError as error:
        raise ImageError(
            f"{what} ({len(raw)} bytes) is not in an image format PIL knows "
            "(PNG, JPEG, GIF, BMP, TIFF, WebP, ...)"
        ) from error
    except Exception as error:  # a header cut short: PIL raises OSError, SyntaxError, ...
        raise ImageError(
            f"could not read the header of {what} ({len(raw)} bytes): {error} "
            f"({type(error).__name__}). The file is truncated or corrupt: re-download or re-save it."
        ) from error
    return _upright(_load(image, what))


def _bomb_message(what: str, error: Exception) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return (
        f"{what} is too large to decode safely: {error} PIL refuses images above "
        f"2 x PIL.Image.MAX_IMAGE_PIXELS = {2 * limit:,} pixels as a possible decompression "
        "bomb. The model sees it at 224-896 px anyway: downscale it first, or, if you trust "
        "the file, raise PIL.Image.MAX_IMAGE_PIXELS."
    )


def _load(image: Image.Image, what: str) -> Image.Image:
    """Decode every pixel now: PIL reads lazily, so a truncated file would fail later."""
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageError(_bomb_message(what, error)) from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... per format
        raise ImageError(
            f"could not decode {what}: {error} ({type(error).__name__}). The file is "
            "truncated or corrupt: re-download or re-save it."
        ) from error
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as a photo viewer does."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: show the pixels as stored, as viewers do
        return image


def _pil_pixels(image: Image.Image) -> np.ndarray:
    """PIL image -> float32 [H, W, 3] in [0, 255]; 16-bit and float modes keep precision."""
    if image.mode in _SIXTEEN_BIT_MODES:  # "I" is 32-bit, but 16-bit data in practice
        values = np.asarray(image)
        _check_range(values, 0, 65535, f"pixels of a mode {image.mode!r} image")
        return _array_pixels(values.astype(np.uint16))
    if image.mode == "F":
        return _array_pixels(np.asarray(image))
    try:
        rgb = image.convert("RGB")  # gray copied, alpha dropped, palette/CMYK mapped
    except Exception as error:
        raise ImageError(
            f"cannot convert a PIL image of mode {image.mode!r} to RGB ({error}); "
            "convert it yourself, e.g. image.convert('RGB')"
        ) from error
    return np.asarray(rgb, dtype=np.float32)


def _array_pixels(array: np.ndarray) -> np.ndarray:
    """Array [H, W] or [H, W, C] -> float32 [H, W, 3] in [0, 255]."""
    rgb = _as_rgb(array)
    return _scale_to_255(rgb)


def _as_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # gray, gray + alpha
        return np.repeat(array[:, :, :1], 3, axis=2)
    if array.ndim == 3 and array.shape[-1] in (3, 4):  # RGB, RGBA: alpha dropped
        return array[:, :, :3]
    hint = ""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        hint = " It looks channels-first: use np.moveaxis(array, 0, -1)."
    raise ImageError(
        f"an image array must be [H, W] or [H, W, C] with C in 1-4, got shape {array.shape}.{hint}"
    )


def _scale_to_255(array: np.ndarray) -> np.ndarray:
    dtype = array.dtype
    if dtype == np.uint8:
        return array.astype(np.float32)
    if dtype == np.uint16:
        return array.astype(np.float32) * np.float32(255 / 65535)
    if dtype == np.bool_:
        return array.astype(np.float32) * 255
    if np.issubdtype(dtype, np.integer):
        _check_range(array, 0, 255, f"{dtype} pixels", "convert them to uint8 or uint16")
        return array.astype(np.float32)
    if is_float(dtype):
        low, _ = float_range(array)
        x = array.astype(np.float32)
        return (x + 1) * np.float32(127.5) if low < 0 else x * np.float32(255)
    raise ImageError(
        f"unsupported image dtype {dtype}: use uint8, uint16, or floats in [0, 1] or [-1, 1]"
    )


def is_float(dtype) -> bool:
    """numpy floats and ml_dtypes' bfloat16 (which numpy does not count as floating)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def float_range(array, what: str = "float pixels") -> tuple[float, float]:
    """The kit's one rule for float image arrays: (-1.0, 1.0) or (0.0, 1.0), else ImageError.

    Values must be finite and in [-1, 1]; any negative value means the model's
    scale [-1, 1] (pk.preprocess's output), otherwise an image in [0, 1]. Used
    by preprocess (so by every Model call taking images), the panel and viz.
    """
    x = np.asarray(array)
    if x.size == 0:
        return (0.0, 1.0)
    x = x.astype(np.float32) if x.dtype.name == "bfloat16" else x
    if not np.isfinite(x).all():
        raise ImageError(f"{what} contain NaN or infinity: every value must be finite")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 or hi > 1:
        fix = (
            "floats on the 0..255 scale: divide by 255, or pass uint8 (np.uint8(np.round(x)))"
            if hi > 1 and lo >= 0
            else "rescale them to [0, 1], or pass uint8"
        )
        raise ImageError(
            f"{what} must lie in [0, 1] (an image) or [-1, 1] (the model's input, as "
            f"pk.preprocess returns), got values in [{lo:g}, {hi:g}]: {fix}"
        )
    return (-1.0, 1.0) if lo < 0 else (0.0, 1.0)


def _check_range(array: np.ndarray, low, high, what: str, fix: str = "") -> None:
    if array.size == 0:
        return
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageError(f"{what} contain NaN or infinity")
    lo, hi = array.min(), array.max()
    if lo < low or hi > high:
        note = " (negative values: is it already normalised to [-1, 1]?)" if lo < 0 else ""
        raise ImageError(
            f"{what} must lie in [{low}, {high}], got [{lo}, {hi}]{note}"
            + (f"; {fix}" if fix else "")
        )


# ------------------------------------------------------------------------- preprocess


def preprocess(images, size: int | tuple[int, int]) -> np.ndarray:
    """Images -> the model's pixel input. float32 [B, size, size, 3] in [-1, 1].

    images: one image or a list of them (path, bytes, PIL image, array [H, W(, C)]), or
            a batch array uint8/float [B, H, W, C]. Video: an array [B, F, H, W, C] or a
            list of videos, each a list of frames or an array [F, H, W, C], all with
            the same number of frames F -> float32 [B, F, size, size, 3].
    size:   the model resolution (224, 448 or 896), or (height, width).
    """
    out_size = _check_size(size)
    if is_array(images):
        images = np.asarray(images)  # e.g. a jax array
    if isinstance(images, np.ndarray) and images.ndim >= 4:
        return _preprocess_array_batch(images, out_size)
    if not isinstance(images, (list, tuple)):
        return _preprocess_one(images, out_size)[None]
    if not images:
        raise ImageError("got an empty list of images: pass at least one image")
    videos = [_is_video(item) for item in images]
    if any(videos) and not all(videos):
        raise ImageError("mixed images and videos in one list: pass all images or all videos")
    if all(videos):
        return np.stack(_preprocess_videos(images, out_size))
    return np.stack([_preprocess_one(image, out_size) for image in images])


def _preprocess_one(image, size: tuple[int, int]) -> np.ndarray:
    """One image -> float32 [h, w, 3] in [-1, 1]."""
    return normalize(resize(read_pixels(image), size))


def _preprocess_array_batch(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, H, W, C] or [B, F, H, W, C] -> float32 [B(, F), h, w, 3] in [-1, 1]."""
    if images.ndim > 5 or images.shape[-1] not in (1, 2, 3, 4) or 0 in images.shape:
        raise ImageError(
            f"a batch array must be [B, H, W, C] or [B, F, H, W, C] with C in 1-4 and no "
            f"empty axis, got shape {images.shape}"
        )
    if is_float(images.dtype) and float_range(images, "float pixels of the batch")[0] < 0:
        images = (images.astype(np.float32) + 1) * np.float32(0.5)  # judged as a whole
    frames = images.reshape(-1, *images.shape[-3:])  # one at a time: big videos fit in memory
    resized = np.stack([_preprocess_one(frame, size) for frame in frames])
    return resized.reshape(*images.shape[:-3], *size, 3)


def is_array(item) -> bool:
    """True for an array-like image or batch (numpy, jax, torch), False for a PIL image."""
    return not isinstance(item, Image.Image) and hasattr(item, "__array__")


def _is_video(item) -> bool:
    return isinstance(item, (list, tuple)) or (is_array(item) and np.ndim(item) == 4)


def _preprocess_videos(videos: Sequence, size: tuple[int, int]) -> list[np.ndarray]:
    """A list of videos -> list of float32 [F, h, w, 3], checking every video has F frames."""
    counts = [len(video) for video in videos]
    if 0 in counts:
        raise ImageError("a video has no frames: each video needs at least one frame")
    if len(set(counts)) > 1:
        raise ImageError(f"videos must have the same number of frames to batch, got {counts}")
    return [np.stack([_preprocess_one(frame, size) for frame in video]) for video in videos]


def _check_size(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ImageError(f"size must be a positive int or (height, width), got {size!r}")
    if not all(isinstance(s, (int, np.integer)) and s > 0 for s in pair):
        raise ImageError(f"size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])
