"""Parse PaliGemma detection / segmentation text into objects; boxes <-> <loc> tokens.

    from pali_kit.detection import parse_detections, detections_to_text
    text = "<loc0102><loc0250><loc0870><loc0990> cat ; <loc0000><loc0000><loc1023><loc1023> dog"
    dets = parse_detections(text, width=640, height=480)
    dets[0].label, dets[0].box        # 'cat', (156.25, 47.8125, 618.75, 407.8125)
    detections_to_text([("cat", (156.25, 47.8, 618.75, 407.8))], 640, 480)
    # '<loc0102><loc0250><loc0870><loc0990> cat'

The format (spec section 7): one object is four location tokens in the order
ymin, xmin, ymax, xmax, then optionally 16 ``<segNNN>`` mask codes, then the
label; objects are separated by ``" ; "``. A bin ``b`` in [0, 1023] stands for
the normalised coordinate ``b / scale``; this module uses ``scale=1024`` like
Google's demo, while big_vision's segmentation evaluator decodes (and its
RefCOCO pre-processing encodes) with ``scale=1023``. The two differ by < 0.1 %.

Coordinates are relative to the model input, a non-aspect-preserving resize of
the original image, so they map linearly to the original image: pass the
original width and height to get boxes on the original image.

This module is deliberately light (no JAX): masks are filled in by
``pali_kit.segmentation.with_masks``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import ArgumentError, ArgumentTypeError, check_int, short_repr
from .vocab import NUM_LOC, NUM_SEG, SEG_RE, SEG_TOKENS_PER_MASK, loc_text, seg_text, to_bin

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object from a ``detect``/``segment`` answer.

    Attributes:
      label: the object's text ("" when the model gave none).
      box: (x0, y0, x1, y1) in pixels of the width/height given to the parser,
        floats, ``x0 <= x1`` and ``y0 <= y1``, inside ``[0, width] x [0, height]``.
      box_normalized: (x0, y0, x1, y1) in [0, 1].
      loc_tokens: the four bins (ymin, xmin, ymax, xmax), y first as in the
        text; after the swap of an inverted box they are the swapped bins, so
        they always agree with ``box``.
      seg_codes: the 16 VQ-VAE codes (ints in [0, 127]) or None.
      score: in [0, 1]; 1.0 for parsed text (the text carries no confidence);
        ``Model.detect`` / ``Model.segment`` set the model's own probability of
        the object (docs/detection_scores.md).
      mask: float32 [H, W] soft mask in [0, 1] (``segmentation.with_masks``),
        bool [H, W] (``Model.segment``), or None.
      binary_mask: bool [H, W] or None; big_vision's rule (decoder output > 0).
    """

    label: str
    box: Box
    box_normalized: Box
    loc_tokens: tuple[int, int, int, int]
    seg_codes: tuple[int, ...] | None = None
    score: float = 1.0
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    binary_mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_box(
        cls,
        label: str,
        box: Sequence[float],
        width: float,
        height: float,
        *,
        seg_codes: Sequence[int] | None = None,
        score: float = 1.0,
        scale: float = NUM_LOC,
    ) -> Detection:
        """A Detection from a pixel box (x0, y0, x1, y1); ``loc_tokens`` are its bins."""
        x0, y0, x1, y1 = (float(v) for v in box)
        bins = loc_bins((x0, y0, x1, y1), width, height, scale=scale)
        normalized = (x0 / width, y0 / height, x1 / width, y1 / height)
        codes = None if seg_codes is None else _check_seg_codes(seg_codes)
        return cls(label, (x0, y0, x1, y1), normalized, bins, codes, float(score))


# ----------------------------------------------------------------------------- parsing

