"""Pictures for notebooks: boxes and masks over images, captions, grids (headless).

    from pali_kit import viz
    dets = pk.parse_detections(text, *image.size)
    viz.draw_detections(image, dets)                  # -> PIL.Image, boxes + labels (+ masks)
    viz.draw_caption(image, "a red circle")           # -> PIL.Image with the text below
    viz.show([image, model_input], titles=["original", "[-1, 1] input"])  # -> matplotlib Figure

Images may be PIL images, uint8 arrays [H, W(, C)] or float arrays read by the
kit's one float rule (``pali_kit.images.float_range``: [-1, 1], the model's input,
if any value is negative, else [0, 1]; ``value_range`` says otherwise), with or
without a leading batch axis of 1. Every label gets the same colour in every call and
every process (a CRC32 of the label picks from a fixed palette). Figures are
built on matplotlib's Agg canvas without pyplot, so nothing needs a display;
Jupyter shows a returned Figure inline.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .errors import ArgumentError, ArgumentTypeError, ImageError, short_repr
from .images import float_range, is_float

# A qualitative palette (Tableau 10 followed by its light variants): 20 colours.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


# ----------------------------------------------------------------------------- images in

# Inputs read as pk.preprocess reads them; the rest are arrays (numpy, JAX, ...).
_FILE_LIKE = (str, os.PathLike, bytes, bytearray, memoryview, PIL.Image.Image)


def to_pil(image: Any, *, value_range: tuple[float, float] | None = None) -> PIL.Image.Image:
    """Any image -> RGB PIL image.

    Args:
      image: PIL image; uint8 array [H, W], [H, W, 1|3|4]; a float array in
        ``value_range`` (default: the kit's float rule, [-1, 1] or [0, 1]); a
        leading batch axis of size 1 is dropped. JAX arrays work too.
      value_range: the (low, high) of float inputs, mapped to 0..255.
    """
    if isinstance(image, _FILE_LIKE) or hasattr(image, "read"):
        # a path, bytes, a file or a PIL image: read as pk.preprocess reads it (EXIF upright)
        from .images import load_image

        return PIL.Image.fromarray(load_image(image))
    return PIL.Image.fromarray(to_uint8(image, value_range=value_range)).convert("RGB")


def to_uint8(image: Any, *, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Array image -> uint8 [H, W] or [H, W, C]; floats are mapped from ``value_range``."""
    x = np.asarray(image)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
        raise ImageError(
            f"viz: expected an image [H, W] or [H, W, 3|4] (a PIL image or an array), got "
            f"{type(image).__name__} of shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return x
    if x.dtype == bool:
        return x.astype(np.uint8) * 255
    if not (is_float(x.dtype) or np.issubdtype(x.dtype, np.integer)):
        raise ImageError(f"viz: unsupported image dtype {x.dtype}: use uint8, bool or floats")
    lo, hi = value_range or float_range(x, "float image values")
    x = (x.astype(np.float32) - lo) / (hi - lo) * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def label_color(label: str) -> tuple[int, int, int]:
    """The fixed colour of a label: the same in every call, run and process."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    try:
        return PIL.ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover - older Pillow
        return PIL.ImageFont.load_default()


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


# ----------------------------------------------------------------------------- detections


def draw_detections(
    image: Any,
    detections: Sequence[Any],
    *,
    show_masks: bool = True,
    alpha: float = 0.45,
    line_width: int | None = None,
    font_size: int | None = None,
    captions: Sequence[str] | None = None,
) -> PIL.Image.Image:
    """Draw boxes with labels, and masks as translucent overlays.

    Args:
      image: any image ``to_pil`` takes; boxes must be in its pixel size (parse
        with ``parse_detections(text, *image.size)``).
      detections: objects with ``.label`` and ``.box`` (x0, y0, x1, y1 pixels),
        optionally ``.mask`` (float [H, W] in [0, 1] or bool); a mask of another
        size is resized to the image.
      show_masks: overlay the masks.
      alpha: opacity of a mask where its value is 1.
      line_width, font_size: default to a size relative to the image.
      captions: the text of each object's tag (e.g. ``"circle 0.93"``), one per
        detection; default: the labels. The colour stays the label's.
    Returns:
      a new RGB PIL image.
    """
    _check_detections(detections)
    out = to_pil(image)
    w, h = out.size
    line_width = line_width or max(1, round(min(w, h) / 160))
    font = _font(font_size or max(10, round(min(w, h) / 28)))
    if show_masks:
        out = _overlay_masks(out, detections, alpha)
    if captions is None:
        captions = [det.label for det in detections]
    elif len(captions) != len(detections):
        raise ValueError(
            f"captions has {len(captions)} entries for {len(detections)} detections: give one "
            "per detection, or None for the labels"
        )
    draw = PIL.ImageDraw.Draw(out)
    for det, caption in zip(detections, captions):
        color = label_color(det.label)
        x0, y0, x1, y1 = (float(v) for v in det.box)
        draw.rectangle((x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)), outline=color, width=line_width)
        if caption:
            _draw_label(draw, caption, (x0, y0), color, font)
    return out


def _check_detections(detections) -> None:
    if isinstance(detections, str) or not isinstance(detections, Sequence):
        raise ArgumentTypeError(
            f"draw_detections: detections={short_repr(detections)} must be a list of objects with "
            ".label and .box: parse the model's text first, pk.parse_detections(text, *image.size)"
        )
    for i, det in enumerate(detections):
        if not (hasattr(det, "label") and hasattr(det, "box")):
            raise ArgumentTypeError(
                f"draw_detections: detections[{i}]={short_repr(det)} has no .label and .box: "
                "pass the Detection objects of pk.parse_detections(text, *image.size)"
            )


def _overlay_masks(image: PIL.Image.Image, detections, alpha: float) -> PIL.Image.Image:
    """Blend each mask's label colour in: out = img * (1 - a m) + colour * a m."""
    pixels = np.asarray(image, np.float32)
    for det in detections:
        mask = getattr(det, "mask", None)
        if mask is None:
            continue
        m = _mask_like(mask, image.size)[..., None] * alpha
        pixels = pixels * (1.0 - m) + np.asarray(label_color(det.label), np.float32) * m
    return PIL.Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _mask_like(mask, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W] in [0, 1] of the image size ``size`` = (W, H)."""
    m = np.clip(np.asarray(mask, np.float32), 0.0, 1.0)
    if m.shape != (size[1], size[0]):
        m = np.asarray(PIL.Image.fromarray(m, mode="F").resize(size, PIL.Image.BILINEAR))
    return m


def _draw_label(draw, label: str, corner: tuple[float, float], color, font) -> None:
    """A filled tag with the label above the box corner (inside the box at the top edge)."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x, y = corner
    y = y - th if y - th >= 0 else y
    draw.rectangle((x, y, x + tw, y + th), fill=color)
    draw.text((x + 2 - left, y + 2 - top), label, fill=_text_color(color), font=font)


# ----------------------------------------------------------------------------- captions and grids


def draw_caption(
    image: Any,
    text: str,
    *,
    position: str = "below",
    font_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    color: tuple[int, int, int] = (0, 0, 0),
) -> PIL.Image.Image:
    """Put ``text``, wrapped to the image width, in a band below (or above) the image.

    Args:
      image: any image ``to_pil`` takes.
      text: the caption (newlines are kept).
      position: "below" or "above".
    Returns:
      a new RGB PIL image, taller than the input by the text band.
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(
            f"draw_caption: text={short_repr(text)} must be a string (e.g. generation.text)"
        )
    if position not in ("below", "above"):
        raise ArgumentError(f'draw_caption: position={position!r}: use "below" or "above"')
    img = to_pil(image)
    w, h = img.size
    font = _font(font_size or max(10, round(w / 24)))
    lines = _wrap(text, font, max_width=w - 8)
    line_h = font.getbbox("Ag")[3] + 4
    band = PIL.Image.new("RGB", (w, line_h * len(lines) + 8), background)
    draw = PIL.ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 4 + i * line_h), line, fill=color, font=font)
    out = PIL.Image.new("RGB", (w, h + band.height), background)
    out.paste(img, (0, band.height if position == "above" else 0))
    out.paste(band, (0, 0 if position == "above" else h))
    return out


def _wrap(text: str, font, max_width: int) -> list[str]:
    """Greedy word wrap by measured pixel width (a too-long word gets its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n") or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and font.getlength(candidate) > max_width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def image_grid(
    images: Sequence[Any],
    *,
    cols: int | None = None,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> PIL.Image.Image:
    """Tile images into one PIL image, row-major; cells are the largest image's size."""
    pils = [to_pil(im) for im in images]
    if not pils:
        raise ArgumentError("image_grid: images is empty: pass at least one image")
    cols = cols or min(len(pils), 4)
    rows = -(-len(pils) // cols)
    cw, ch = max(p.width for p in pils), max(p.height for p in pils)
    out = PIL.Image.new(
        "RGB", (cols * cw + (cols + 1) * pad, rows * ch + (rows + 1) * pad), background
    )
    for i, p in enumerate(pils):
        r, c = divmod(i, cols)
        out.paste(p, (pad + c * (cw + pad), pad + r * (ch + pad)))
    return out


def show(
    images: Any,
    titles: Sequence[str] | None = None,
    *,
    cols: int = 4,
    size: float = 3.0,
):
    """A matplotlib Figure with the images in a grid (no pyplot, no display needed).

    Args:
      images: one image or a list of images (anything ``to_pil`` takes).
      titles: one title per image.
      cols: images per row.
      size: inches per cell.
    Returns:
      ``matplotlib.figure.Figure`` on an Agg canvas; Jupyter shows it inline,
      ``fig.savefig(path)`` writes it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(images, _FILE_LIKE) or (hasattr(images, "ndim") and images.ndim <= 3):
        images = [images]
    images = list(images)
    if titles is not None and len(titles) != len(images):
        raise ArgumentError(
            f"show: got {len(titles)} titles for {len(images)} images: give one title per image"
        )
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(size * cols, size * rows))
    FigureCanvasAgg(fig)
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(to_pil(image))
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i])
    fig.tight_layout()
    return fig
