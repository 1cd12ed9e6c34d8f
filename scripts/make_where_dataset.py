"""Write chapter 3's dataset in data/where_dataset/, deterministically.

Builds: ``data/where_dataset/`` (``train.jsonl``, ``val.jsonl``, the PNG images,
``README.md``). Takes a few seconds. Deterministic: scene seeds 31 (train) and 32
(val), per-image ``default_rng((seed, index))``; rerunning rewrites the same
bytes (``git status data/`` stays clean).

    python scripts/make_where_dataset.py

A skill the demo model does not have: ``answer en where is the <shape>`` ->
``top left`` / ``top right`` / ``bottom left`` / ``bottom right`` (the quadrant
of the shape's centre, ``pali_kit.data.quadrant``). The demo model never saw
this question nor these answer words. Scenes come from
``pali_kit.data.make_scene`` at 64 px (the demo model's resolution), from seeds
the demo model never trained on: train seed 31, held-out (val) seed 32. Every
shape whose centre is clearly in one quadrant (``clear_quadrant``: at least
1/16 of the side from both middle lines) gets one line. Rerunning gives the
same files.

A model fine-tuned on the new question alone forgets its old ones (it answers
"top left" to everything), so ``train.jsonl`` also rehearses them: one line per
image asks ``color`` or ``count`` (``pali_kit.data.shape_task``). Every line
has a ``task`` key; ``val.jsonl`` holds only the new question.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pali_kit import tokenizer as ptok
from pali_kit.atomic import atomic_write, write_text
from pali_kit.data import clear_quadrant, make_scene, quadrant, shape_task

OUT = Path(__file__).resolve().parents[1] / "data" / "where_dataset"
SIZE = 64
SPLITS = {"train": (31, 360), "val": (32, 48)}  # split: (seed, number of images)

README = """# Chapter 3's dataset: a new skill

Written by `scripts/make_where_dataset.py` (deterministic; rerun it to remake the
files). The question `answer en where is the <shape>` and its answers `top left`,
`top right`, `bottom left`, `bottom right` (the quadrant of the shape's centre)
are new to the demo model: it never saw them in training.

- `images/train_NNN.png`, `images/val_NN.png`: {size} px scenes from
  `pali_kit.data.make_scene(seed, NNN, {size})`, seed {train_seed} (train) and
  {val_seed} (val, held out).
- `train.jsonl`: {n_train} lines about {i_train} images; `val.jsonl`: {n_val} lines
  about {i_val} images. One line per shape clearly inside a quadrant (key `task`:
  `where`), and in `train.jsonl` one more line per image that rehearses an old
  skill (`color` or `count`), so that the model does not forget it:

      {example}
      {rehearsal}
"""


def rows(name: str, seed: int, count: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The jsonl rows of a split and its images {relative path: uint8 [SIZE, SIZE, 3]}."""
    lines, images = [], {}
    for index in range(count):
        scene = make_scene(seed, index, SIZE)
        image = f"images/{name}_{index:03d}.png"
        images[image] = scene.image
        for obj in scene.objects:
            if clear_quadrant(obj.box, SIZE):
                prefix = ptok.answer(f"where is the {obj.label}")
                suffix = quadrant(obj.box, SIZE)
                lines.append({"image": image, "prefix": prefix, "suffix": suffix, "task": "where"})
        if name == "train":  # rehearse an old skill
            rng = np.random.default_rng((seed, index))
            task = ("color", "count")[index % 2]
            prefix, suffix, _ = shape_task(task, scene, rng)
            lines.append({"image": image, "prefix": prefix, "suffix": suffix, "task": task})
    return lines, images


def split(name: str, seed: int, count: int) -> list[dict]:
    lines, images = rows(name, seed, count)
    for path, pixels in images.items():
        with atomic_write(OUT / path) as f:
            Image.fromarray(pixels).save(f, format="PNG", optimize=True)
    write_text(OUT / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    return lines


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    rows = {name: split(name, seed, count) for name, (seed, count) in SPLITS.items()}
    readme = README.format(
        size=SIZE, train_seed=SPLITS["train"][0], val_seed=SPLITS["val"][0],
        n_train=len(rows["train"]), i_train=SPLITS["train"][1],
        n_val=len(rows["val"]), i_val=SPLITS["val"][1], example=json.dumps(rows["train"][0]), rehearsal=json.dumps(rows["train"][-1]),
    )  # fmt: skip
    write_text(OUT / "README.md", readme)
    for name, lines in rows.items():
        answers = sorted({r["suffix"] for r in lines if r["task"] == "where"})
        counts = {a: sum(r["suffix"] == a for r in lines) for a in answers}
        counts["rehearsal"] = sum(r["task"] != "where" for r in lines)
        print(f"{name}: {len(lines)} lines, answers {counts}")


if __name__ == "__main__":
    main()