# One object: 4 loc tokens, then any number of seg tokens, then the label, which
# ends at the next ";" or the next <loc>. Leading text before the loc tokens is
# skipped by finditer. The label part is lazy and its look-ahead always succeeds
# at ";", "<loc" or the end, so the pattern never backtracks into the seg group.
_OBJECT_RE = re.compile(
    r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>"
    r"((?:\s*<seg\d{3}>)*)"
    r"([^;]*?)(?=<loc\d{4}>|;|\Z)",
    re.DOTALL,
)
_LOC_RUN_RE = re.compile(r"(?:<loc\d{4}>\s*)+")  # consecutive loc tokens
_TAG_RE = re.compile(r"<[^<>]*>")  # <eos>, <unk>, stray <segNNN>, ...
_PAD_RE = re.compile(r"<pad>|<bos>")


def parse_detections(
    text: str,
    width: float,
    height: float,
    *,
    scale: float = NUM_LOC,
    max_objects: int = 100,
    inverted: str = "swap",
) -> list[Detection]:
    """Parse model output text into a list of Detection; never raises on any string.

    Args:
      text: decoded suffix, e.g. ``"<loc0102><loc0250><loc0870><loc0990> cat ; ..."``.
      width, height: the image size the boxes should be expressed in (pixels).
      scale: 1024 (Google's demo, default) or 1023 (big_vision's evaluator).
      max_objects: at most this many (distinct) objects are returned, which
        bounds the work on runaway repetitions.
      inverted: what to do with a box whose ymax < ymin or xmax < xmin:
        ``"swap"`` the two coordinates (default) or ``"drop"`` the object.

    Rules, in order:
      - Text after the first ``<eos>`` is padding and ignored; ``<pad>`` and
        ``<bos>`` are removed.
      - An object is a run of exactly 4 consecutive ``<locNNNN>`` (whitespace
        between them is allowed). A run of any other length, fewer (a truncated
        output) or more (``<loc>`` x 5: which four are the box?), is malformed
        and skipped with its label, so 3 and 5 are treated alike.
      - A bin above 1023 is not a PaliGemma token: that object is dropped.
      - Seg codes are kept only if at least 16 ``<segNNN>`` follow the loc
        tokens, and the first 16 are all in [0, 127]; otherwise the box is kept
        without codes.
      - The label is the text up to the next ``;`` or ``<loc``, with tags
        (``<...>``) removed and whitespace collapsed; it may be "".
      - Zero-area boxes (ymin == ymax) are kept; identical objects (label, bins,
        codes) are kept once, in order of first appearance.
    """
    _check_parse_args(text, width, height, scale, max_objects, inverted)
    text = _PAD_RE.sub("", text.split("<eos>", 1)[0])
    text = _LOC_RUN_RE.sub(_keep_runs_of_four, text)
    found: dict[tuple, Detection] = {}
    for match in _OBJECT_RE.finditer(text):
        det = _to_detection(match, width, height, scale, inverted)
        if det is not None:
            found.setdefault((det.label, det.loc_tokens, det.seg_codes), det)
            if len(found) >= max_objects:
                break
    return list(found.values())


