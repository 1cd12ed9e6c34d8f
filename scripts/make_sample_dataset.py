"""Write the sample jsonl dataset in data/sample_dataset/, deterministically.

Builds: ``data/sample_dataset/`` (``train.jsonl``, ``val.jsonl``, 24 PNG images,
``README.md``). Takes about 1 s. Deterministic: fixed scene seed, no clock;
rerunning rewrites the same bytes (``git status data/`` stays clean).

    python scripts/make_sample_dataset.py [--out data/sample_dataset]

24 synthetic shapes images (64, 80 or 96 px PNG) drawn by
``pali_kit.data.make_scene``; ``train.jsonl`` (images 0-19) and ``val.jsonl``
(images 20-23) in the reference format, one line per (image, task):
caption, "how many shapes", "what color is the <shape>" and "detect <shape>".
Each line carries an extra key ``task``. Rerunning gives the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pali_kit.atomic import atomic_write, write_text
from pali_kit.data import make_scene, shape_task

OUT = Path(__file__).resolve().parents[1] / "data" / "sample_dataset"
SEED = 2024
NUM_IMAGES, NUM_TRAIN = 24, 20
SIZES = (64, 80, 96)
TASKS = ("caption", "count", "color", "detect")

README = """# Sample dataset

A tiny jsonl dataset in the reference format, written by
`scripts/make_sample_dataset.py` (deterministic; rerun it to remake the files).

- `images/shapes_NN.png`: {n} synthetic shapes images (64, 80 or 96 px), from
  `pali_kit.data.make_scene({seed}, NN, size)`.
- `train.jsonl`: images 00-{last_train:02d}; `val.jsonl`: images {first_val:02d}-{last:02d}.
  One line per (image, task), tasks {tasks}:

      {example}

  Image paths are relative to this folder; `task` is an extra key (kept in
  `Example.meta`). Boxes in `detect` answers are `<loc>` bins of 1/1024 of the
  image side, y first.

    from pali_kit import data as pdata
    train = pdata.JsonlDataset("data/sample_dataset/train.jsonl").validate()
"""


def lines_for(index: int, size: int) -> tuple[Image.Image, list[dict]]:
    scene = make_scene(SEED, index, size)
    rows = []
    for k, task in enumerate(TASKS):
        rng = np.random.default_rng((SEED, index, k))
        prefix, suffix, _ = shape_task(task, scene, rng)
        image = f"images/shapes_{index:02d}.png"
        rows.append({"image": image, "prefix": prefix, "suffix": suffix, "task": task})
    return Image.fromarray(scene.image), rows


def write(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for index in range(NUM_IMAGES):
        image, rows = lines_for(index, SIZES[index % len(SIZES)])
        # An adaptive palette keeps the exact colours (a scene has at most 4) in tiny files.
        with atomic_write(out / "images" / f"shapes_{index:02d}.png") as f:
            image.quantize(colors=8, method=Image.Quantize.MAXCOVERAGE).save(
                f, format="PNG", optimize=True
            )
        splits["train" if index < NUM_TRAIN else "val"].extend(rows)
    for name, rows in splits.items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        write_text(out / f"{name}.jsonl", text)
    write_text(
        out / "README.md",
        README.format(
            n=NUM_IMAGES,
            seed=SEED,
            last_train=NUM_TRAIN - 1,
            first_val=NUM_TRAIN,
            last=NUM_IMAGES - 1,
            tasks=", ".join(TASKS),
            example=json.dumps(splits["train"][0]),
        ),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args(argv)
    write(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({total / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
