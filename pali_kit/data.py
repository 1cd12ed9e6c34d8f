"""Training data: jsonl files, COCO annotations, synthetic shapes, and batches of numpy arrays.

    import pali_kit as pk
    from pali_kit import data as pdata

    tok = pk.Tokenizer.demo()
    train = pdata.JsonlDataset("data/sample_dataset/train.jsonl").validate()
    # or: pdata.ShapesDataset(2000, size=64, seed=0)            synthetic shapes
    #     pdata.CocoDataset("instances_val2017.json", "val2017/")  COCO detection
    train[0].prefix, train[0].suffix                  # ('caption en', 'a red circle and ...')

    for batch in pdata.batches(train, tok, batch_size=8, text_len=32, image_size=64, seed=0):
        batch["image"]                                # float32 [8, 64, 64, 3] in [-1, 1]
        batch["text"], batch["mask_loss"]             # int32 [8, 33]: text_len + 1 columns
        break

    val = pdata.JsonlDataset("data/sample_dataset/val.jsonl")
    for batch, examples in pdata.eval_batches(val, tok, batch_size=8, text_len=16, image_size=64):
        ...   # prompts only; examples[i].suffix is the reference answer of row i

A dataset is a sequence of ``Example`` (an image, a ``prefix`` prompt and the
``suffix`` answer, as big_vision's jsonl rows). The datasets here also have
``example(index, epoch)``: COCO shuffles the objects of a target differently
every epoch, the shapes tasks pick another object to ask about. A plain list
of ``Example`` works everywhere a dataset does.

Batches are a pure function of (seed, step): epoch ``e`` visits the examples in
the order ``np.random.default_rng((seed, e)).permutation(n)``, so a run
restarted with ``start_step=k`` sees exactly the batches of an uninterrupted
run. A background thread prepares a few batches ahead (``prefetch``).

Images are read lazily when a batch is built; an unreadable image raises
``DataError`` naming the jsonl file and line. ``JsonlDataset.validate()``
opens every image up front.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pali_kit import images as pimages
from pali_kit import metrics
from pali_kit import tokenizer as ptok
from pali_kit.detection import detections_to_text, parse_detections
from pali_kit.errors import PaliKitError

__all__ = [
    "DataError",
    "LineError",
    "Example",
    "Dataset",
    "JsonlDataset",
    "CocoDataset",
    "CocoObject",
    "ShapesDataset",
    "Shape",
    "Scene",
    "make_scene",
    "shape_task",
    "SHAPES",
    "COLOURS",
    "SHAPE_TASKS",
    "quadrant",
    "clear_quadrant",
    "sample_ground_truth",
    "grade_answer",
    "collate",
    "Batcher",
    "batches",
    "eval_batches",
    "Prefetch",
]

Batch = dict[str, np.ndarray]
ON_ERROR = ("raise", "warn", "skip")


# ============================================================================ examples


class DataError(PaliKitError, ValueError):
    """Bad training data; the message names the file (and line) and what is wrong."""


@dataclasses.dataclass(frozen=True)
class LineError:
    """One bad line of a jsonl file: ``str()`` gives ``"train.jsonl:12: what is wrong"``."""

    path: str
    line: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training example, as a jsonl row: an image, a prompt and its answer.

    Attributes:
      image: a file path (str), or the pixels as uint8 [H, W, 3].
      prefix: the prompt, e.g. ``"caption en"``; the tokenizer adds BOS and "\\n".
      suffix: the answer the model learns, e.g. ``"a red circle"`` ("" is allowed).
      source: where it came from, for messages (``"train.jsonl:12"``).
      meta: everything else: extra jsonl keys, ground-truth objects, the task.
    """

    image: str | np.ndarray
    prefix: str
    suffix: str
    source: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def pixels(self, size: int) -> np.ndarray:
        """The model input: float32 [size, size, 3] in [-1, 1] (``images.preprocess``)."""
        try:
            return pimages.preprocess(self.image, size)[0]
        except pimages.ImageError as error:
            where = f"{self.source}: " if self.source else ""
            name = self.image if isinstance(self.image, str) else "array"
            raise DataError(
                f"{where}image {name}: {error} (JsonlDataset.validate() checks every image "
                "up front; with on_error='skip' it drops the bad lines)"
            ) from error