def _check_parse_args(text, width, height, scale, max_objects, inverted) -> None:
    where = "parse_detections"
    if not isinstance(text, str):
        hint = ": pass its .text" if hasattr(text, "text") else ""
        raise ArgumentTypeError(
            f"{where}: text={short_repr(text)} must be the model's answer as a string, not a "
            f"{type(text).__name__}{hint}"
        )
    for name, value in (("width", width), ("height", height), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ArgumentTypeError(
                f"{where}: {name}={short_repr(value)} must be a positive number (pixels), not a "
                f"{type(value).__name__}"
            )
        if not (math.isfinite(value) and value > 0):
            raise ArgumentError(
                f"{where}: {name}={value!r} must be positive and finite; width and height are "
                "the image size in pixels, e.g. parse_detections(text, *image.size)"
            )
    check_int(max_objects, "max_objects", where, low=1)
    if inverted not in ("swap", "drop"):
        raise ArgumentError(f'{where}: inverted={inverted!r}: use "swap" or "drop"')


def _keep_runs_of_four(run: re.Match) -> str:
    """A run of 4 loc tokens is an object; any other run is cut off from its label."""
    return run.group(0) if run.group(0).count("<loc") == 4 else " ; "


def _to_detection(match, width, height, scale, inverted) -> Detection | None:
    """One regex match -> Detection, or None when the object is invalid."""
    y0, x0, y1, x1 = (int(g) for g in match.groups()[:4])
    if max(y0, x0, y1, x1) >= NUM_LOC:
        return None
    if (y1 < y0 or x1 < x0) and inverted == "drop":
        return None
    y0, y1 = min(y0, y1), max(y0, y1)
    x0, x1 = min(x0, x1), max(x0, x1)
    normalized = tuple(min(b / scale, 1.0) for b in (x0, y0, x1, y1))
    box = (
        normalized[0] * width,
        normalized[1] * height,
        normalized[2] * width,
        normalized[3] * height,
    )
    return Detection(
        label=_clean_label(match.group(6)),
        box=box,
        box_normalized=normalized,
        loc_tokens=(y0, x0, y1, x1),
        seg_codes=_seg_codes(match.group(5)),
    )


def _seg_codes(text: str) -> tuple[int, ...] | None:
    codes = [int(c) for c in SEG_RE.findall(text)[:SEG_TOKENS_PER_MASK]]
    if len(codes) < SEG_TOKENS_PER_MASK or max(codes) >= NUM_SEG:
        return None
    return tuple(codes)


def _clean_label(label: str) -> str:
    return " ".join(_TAG_RE.sub(" ", label).split())


# ----------------------------------------------------------------------------- building text


def loc_bins(
    box: Sequence[float], width: float, height: float, *, scale: float = NUM_LOC
) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) -> bins (ymin, xmin, ymax, xmax), y first.

    Convention (``pali_kit.vocab``): ``bin = clip(round(v / size * scale), 0, 1023)``
    with Python's round (half to even, like big_vision's ``tf.round``). Decoding with the same
    scale (``bin / scale * size``) gives back ``v`` within half a bin, i.e.
    ``size / (2 * scale)`` pixels (0.11 px at 224 px), except that a coordinate
    at the very right/bottom edge comes back as ``1023 / 1024 * size`` (0.22 px
    short at 224 px).
    """
    x0, y0, x1, y1 = box
    return (
        _bin(y0, height, scale),
        _bin(x0, width, scale),
        _bin(y1, height, scale),
        _bin(x1, width, scale),
    )


def _bin(value: float, size: float, scale: float) -> int:
    return to_bin(float(value) / size, scale)


def box_to_loc(box: Sequence[float], width: float, height: float, *, scale: float = NUM_LOC) -> str:
    """Pixel box (x0, y0, x1, y1) -> ``"<locYMIN><locXMIN><locYMAX><locXMAX>"``.

    See ``loc_bins`` for the binning convention.
    """
    return loc_text(loc_bins(box, width, height, scale=scale))


def seg_to_text(codes: Sequence[int]) -> str:
    """16 VQ-VAE codes -> ``"<segNNN>" * 16``."""
    return seg_text(_check_seg_codes(codes))


def detections_to_text(
    objects: Iterable[Detection | Sequence[Any]],
    width: float,
    height: float,
    *,
    scale: float = NUM_LOC,
) -> str:
    """Build a training target such as ``"<loc..>x4[<seg..>x16] cat ; <loc..>x4 dog"``.

    Args:
      objects: Detection objects or tuples ``(label, box)`` /
        ``(label, box, seg_codes)`` with box = (x0, y0, x1, y1) in pixels.
      width, height: the image size the boxes are expressed in.
      scale: see ``loc_bins``.

    The loc (and seg) tokens come first, then a space and the label (omitted
    when empty); objects are joined by ``" ; "`` as the model writes them.
    ``parse_detections`` of the result gives the same bins back.
    """
    parts = []
    for obj in objects:
        if isinstance(obj, Detection):
            label, box, codes = obj.label, obj.box, obj.seg_codes
        else:
            label, box, codes = obj[0], obj[1], (obj[2] if len(obj) > 2 else None)
        text = box_to_loc(box, width, height, scale=scale)
        if codes is not None:
            text += seg_to_text(codes)
        label = _clean_label(str(label)).replace(";", ",")
        parts.append(f"{text} {label}" if label else text)
    return " ; ".join(parts)


def _check_seg_codes(codes: Sequence[int]) -> tuple[int, ...]:
    codes = tuple(int(c) for c in codes)
    if len(codes) != SEG_TOKENS_PER_MASK or not all(0 <= c < NUM_SEG for c in codes):
        raise ValueError(f"expected 16 seg codes in [0, 127], got {codes}")
    return codes


# ----------------------------------------------------------------------------- supervision


def _import_supervision():
    try:
        with warnings.catch_warnings():
            # supervision warns at import time when OpenCV is absent; we only
            # build Detections, which do not need it.
            warnings.simplefilter("ignore")
            import supervision
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs the optional package 'supervision': pip install supervision"
        ) from e
    return supervision


def to_supervision(detections: Sequence[Detection], *, classes: Sequence[str] | None = None):
    """Detections -> ``supervision.Detections`` (needs ``pip install supervision``).

    ``xyxy`` are the pixel boxes, ``confidence`` the scores (``Model.detect``'s
    probabilities; 1.0 for parsed text), ``data["class_name"]`` the labels, and ``class_id`` the index of each
    label in ``classes`` (default: labels in order of first appearance; a label
    missing from ``classes`` gets -1). ``mask`` is set when every detection has
    a ``binary_mask``.
    """
    sv = _import_supervision()
    labels = [d.label for d in detections]
    classes = list(dict.fromkeys(labels)) if classes is None else list(classes)
    xyxy = np.array([d.box for d in detections], np.float32).reshape(-1, 4)
    masks = None
    if detections and all(d.binary_mask is not None for d in detections):
        masks = np.stack([np.asarray(d.binary_mask, bool) for d in detections])
    return sv.Detections(
        xyxy=xyxy,
        mask=masks,
        confidence=np.array([d.score for d in detections], np.float32),
        class_id=np.array([classes.index(x) if x in classes else -1 for x in labels], int),
        data={"class_name": np.array(labels, dtype=str)},
    )


def from_supervision(
    sv_detections,
    labels: Sequence[str] | None = None,
    *,
    width: float,
    height: float,
    scale: float = NUM_LOC,
) -> list[Detection]:
    """``supervision.Detections`` -> list of Detection (e.g. to build targets).

    Args:
      sv_detections: a ``supervision.Detections``.
      labels: one label per detection; by default ``data["class_name"]`` when
        present, else the class ids as strings, else "".
      width, height: the image size (pixels) the boxes are expressed in.
      scale: see ``loc_bins``.

    Masks, when present, become ``binary_mask`` and (as float32) ``mask``.
    """
    n = len(sv_detections)
    if labels is None:
        labels = _supervision_labels(sv_detections, n)
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} detections")
    scores = sv_detections.confidence
    masks = sv_detections.mask
    out = []
    for i in range(n):
        det = Detection.from_box(
            str(labels[i]),
            sv_detections.xyxy[i],
            width,
            height,
            score=1.0 if scores is None else float(scores[i]),
            scale=scale,
        )
        if masks is not None:
            m = np.asarray(masks[i], bool)
            det = dataclasses.replace(det, mask=m.astype(np.float32), binary_mask=m)
        out.append(det)
    return out


def _supervision_labels(sv_detections, n: int) -> list[str]:
    names = (sv_detections.data or {}).get("class_name")
    if names is not None:
        return [str(x) for x in names]
    if sv_detections.class_id is not None:
        return [str(int(x)) for x in sv_detections.class_id]
    return [""] * n
