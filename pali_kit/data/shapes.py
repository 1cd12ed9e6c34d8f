"""The synthetic shapes world, the demo model's domain: scenes, their questions, a dataset.

``make_scene(seed, index, size)`` draws 1-3 coloured shapes, exactly reproducible;
``shape_task`` asks one question about a scene; ``ShapesDataset`` is scenes x tasks.
``sample_ground_truth`` reads the truth of the sample images in ``data/images``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .. import tokenizer as ptok
from ..assets import asset_dir
from ..detection import detections_to_text
from .examples import Dataset, Example, encode_mask

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


def _place_squares(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int, int]]:
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
    for label, colour, (x, y, side) in zip(labels, colours, _place_squares(rng, n, size)):
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
            self._codes[key] = encode_mask(self.vae, obj.mask, obj.box)
        return self._codes[key]


def sample_ground_truth(folder=None) -> dict[str, dict]:
    """The ground truth of the sample images: ``{file name: truth}``.

    Read from ``data/images/ground_truth.json`` (written by
    ``scripts/make_sample_images.py``), or from ``folder``. A truth holds
    ``in_domain`` (bool: drawn from the demo model's world), ``size``
    [width, height], ``caption`` (str, or None), ``count`` and ``objects``
    (``label``, ``colour``, ``box`` [x0, y0, x1, y1] in pixels, x1/y1 exclusive).
    """
    folder = Path(folder) if folder is not None else asset_dir() / "images"
    return json.loads((folder / "ground_truth.json").read_text("utf-8"))
