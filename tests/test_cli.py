"""The ``pali-kit`` command: the main job (``make demo``) and its helpers."""

from __future__ import annotations

import re

import numpy as np
import PIL.Image

from pali_kit import cli
from pali_kit.tokenizer import data_dir


def test_demo_answers_draws_and_scores(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    images = sorted((data_dir() / "images").glob("shapes_*"))
    for path in images:
        assert path.name in out
        drawn = PIL.Image.open(tmp_path / f"{path.stem}_demo.png")
        assert drawn.height > PIL.Image.open(path).height  # the caption strip is added
    assert out.count("answer en how many shapes") == len(images)
    scene = np.asarray(PIL.Image.open(tmp_path / "scene_segmentation.png"))
    assert scene.shape == (256, 256, 3)
    scores = dict(re.findall(r"(caption|count|color|detect|segment) (\d+)%", out))
    assert set(scores) == {"caption", "count", "color", "detect", "segment"}
    assert int(scores["count"]) >= 50  # the trained demo model, in its own world


def test_generate_prints_the_answer(capsys):
    image = str(data_dir() / "images" / "shapes_0.png")
    assert cli.main(["generate", image, "answer en how many shapes", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().split("\n")[-1].strip().isdigit()


def test_info_lists_the_registry(capsys):
    assert cli.main(["info", "paligemma2-3b-pt-224"]) == 0
    out = capsys.readouterr().out
    assert "paligemma2-3b-pt-224" in out and "3,032,094,960 params" in out


def test_bad_image_is_a_clear_error(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert cli.main(["generate", str(broken), "caption en"]) == 2
    err = capsys.readouterr().err
    assert "pali-kit: error:" in err and "broken.png" in err
