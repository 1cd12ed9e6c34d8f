"""COCO instances annotations -> ``detect`` / ``segment`` examples (``CocoDataset``).

Segment targets run the mask VQ-VAE's encoder (``encode_mask``), once per annotation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import tokenizer as ptok
from ..detection import detections_to_text
from .examples import DataError, Dataset, Example, encode_mask


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
            self._codes[obj.annotation_id] = encode_mask(self.vae, self.mask(obj), obj.box)
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
