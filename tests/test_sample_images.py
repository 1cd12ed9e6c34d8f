"""The sample images in data/images: the demo model answers the in-domain ones correctly.

They are the first pictures a user sees (``pali-kit demo``, chapter 1, the
prompt panel), drawn by ``scripts/make_sample_images.py`` with their ground
truth in ``ground_truth.json``.
"""

from __future__ import annotations

import pytest

import pali_kit as pk
from pali_kit import data
from pali_kit.cli import _demo_prompts
from pali_kit.detection import detections_to_text

IMAGES = pk.asset_dir() / "images"


@pytest.fixture(scope="module")
def truths():
    return data.sample_ground_truth()


def test_ground_truth_matches_the_files(truths):
    assert sorted(truths) == sorted(p.name for p in IMAGES.glob("shapes_*"))
    assert sum(not t["in_domain"] for t in truths.values()) == 1, "one out-of-domain lesson"
    for name, truth in truths.items():
        height, width = pk.images.load_image(IMAGES / name).shape[:2]
        assert truth["size"] == [width, height], name
        assert truth["count"] == len(truth["objects"])
        for obj in truth["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (name, obj)


def test_grade_answer_tells_right_from_wrong(truths):
    truth = truths["shapes_0.png"]
    first, second = truth["objects"][:2]
    w, h = truth["size"]
    assert data.grade_answer("caption en", f" {truth['caption']} ", truth) is True
    assert data.grade_answer("caption en", "a cat", truth) is False
    assert data.grade_answer("answer en how many shapes", str(truth["count"]), truth) is True
    assert data.grade_answer("answer en how many shapes", str(truth["count"] + 1), truth) is False
    ask = f"answer en what color is the {first['label']}"
    assert data.grade_answer(ask, first["colour"], truth) is True
    assert data.grade_answer(ask, "purple", truth) is False
    right = detections_to_text([(first["label"], first["box"])], w, h)
    swapped = detections_to_text([(first["label"], second["box"])], w, h)
    assert data.grade_answer(f"detect {first['label']}", right, truth) is True
    assert data.grade_answer(f"detect {first['label']}", swapped, truth) is False
    assert data.grade_answer(f"detect {first['label']}", "", truth) is False
    assert data.grade_answer("ocr", "anything", truth) is None


@pytest.mark.slow
def test_demo_model_answers_the_in_domain_sample_images_correctly(truths):
    model = pk.load("demo", verbose=False)
    wrong = []
    for name, truth in truths.items():
        if not truth["in_domain"]:
            continue
        prompts = _demo_prompts(truth)
        for out in model.generate(IMAGES / name, prompts, max_new_tokens=24):
            if data.grade_answer(out.prompt, out.text, truth) is not True:
                wrong.append(f"{name}: {out.prompt!r} -> {out.text!r}")
    assert not wrong, "\n".join(wrong)
