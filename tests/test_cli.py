"""The ``pali-kit`` command: the main job (``make demo``) and its helpers."""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest

from pali_kit import cli
from pali_kit.assets import asset_dir as data_dir


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


def test_only_the_answer_goes_to_stdout(capsys):
    image = str(data_dir() / "images" / "shapes_0.png")
    assert cli.main(["generate", image, "caption en", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1  # the answer, nothing else
    assert "pali_kit: pali_kit demo" in captured.err  # the status line


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        (["info", "nonexistent"], 2, ["unknown checkpoint 'nonexistent'"]),
        (["info", "paligemma2-3b-pt-244"], 2, ["did you mean 'paligemma2-3b-pt-224'"]),
        (["generate", "x.png", "y", "--model", "paligemma2-3b-pt-244"], 2, ["did you mean"]),
        (["generate", "x.png", "y", "--seed", "abc"], 2, ["--seed", "'abc'"]),
        (["nonsense"], 2, ["invalid choice: 'nonsense'"]),
        (["generate", "nothere.png", "caption en"], 2, ["nothere.png"]),
        (["generate", "x.png", "y", "--model", "nothere.npz"], 1, ["nothere.npz"]),
    ],
)
def test_failures_are_one_line_on_stderr_with_a_status(argv, status, words, capsys):
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("pali_kit: ")]
    assert len(lines) == 1 and lines[0].startswith("pali-kit: error: "), captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_export_hf_refuses_a_file_and_a_foreign_folder(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    assert cli.main(["export-hf", "demo", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "mine"
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    assert cli.main(["export-hf", "demo", str(folder)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == '{"mine": true}'  # nothing was written


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError: a bug" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.main(["info", "--debug"])
