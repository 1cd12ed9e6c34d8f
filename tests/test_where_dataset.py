"""Chapter 3's new skill: the ``where`` question of the shapes world and its shipped dataset."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from pali_kit import data
from pali_kit import tokenizer as ptok
from pali_kit.assets import asset_dir
from pali_kit.images import load_image

FOLDER = asset_dir() / "where_dataset"


def load_script():
    path = asset_dir().parent / "scripts" / "make_where_dataset.py"
    spec = importlib.util.spec_from_file_location("make_where_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((0, 0, 10, 10), "top left"),
        ((50, 2, 60, 12), "top right"),
        ((2, 40, 20, 60), "bottom left"),
        ((40, 40, 64, 64), "bottom right"),
        ((20, 20, 45, 45), "bottom right"),  # centre (32.5, 32.5): just past the middle
    ],
)
def test_quadrant_is_where_the_box_centre_lies(box, expected):
    assert data.quadrant(box, 64) == expected


def test_clear_quadrant_needs_the_centre_away_from_both_middle_lines():
    assert data.clear_quadrant((0, 0, 10, 10), 64)  # centre (5, 5)
    assert not data.clear_quadrant((28, 0, 38, 10), 64)  # centre x = 33: 1 px from the middle
    assert not data.clear_quadrant((0, 26, 10, 36), 64)  # centre y = 31


def test_where_task_asks_about_a_clearly_placed_object():
    ds = data.ShapesDataset(40, size=64, seed=3, tasks=["where"])
    for i in range(len(ds)):
        ex = ds[i]
        [obj] = ex.meta["objects"]
        assert ex.prefix == ptok.answer(f"where is the {obj.label}")
        assert ex.suffix == data.quadrant(obj.box, 64)
        clear = [o for o in ex.meta["scene"].objects if data.clear_quadrant(o.box, 64)]
        assert obj in clear or not clear


def test_shipped_dataset_is_what_the_script_writes():
    script = load_script()
    for name, (seed, count) in script.SPLITS.items():
        lines, images = script.rows(name, seed, count)
        shipped = [json.loads(ln) for ln in (FOLDER / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == lines, f"{name}.jsonl: rerun scripts/make_where_dataset.py"
        for path in list(images)[:: max(1, len(images) // 10)]:  # a sample of the images
            np.testing.assert_array_equal(load_image(FOLDER / path), images[path])


def test_validation_scenes_are_held_out_and_every_answer_is_a_quadrant():
    script = load_script()
    seeds = {seed for seed, _ in script.SPLITS.values()}
    assert len(seeds) == 2 and 0 not in seeds, "not the demo model's training seed (0)"
    val = data.JsonlDataset(FOLDER / "val.jsonl")
    assert {ex.suffix for ex in val} == {"top left", "top right", "bottom left", "bottom right"}
    assert all(ex.meta["task"] == "where" for ex in val)