class Dataset(Sequence):
    """A sized collection of ``Example``; subclasses define ``__len__`` and ``example``.

    ``dataset[i]`` is ``dataset.example(i, epoch=0)``; slices give lists.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, index: int, epoch: int = 0) -> Example:
        """Example ``index`` as seen in epoch ``epoch`` (targets may vary by epoch)."""
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.example(i) for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        return self.example(i)


def get_example(dataset: Sequence, index: int, epoch: int = 0) -> Example:
    """``dataset.example(index, epoch)`` for a Dataset, else ``dataset[index]``.

    Plain sequences may hold ``Example`` objects or dicts with the keys
    ``image``, ``prefix`` and ``suffix``.
    """
    if isinstance(dataset, Dataset):
        return dataset.example(index, epoch)
    item = dataset[index]
    if isinstance(item, Mapping):
        extra = {k: v for k, v in item.items() if k not in ("image", "prefix", "suffix")}
        return Example(item["image"], item["prefix"], item["suffix"], f"item {index}", extra)
    return item


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def _report(errors: Sequence[LineError], what: str, on_error: str, max_listed: int) -> None:
    """Raise one DataError listing the bad lines, or warn, or stay quiet (on_error)."""
    if not errors or on_error == "skip":
        return
    listed = "\n".join(f"  {e}" for e in errors[:max_listed])
    more = len(errors) - max_listed
    listed += f"\n  ... and {more} more" if more > 0 else ""
    if on_error == "raise":
        raise DataError(
            f"{len(errors)} bad line(s) in {what}:\n{listed}\n"
            "Fix them, or pass on_error='skip' (or 'warn') to leave them out."
        )
    warnings.warn(f"skipped {len(errors)} bad line(s) in {what}:\n{listed}", stacklevel=3)


# ============================================================================ jsonl


class _BadLine(Exception):
    """Internal: what is wrong with one line."""


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), "number")


class JsonlDataset(Dataset):
    """A jsonl file in the reference format, one example per line.

        {"image": "images/0001.png", "prefix": "caption en", "suffix": "a red circle"}

    Args:
      path: the ``.jsonl`` file (UTF-8). Blank lines are ignored.
      prefix: a fixed prompt for every line (the reference colab's "caption en");
        the lines then need no ``prefix`` key, and one they have is replaced
        (it stays in ``meta``).
      image_dir: where relative image paths start; default the jsonl's folder.
        Absolute paths are used as they are.
      on_error: what to do with bad lines (invalid JSON, not an object, a
        missing key, a non-string or empty value): ``"raise"`` one DataError
        listing them (default), ``"warn"`` and leave them out, or ``"skip"``
        them quietly. ``errors`` keeps them either way.
      max_listed: at most this many bad lines are listed in a message.

    Keys other than image/prefix/suffix are kept in ``Example.meta``. Images
    are read when a batch is built; ``validate()`` checks them all now.
    """

    def __init__(
        self,
        path,
        *,
        prefix: str | None = None,
        image_dir=None,
        on_error: str = "raise",
        max_listed: int = 10,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl file not found: {self.path}")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        self.on_error = _check_on_error(on_error)
        self.max_listed = max_listed
        self.examples, self.lines, self.errors = self._read()
        _report(self.errors, str(self.path), self.on_error, max_listed)
        if not self.examples:
            raise DataError(f"{self.path}: no examples (the file has no valid lines)")

    def __repr__(self) -> str:
        return f"JsonlDataset({str(self.path)!r}, {len(self)} examples)"

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int, epoch: int = 0) -> Example:
        return self.examples[index]

    def _read(self) -> tuple[list[Example], list[int], list[LineError]]:
        examples, lines, errors = [], [], []
        for number, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                examples.append(self._parse(raw, number))
                lines.append(number)
            except _BadLine as bad:
                errors.append(LineError(str(self.path), number, str(bad)))
        return examples, lines, errors

    def _parse(self, raw: bytes, number: int) -> Example:
        """One line -> Example; raises _BadLine saying what is wrong."""
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _BadLine(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise _BadLine(f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise _BadLine(f"expected a JSON object {{...}}, got a {_json_type(row)}")
        image = _string_field(row, "image", allow_empty=False)
        if "://" in image:
            raise _BadLine(f"image {image!r} is a URL: download it and give a local path")
        suffix = _string_field(row, "suffix")
        prefix = self.prefix if self.prefix is not None else _string_field(row, "prefix")
        meta = {k: v for k, v in row.items() if k not in ("image", "suffix")}
        if self.prefix is None:
            meta.pop("prefix")
        source = f"{self.path}:{number}"
        return Example(str(self._resolve(image)), prefix, suffix, source, meta)

    def _resolve(self, image: str) -> Path:
        path = Path(image).expanduser()
        return path if path.is_absolute() else self.image_dir / path

    def validate(self) -> JsonlDataset:
        """Open (fully decode) every image now; returns self, for chaining.

        Lines whose image is missing or unreadable are handled by ``on_error``:
        listed in one DataError, or (warn/skip) removed from the dataset and
        added to ``errors``. Each distinct file is read once.
        """
        problems: dict[str, str | None] = {}
        keep, keep_lines, bad = [], [], []
        for example, line in zip(self.examples, self.lines):
            if example.image not in problems:
                problems[example.image] = _image_problem(example.image)
            problem = problems[example.image]
            if problem is None:
                keep.append(example)
                keep_lines.append(line)
            else:
                bad.append(LineError(str(self.path), line, f"image {example.image}: {problem}"))
        _report(bad, str(self.path), self.on_error, self.max_listed)
        self.examples, self.lines = keep, keep_lines
        self.errors = self.errors + bad
        if not self.examples:
            raise DataError(f"{self.path}: no example has a readable image")
        return self


def _string_field(row: dict, key: str, *, allow_empty: bool = True) -> str:
    if key not in row:
        keys = ", ".join(row) or "none"
        raise _BadLine(f"missing key {key!r} (the line has: {keys})")
    value = row[key]
    if not isinstance(value, str):
        raise _BadLine(f"{key!r} must be a string, got a {_json_type(value)}: {value!r:.40}")
    if not allow_empty and not value.strip():
        raise _BadLine(f"{key!r} is empty")
    return value


def _image_problem(path: str) -> str | None:
    """None if the file decodes as an image, else what is wrong."""
    try:
        pimages.load_image(path)
    except pimages.ImageError as error:
        return str(error)
    return None


# ============================================================================ COCO


@dataclasses.dataclass(frozen=True)
class CocoObject:
    """One COCO annotation. ``box`` is (x0, y0, x1, y1) in pixels (from ``bbox`` xywh)."""

    label: str
    box: tuple[float, float, float, float]
    annotation_id: int
    category_id: int
    image_id: int
    segmentation: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class _CocoImage:
    id: int
    path: str
    width: int
    height: int


class CocoDataset(Dataset):
    """COCO instances annotations -> ``detect`` / ``segment`` examples.

    Args:
      annotations: an ``instances_*.json`` path, or its dict (``images``,
        ``annotations``, ``categories``; ``bbox`` is [x, y, width, height]).
      image_dir: folder of the images' ``file_name``; default the json's folder.
      task: ``"detect"`` or ``"segment"``. ``segment`` needs ``vae``.
      vae: a ``MaskVAE`` (``pali_kit.segmentation.load_vae``); each mask becomes
        16 codes with ``segmentation.mask_to_codes(vae, mask, box)``, computed
        once per annotation. A function ``(mask, box) -> 16 codes`` works too.
      per: how images become prompts. ``"image"`` (default): one example per
        image, the prompt names each of its categories once, in category-id
        order (``detect cat ; dog``), and the answer lists all their objects.
        ``"category"``: one example per (image, category present)
        (``detect cat`` -> every cat). Images with no objects are left out
        (no empty answers: they teach greedy decoding to answer nothing).
      seed: the objects of an answer come in the order
        ``default_rng((seed, epoch, index)).permutation``: a new order every
        epoch, the same on every run.
      categories: keep only these category names (default all).
      include_crowd: keep ``iscrowd`` annotations (default: left out).

    Answers are ``detections_to_text``: ``<loc>`` x 4 (y first, bins of 1/1024
    of the original image side) [+ ``<seg>`` x 16] + label, joined by " ; ".
    Boxes are clipped to the image; boxes under 1 pixel wide or high are left out.
    Each object costs about 6 tokens of ``text_len`` (22 with seg codes).

    ``Example.meta`` holds ``image_id``, ``size`` (width, height) and ``objects``
    (CocoObject, in the answer's order); ``mask(obj)`` gives an object's mask.
    """

    def __init__(
        self,
        annotations,
        image_dir=None,
        *,
        task: str = "detect",
        vae=None,
        per: str = "image",
        seed: int = 0,
        categories: Sequence[str] | None = None,
        include_crowd: bool = False,
    ):
        if task not in ("detect", "segment"):
            raise ValueError(f"task must be 'detect' or 'segment', got {task!r}")
        if task == "segment" and vae is None:
            raise ValueError("task='segment' needs vae=pali_kit.load_vae(...) to encode masks")
        if per not in ("image", "category"):
            raise ValueError(f"per must be 'image' or 'category', got {per!r}")
        coco, self.name = _read_coco(annotations)
        if image_dir is None:
            image_dir = Path(annotations).parent if self.name != "<dict>" else Path(".")
        self.image_dir = Path(image_dir)
        self.task, self.vae, self.per, self.seed = task, vae, per, seed
        self.names = _coco_categories(coco, self.name, categories)
        self.images = _coco_images(coco, self.name, self.image_dir)
        self.objects_by_image = _coco_objects(
            coco, self.name, self.images, self.names, task == "segment", include_crowd
        )
        self.entries = self._entries()
        self._codes: dict[int, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"CocoDataset({self.name!r}, task={self.task!r}, {len(self)} examples)"

    def __len__(self) -> int:
        return len(self.entries)

    def _entries(self) -> list[tuple[int, tuple[int, ...]]]:
        """(image id, category ids in the prompt) per example, in the json's image order."""
        entries = []
        for image_id in self.images:
            objects = self.objects_by_image.get(image_id)
            if not objects:
                continue
            cats = tuple(sorted({o.category_id for o in objects}))
            if self.per == "image":
                entries.append((image_id, cats))
            else:
                entries.extend((image_id, (c,)) for c in cats)
        return entries

    def objects(self, index: int) -> list[CocoObject]:
        """The ground-truth objects of example ``index``, in annotation order."""
        image_id, cats = self.entries[index]
        return [o for o in self.objects_by_image[image_id] if o.category_id in cats]

    def example(self, index: int, epoch: int = 0) -> Example:
        image_id, cats = self.entries[index]
        image = self.images[image_id]
        objects = self.objects(index)
        order = np.random.default_rng((self.seed, epoch, index)).permutation(len(objects))
        objects = [objects[k] for k in order]
        labels = [self.names[c] for c in cats]
        prompt = ptok.detect(*labels) if self.task == "detect" else ptok.segment(*labels)
        rows = [
            (o.label, o.box, self.codes(o) if self.task == "segment" else None) for o in objects
        ]
        suffix = detections_to_text(rows, image.width, image.height)
        meta = {"image_id": image_id, "objects": objects, "size": (image.width, image.height)}
        return Example(image.path, prompt, suffix, f"{self.name} image {image_id}", meta)

    def mask(self, obj: CocoObject) -> np.ndarray:
        """The object's mask from its polygons or RLE: bool [height, width] of its image."""
        image = self.images[obj.image_id]
        if obj.segmentation is None:
            raise DataError(f"{self.name}: annotation {obj.annotation_id} has no 'segmentation'")
        return _decode_segmentation(obj.segmentation, image.height, image.width)

    def codes(self, obj: CocoObject) -> tuple[int, ...]:
        """The 16 VQ-VAE codes of the object's mask in its box (cached per annotation)."""
        if obj.annotation_id not in self._codes:
            self._codes[obj.annotation_id] = _seg_codes(self.vae, self.mask(obj), obj.box)
        return self._codes[obj.annotation_id]


def _read_coco(annotations) -> tuple[Mapping, str]:
    if isinstance(annotations, Mapping):
        return annotations, "<dict>"
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations file not found: {path}")
    try:
        return json.loads(path.read_text("utf-8")), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _coco_list(coco: Mapping, key: str, name: str) -> list:
    value = coco.get(key) if isinstance(coco, Mapping) else None
    if not isinstance(value, list):
        raise DataError(
            f"{name}: no list {key!r}: a COCO instances file has 'images', 'annotations' "
            "and 'categories'"
        )
    return value


def _coco_fields(item, keys: Sequence[str], where: str) -> None:
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [k for k in keys if k not in item]
    if missing:
        raise DataError(f"{where}: missing {', '.join(map(repr, missing))}")


def _coco_categories(coco, name: str, keep: Sequence[str] | None) -> dict[int, str]:
    names = {}
    for i, cat in enumerate(_coco_list(coco, "categories", name)):
        _coco_fields(cat, ("id", "name"), f"{name}: categories[{i}]")
        names[cat["id"]] = str(cat["name"])
    if keep is not None:
        keep = set(keep)
        unknown = sorted(keep - set(names.values()))
        if unknown:
            raise ValueError(
                f"{name}: unknown categories {unknown}; it has {sorted(names.values())}"
            )
        names = {k: v for k, v in names.items() if v in keep}
    return names


def _coco_images(coco, name: str, image_dir: Path) -> dict[int, _CocoImage]:
    images = {}
    for i, img in enumerate(_coco_list(coco, "images", name)):
        _coco_fields(img, ("id", "file_name", "width", "height"), f"{name}: images[{i}]")
        path = Path(img["file_name"])
        path = path if path.is_absolute() else image_dir / path
        images[img["id"]] = _CocoImage(img["id"], str(path), int(img["width"]), int(img["height"]))
    return images


def _coco_objects(coco, name, images, names, need_masks, include_crowd):
    """image id -> its kept CocoObjects, in annotation order."""
    by_image: dict[int, list[CocoObject]] = {}
    all_ids = {c["id"] for c in coco["categories"]}
    for i, ann in enumerate(_coco_list(coco, "annotations", name)):
        where = (
            f"{name}: annotations[{i}] (id {ann.get('id') if isinstance(ann, Mapping) else '?'})"
        )
        _coco_fields(ann, ("id", "image_id", "category_id", "bbox"), where)
        if ann["image_id"] not in images:
            raise DataError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in all_ids:
            raise DataError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if need_masks and not isinstance(ann.get("segmentation"), (list, Mapping)):
            raise DataError(
                f"{where}: no 'segmentation' polygons or RLE (task='segment' needs masks)"
            )
        if ann["category_id"] not in names or (ann.get("iscrowd") and not include_crowd):
            continue
        box = _coco_box(ann["bbox"], images[ann["image_id"]], where)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        label, segmentation = names[ann["category_id"]], ann.get("segmentation")
        obj = CocoObject(label, box, ann["id"], ann["category_id"], ann["image_id"], segmentation)
        by_image.setdefault(ann["image_id"], []).append(obj)
    return by_image


def _coco_box(bbox, image: _CocoImage, where: str) -> tuple[float, float, float, float]:
    """[x, y, w, h] -> (x0, y0, x1, y1) clipped to the image."""
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4
    if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise DataError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {bbox!r:.60}")
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), image.width), min(max(y, 0.0), image.height)
    return x0, y0, min(x + w, image.width), min(y + h, image.height)


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygons, uncompressed or compressed RLE -> bool [height, width]."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def _seg_codes(vae, mask: np.ndarray, box) -> tuple[int, ...]:
    """16 codes of ``mask`` [H, W] in ``box`` (x0, y0, x1, y1): the VAE encoder, or a function."""
    if callable(vae):
        return tuple(int(c) for c in vae(mask, box))
    from pali_kit.segmentation import mask_to_codes  # JAX loads here, not on import

    return mask_to_codes(vae, mask, box)


# ============================================================================ synthetic shapes

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 40),
}
SHAPE_TASKS = ("caption", "count", "color", "detect", "detect_all", "segment", "where")
WHERE_MARGIN = (
    1 / 16
)  # "where" asks about objects whose centre is this far (x size) from the middle


@dataclasses.dataclass(frozen=True, eq=False)
class Shape:
    """One drawn shape, the ground truth of a scene.

    Attributes:
      label: "circle", "square" or "triangle".
      colour: "red", "green", "blue" or "yellow" (RGB in ``COLOURS``).
      box: (x0, y0, x1, y1) integer pixels, x1/y1 exclusive, tight around the mask.
      mask: bool [S, S], True on the shape's pixels (exactly the pixels drawn).
    """

    label: str
    colour: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    """A synthetic image and its objects. ``image``: uint8 [S, S, 3]."""

    image: np.ndarray = dataclasses.field(repr=False)
    objects: tuple[Shape, ...]
    background: tuple[int, int, int]

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def caption(self) -> str:
        """``"a red circle, a blue square and a green triangle"``, objects left to right."""
        parts = [f"a {o.colour} {o.label}" for o in sorted(self.objects, key=lambda o: o.box)]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@functools.lru_cache(maxsize=4096)
def _local_mask(label: str, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """bool [side, side] mask of a shape filling a side x side square, and its tight box.

    A pixel belongs to the shape when its centre does: the circle is inscribed,
    the triangle has its apex at the top centre and its base on the bottom edge.
    """
    c = np.arange(side) + 0.5
    y, x = c[:, None], c[None, :]
    half = side / 2
    if label == "circle":
        mask = (x - half) ** 2 + (y - half) ** 2 <= half**2
    elif label == "square":
        mask = np.ones((side, side), bool)
    else:
        mask = 2 * np.abs(x - half) <= y
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    mask.setflags(write=False)
    return mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _place(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int, int]]:
    """Up to n squares (x, y, side), side 20-45 % of the image, 1 px apart."""
    low = max(3, round(0.2 * size))
    high = max(low, round(0.45 * size))
    placed: list[tuple[int, int, int]] = []
    for _ in range(n):
        for _attempt in range(100):
            side = int(rng.integers(low, high + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if all(_apart((x, y, side), other) for other in placed):
                placed.append((x, y, side))
                break
    return placed


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Squares (x, y, side) a and b leave at least one pixel between them."""
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax > bx + bside or bx > ax + aside or ay > by + bside or by > ay + aside


def make_scene(
    seed: int, index: int, size: int = 64, *, min_shapes: int = 1, max_shapes: int = 3
) -> Scene:
    """Draw scene ``index`` of generator ``seed``: exactly reproducible from (seed, index, size).

    1-3 shapes of distinct kinds (so "the circle" is always one object), each in
    one of the four colours, side 20-45 % of the image, not touching, on a plain
    light-grey background. No antialiasing: every pixel is the background or
    exactly one shape colour, and ``Shape.mask`` marks the shape's pixels.
    """
    if not 1 <= min_shapes <= max_shapes <= len(SHAPES):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 3, got {min_shapes}, {max_shapes}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng((seed, index))
    n = int(rng.integers(min_shapes, max_shapes + 1))
    labels = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:n]]
    colours = [list(COLOURS)[k] for k in rng.integers(0, len(COLOURS), n)]
    grey = int(rng.integers(200, 246))
    image = np.full((size, size, 3), grey, np.uint8)
    objects = []
    for label, colour, (x, y, side) in zip(labels, colours, _place(rng, n, size)):
        local, (bx0, by0, bx1, by1) = _local_mask(label, side)
        mask = np.zeros((size, size), bool)
        mask[y : y + side, x : x + side] = local
        image[mask] = COLOURS[colour]
        objects.append(Shape(label, colour, (x + bx0, y + by0, x + bx1, y + by1), mask))
    return Scene(image, tuple(objects), (grey, grey, grey))


def shape_task(
    task: str, scene: Scene, rng: np.random.Generator, codes: Callable | None = None
) -> tuple[str, str, tuple[Shape, ...]]:
    """One question about a scene -> (prefix, suffix, the objects the answer is about).

      caption      caption en                       a red circle and a blue square
      count        answer en how many shapes        2
      color        answer en what color is the circle  red
      detect       detect circle                    <loc..>x4 circle
      detect_all   detect square ; circle           <loc..>x4 square ; <loc..>x4 circle
      segment      segment circle                   <loc..>x4<seg..>x16 circle
      where        answer en where is the circle    top left

    ``where`` is not in the demo model's training mix (chapter 3 teaches it):
    the quadrant of the object's box centre, asked about an object that is
    clearly in one (``clear_quadrant``) when the scene has one. ``rng`` picks the object asked about (and the order for ``detect_all``;
    answers follow the prompt's order). ``codes(shape) -> 16 ints`` is needed
    for ``segment``.
    """
    objects, size = scene.objects, scene.size
    if task == "caption":
        return ptok.caption("en"), scene.caption(), objects
    if task == "count":
        return ptok.answer("how many shapes"), str(len(objects)), objects
    if task in ("color", "detect", "segment"):
        obj = objects[int(rng.integers(len(objects)))]
        if task == "color":
            return ptok.answer(f"what color is the {obj.label}"), obj.colour, (obj,)
        if task == "detect":
            return (
                ptok.detect(obj.label),
                detections_to_text([(obj.label, obj.box)], size, size),
                (obj,),
            )
        if codes is None:
            raise ValueError("the 'segment' task needs seg codes: pass a VAE")
        suffix = detections_to_text([(obj.label, obj.box, codes(obj))], size, size)
        return ptok.segment(obj.label), suffix, (obj,)
    if task == "where":
        clear = [o for o in objects if clear_quadrant(o.box, size)] or list(objects)
        obj = clear[int(rng.integers(len(clear)))]
        return ptok.answer(f"where is the {obj.label}"), quadrant(obj.box, size), (obj,)
    if task == "detect_all":
        chosen = tuple(objects[k] for k in rng.permutation(len(objects)))
        suffix = detections_to_text([(o.label, o.box) for o in chosen], size, size)
        return ptok.detect(*[o.label for o in chosen]), suffix, chosen
    raise ValueError(f"unknown task {task!r}: use one of {SHAPE_TASKS}")


def quadrant(box, size: int) -> str:
    """``"top left"``, ``"top right"``, ``"bottom left"`` or ``"bottom right"``: where the
    centre of ``box`` (x0, y0, x1, y1 pixels) lies in a ``size`` x ``size`` image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return ("top" if cy < size / 2 else "bottom") + " " + ("left" if cx < size / 2 else "right")


def clear_quadrant(box, size: int, margin: float = WHERE_MARGIN) -> bool:
    """The centre of ``box`` is at least ``margin * size`` pixels from both middle lines."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(abs(cx - size / 2), abs(cy - size / 2)) >= margin * size


class ShapesDataset(Dataset):
    """Synthetic shapes, the demo domain: ``num_images`` scenes x ``tasks`` examples.

    Example ``i`` asks task ``tasks[i % len(tasks)]`` about scene
    ``i // len(tasks)`` (``make_scene(seed, i // len(tasks), size)``); repeat a
    task in ``tasks`` to weight it. Which object a question is about is drawn
    from (seed, scene, task slot, epoch): another one in each epoch.
    Use another ``seed`` for a held-out split.

    Args:
      num_images: number of scenes.
      size: image side in pixels (64 for the demo model, 224 for PaliGemma).
      seed: generator seed.
      tasks: names from ``SHAPE_TASKS`` (see ``shape_task``).
      vae: for ``segment``: a ``MaskVAE`` or a function ``(mask, box) -> 16 codes``;
        codes are computed once per object.
      min_shapes, max_shapes: objects per scene (1 to 3).

    ``Example.meta`` holds ``task``, ``scene`` (the Scene, with every object's
    mask and box) and ``objects`` (the ones the answer is about).
    """

    def __init__(
        self,
        num_images: int = 1000,
        *,
        size: int = 64,
        seed: int = 0,
        tasks: Sequence[str] = ("caption", "count", "color", "detect"),
        vae=None,
        min_shapes: int = 1,
        max_shapes: int = 3,
    ):
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        unknown = [t for t in tasks if t not in SHAPE_TASKS]
        if not tasks or unknown:
            raise ValueError(f"unknown tasks {unknown or tasks}: use names from {SHAPE_TASKS}")
        if "segment" in tasks and vae is None:
            raise ValueError("the 'segment' task needs vae=pali_kit.load_vae(...) for mask codes")
        self.num_images, self.size, self.seed, self.tasks = num_images, size, seed, tasks
        self.vae, self.min_shapes, self.max_shapes = vae, min_shapes, max_shapes
        self._codes: dict[tuple[int, int], tuple[int, ...]] = {}
        make_scene(seed, 0, size, min_shapes=min_shapes, max_shapes=max_shapes)  # checks args

    def __repr__(self) -> str:
        return (
            f"ShapesDataset({self.num_images} images x {len(self.tasks)} tasks, "
            f"size={self.size}, seed={self.seed})"
        )

    def __len__(self) -> int:
        return self.num_images * len(self.tasks)

    def scene(self, image_index: int) -> Scene:
        """Scene ``image_index`` (drawn anew each call: it is cheap and exact)."""
        return make_scene(
            self.seed,
            image_index,
            self.size,
            min_shapes=self.min_shapes,
            max_shapes=self.max_shapes,
        )

    def example(self, index: int, epoch: int = 0) -> Example:
        image_index, slot = divmod(index, len(self.tasks))
        scene, task = self.scene(image_index), self.tasks[slot]
        rng = np.random.default_rng((self.seed, image_index, slot, epoch))
        codes = functools.partial(self._shape_codes, image_index, scene)
        prefix, suffix, objects = shape_task(task, scene, rng, codes)
        meta = {"task": task, "scene": scene, "objects": objects, "image_index": image_index}
        return Example(
            scene.image, prefix, suffix, f"shapes seed {self.seed} image {image_index}", meta
        )

    def _shape_codes(self, image_index: int, scene: Scene, obj: Shape) -> tuple[int, ...]:
        key = (image_index, scene.objects.index(obj))
        if key not in self._codes:
            self._codes[key] = _seg_codes(self.vae, obj.mask, obj.box)
        return self._codes[key]


def score_shapes(
    model,
    n: int = 100,
    *,
    seed: int = 12345,
    tasks: Sequence[str] = ("caption", "count", "color", "detect"),
    vae=None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> dict[str, float]:
    """How well a model knows the shapes world: greedy answers on ``n`` scenes per task.

    Scenes come from ``ShapesDataset(seed=seed)`` at the model's resolution
    (the demo model trained on seed 0; 12345 is held out). Scores per task:
    caption / count / color: exact match; detect: the first box has the right
    label and IoU >= 0.5 with the object asked about; segment (needs ``vae``):
    the decoded mask's IoU >= 0.5 with the drawn shape.
    Returns ``{task: fraction}``.
    """
    size = model.resolution
    scores = {}
    for task in tasks:
        ds = ShapesDataset(n, size=size, seed=seed, tasks=[task], vae=vae)
        hits = []
        for start in range(0, n, batch_size):
            chunk = [ds[i] for i in range(start, min(start + batch_size, n))]
            outs = model.generate([e.image for e in chunk], [e.prefix for e in chunk],
                                  max_new_tokens=max_new_tokens)  # fmt: skip
            for ex, out in zip(chunk, outs):
                hits.append(_shape_hit(task, out.text, ex, size, vae))
        scores[task] = float(np.mean(hits))
    return scores


def _shape_hit(task: str, text: str, ex: Example, size: int, vae) -> bool:
    """Is one answer right? (the rules of ``score_shapes``)"""
    if task not in ("detect", "segment"):
        return text.strip() == ex.suffix
    want = ex.meta["objects"][0]
    got = parse_detections(text, size, size)
    if not got or got[0].label != want.label:
        return False
    if task == "detect":
        return float(metrics.box_iou(np.array(got[0].box), np.array(want.box))) >= 0.5
    from pali_kit.segmentation import with_masks

    [det] = with_masks(got[:1], vae, size, size)
    return (
        det.binary_mask is not None and float(metrics.mask_iou(det.binary_mask, want.mask)) >= 0.5
    )


def sample_ground_truth(folder=None) -> dict[str, dict]:
    """The ground truth of the sample images: ``{file name: truth}``.

    Read from ``data/images/ground_truth.json`` (written by
    ``scripts/make_sample_images.py``), or from ``folder``. A truth holds
    ``in_domain`` (bool: drawn from the demo model's world), ``size``
    [width, height], ``caption`` (str, or None), ``count`` and ``objects``
    (``label``, ``colour``, ``box`` [x0, y0, x1, y1] in pixels, x1/y1 exclusive).
    """
    folder = Path(folder) if folder is not None else ptok.data_dir() / "images"
    return json.loads((folder / "ground_truth.json").read_text("utf-8"))


def grade_answer(prompt: str, text: str, truth: Mapping) -> bool | None:
    """Is ``text`` the right answer to ``prompt`` about an image with ground truth ``truth``?

    Prompts: ``caption en`` (exact caption), ``answer en how many shapes``
    (exact count), ``answer en what color is the <label>`` (exact colour),
    ``detect <label> [; <label> ...]`` (every asked label that is in the image
    has its first box of that label at IoU >= 0.5 with the true box, the rule
    of ``score_shapes``). Returns None when the truth cannot say (another
    prompt, or no caption known).
    """
    answer = text.strip()
    objects = {o["label"]: o for o in truth["objects"]}
    if prompt == ptok.caption("en"):
        return None if truth.get("caption") is None else answer == truth["caption"]
    if prompt == ptok.answer("how many shapes"):
        return answer == str(truth["count"])
    colour_question = ptok.answer("what color is the x")[:-1]  # the prompt up to the label
    if prompt.startswith(colour_question):
        label = prompt[len(colour_question) :]
        return answer == objects[label]["colour"] if label in objects else None
    if prompt.startswith("detect "):
        width, height = truth["size"]
        found = parse_detections(answer, width, height)
        asked = [label.strip() for label in prompt[len("detect ") :].split(";")]
        present = [label for label in asked if label in objects]
        if not present:
            return None
        for label in present:
            boxes = [d.box for d in found if d.label == label]
            true_box = np.array(objects[label]["box"], np.float64)
            if not boxes or float(metrics.box_iou(np.array(boxes[0]), true_box)) < 0.5:
                return False
        return True
    return None


# ============================================================================ batches


def collate(
    examples: Sequence[Example], tokenizer, *, text_len: int, image_size: int, truncate: bool = True
) -> Batch:
    """Examples -> one training batch of numpy arrays (B = len(examples)).

    Returns:
      ``image`` float32 [B, S, S, 3] in [-1, 1]; ``text`` int32 [B, text_len + 1];
      ``mask_ar``, ``mask_loss`` int32 [B, text_len + 1]; ``mask_input`` bool
      [B, text_len + 1] (``Tokenizer.encode_examples``: longer examples are cut
      with a warning, or raise when ``truncate=False``).
    """
    images = np.stack([ex.pixels(image_size) for ex in examples])
    try:
        text = tokenizer.encode_examples(
            [ex.prefix for ex in examples],
            [ex.suffix for ex in examples],
            text_len=text_len,
            truncate=truncate,
        )
    except ValueError as error:
        raise DataError(f"{error} (examples: {_sources(examples)})") from error
    return {"image": images, **text}


def _sources(examples: Sequence[Example], limit: int = 8) -> str:
    names = [ex.source or "?" for ex in examples[:limit]]
    return ", ".join(names) + (", ..." if len(examples) > limit else "")


class Batcher:
    """Deterministic, resumable training batches over a dataset.

    Step ``k`` is batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``;
    epoch ``e`` visits the dataset in the order ``default_rng((seed, e))
    .permutation(n)`` (``shuffle=False``: 0..n-1) and asks the dataset for
    ``example(i, epoch=e)``. ``batch(step)`` depends on nothing else, so
    ``iterate(start_step=k)`` continues a run exactly where step k left it.

    Args:
      dataset: a Dataset, or a list of Example.
      tokenizer: a ``pali_kit.Tokenizer``.
      batch_size: examples per batch (B).
      text_len: the model sees ``text_len`` tokens; arrays have ``text_len + 1``.
      image_size: the model resolution S.
      seed: shuffling seed.
      epochs: stop after this many epochs; None repeats forever.
      shuffle: a new random order every epoch (default True).
      drop_remainder: skip the last, smaller batch of each epoch (default
        True: every batch has B rows, so jitted steps compile once). With
        False that batch has ``n % B`` rows.
      prefetch: batches prepared ahead on a background thread (0: none).
      start_step: the first step ``iter(batcher)`` yields.
    """

    def __init__(
        self,
        dataset: Sequence,
        tokenizer,
        *,
        batch_size: int,
        text_len: int,
        image_size: int,
        seed: int = 0,
        epochs: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = True,
        prefetch: int = 2,
        start_step: int = 0,
    ):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size = ptok._positive_int(batch_size, "batch_size")
        self.text_len, self.image_size = text_len, image_size
        self.seed, self.epochs, self.shuffle = seed, epochs, shuffle
        self.drop_remainder, self.prefetch, self.start_step = drop_remainder, prefetch, start_step
        n = len(dataset)
        if n == 0:
            raise ValueError("the dataset is empty")
        if drop_remainder and n < self.batch_size:
            raise ValueError(
                f"the dataset has {n} examples, fewer than batch_size={batch_size}: every batch "
                "would be dropped; lower batch_size or pass drop_remainder=False"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be a positive int or None, got {epochs!r}")
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (
            f"Batcher({len(self.dataset)} examples, batch_size={self.batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, seed={self.seed})"
        )

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_remainder else math.ceil(n / b)

    @property
    def num_steps(self) -> int | None:
        """Total steps for ``epochs`` epochs; None when repeating forever."""
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """int [n]: the dataset indices in the order epoch ``epoch`` visits them."""
        cached = self._order_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = len(self.dataset)
        order = (
            np.random.default_rng((self.seed, epoch)).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        self._order_cache = (epoch, order)
        return order

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, dataset indices int [B]) of batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, self.order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def examples(self, step: int) -> list[Example]:
        """The examples of batch ``step`` (to look at what the model is fed)."""
        epoch, indices = self.indices(step)
        return [get_example(self.dataset, int(i), epoch) for i in indices]

    def batch(self, step: int) -> Batch:
        """Batch ``step`` as numpy arrays (see ``collate``); a pure function of the step."""
        return collate(
            self.examples(step), self.tokenizer, text_len=self.text_len, image_size=self.image_size
        )

    def iterate(self, start_step: int | None = None) -> Prefetch:
        """Batches from ``start_step`` (default ``self.start_step``) on, prefetched.

        The iterator's ``position`` is the step of the batch ``next()`` returns next.
        """
        start = self.start_step if start_step is None else start_step
        end = self.num_steps
        steps = range(start, end) if end is not None else _count(start)
        return Prefetch((self.batch(s) for s in steps), self.prefetch, position=start)

    def __iter__(self) -> Prefetch:
        return self.iterate()


def _count(start: int) -> Iterator[int]:
    step = start
    while True:
        yield step
        step += 1


def batches(
    dataset: Sequence,
    tokenizer,
    *,
    batch_size: int,
    text_len: int,
    image_size: int,
    seed: int = 0,
    epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    prefetch: int = 2,
    start_step: int = 0,
) -> Prefetch:
    """Training batches: ``iter(Batcher(...))``; see ``Batcher`` for the arguments.

    Yields dicts: ``image`` float32 [B, S, S, 3] in [-1, 1]; ``text`` int32
    [B, text_len + 1]; ``mask_ar``, ``mask_loss`` int32 [B, text_len + 1];
    ``mask_input`` bool [B, text_len + 1].
    """
    return Batcher(
        dataset, tokenizer, batch_size=batch_size, text_len=text_len, image_size=image_size,
        seed=seed, epochs=epochs, shuffle=shuffle, drop_remainder=drop_remainder,
        prefetch=prefetch, start_step=start_step,
    ).iterate()  # fmt: skip


def eval_batches(
    dataset: Sequence,
    tokenizer,
    *,
    batch_size: int,
    image_size: int,
    text_len: int | None = None,
    truncate: bool = False,
    prefetch: int = 2,
    epoch: int = 0,
) -> Prefetch:
    """Prompt-only batches over the whole dataset, once, in order; answers kept aside.

    Yields ``(batch, examples)``. ``batch``: ``image`` float32 [B, S, S, 3],
    ``text``/``mask_ar`` int32 [B, T], ``mask_input`` bool [B, T]
    (``Tokenizer.encode_prompts``: T = ``text_len``, or the longest prompt of the
    batch rounded up to 16 when None) and ``_mask`` bool [B], False on padding.
    The last batch is padded to B rows with copies of its last example, so
    shapes stay fixed. ``examples``: the real examples of the batch (rows
    ``0..len(examples)-1``); ``examples[i].suffix`` is row i's reference answer.
    """
    batch_size = ptok._positive_int(batch_size, "batch_size")

    def generate():
        n = len(dataset)
        for start in range(0, n, batch_size):
            examples = [
                get_example(dataset, i, epoch) for i in range(start, min(start + batch_size, n))
            ]
            yield (
                _prompt_batch(examples, tokenizer, batch_size, image_size, text_len, truncate),
                examples,
            )

    return Prefetch(generate(), prefetch)


def _prompt_batch(examples, tokenizer, batch_size, image_size, text_len, truncate) -> Batch:
    pad = batch_size - len(examples)
    images = np.stack([ex.pixels(image_size) for ex in examples])
    prompts = [ex.prefix for ex in examples] + [examples[-1].prefix] * pad
    text = tokenizer.encode_prompts(prompts, text_len=text_len, truncate=truncate)
    return {
        "image": np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]),
        **text,
        "_mask": np.arange(batch_size) < len(examples),
    }


# ============================================================================ prefetch

_END = object()


def _produce(items: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Worker thread: put (True, item)..., then (False, _END) or (False, exception)."""

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put((True, item)):
                return
        put((False, _END))
    except BaseException as error:  # re-raised in the consumer
        put((False, error))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


class Prefetch(Iterator):
    """Iterate ``items`` on a background thread, up to ``size`` items ahead.

    An exception in the thread is raised again by ``next()`` (same type and
    message). ``close()`` (also on ``with`` exit, on garbage collection, and
    once the items run out) stops the thread. ``size=0`` iterates in the
    caller's thread. ``position`` counts the items returned, from ``position``.
    """

    def __init__(self, items: Iterable, size: int = 2, *, position: int = 0):
        self.position = position
        self._items = iter(items)
        self._closed = False
        self._thread = None
        if size > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=size)
            self._stop = threading.Event()
            # The thread must not hold a reference to self, so that dropping the
            # iterator (a `break` out of a for loop) closes it and ends the thread.
            self._thread = threading.Thread(
                target=_produce,
                args=(self._items, self._queue, self._stop),
                name="pali_kit-prefetch",
                daemon=True,
            )
            self._thread.start()

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self._thread is None:
            try:
                item = next(self._items)
            except BaseException:
                self.close()
                raise
        else:
            ok, item = self._get()
            if not ok:
                self.close()
                if item is _END:
                    raise StopIteration
                raise item
        self.position += 1
        return item

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return False, RuntimeError("the prefetch thread stopped without a result")

    def close(self) -> None:
        """Stop the background thread (waits up to 5 s for a batch in progress)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
