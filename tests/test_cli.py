"""The ``pali-kit`` command: the main job (``make demo``) and its helpers."""

from __future__ import annotations

import json
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
        (["generate", "x.png", "y", "--quantize", "int3"], 2, ["--quantize", "'int3'", "'int4'"]),
        (["generate", "x.png", "y", "--dtype", "float64"], 2, ["--dtype", "'float64'", "bfloat16"]),
        (["generate", "x.png", "y", "--dtype", "int8"], 2, ["--dtype", "pass --quantize int8"]),
        (["demo", "--quantize", "nf4"], 2, ["--quantize", "'nf4'", "'int8'"]),
        (["eval", "demo", "v.jsonl", "--quantize", "8"], 2, ["--quantize", "'8'"]),
        (
            ["finetune", "t.jsonl", "--model", "demo", "--out", "o", "--quantize", "int16"],
            2,
            ["--quantize", "'int16'"],
        ),
        (
            ["finetune", "t.jsonl", "--model", "demo", "--out", "o", "--frozen-dtype", "int4"],
            2,
            ["--frozen-dtype", "pass --quantize int4"],
        ),
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


# ----------------------------------------------------------------------------- --quantize


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_with_quantized_weights(scheme, capsys):
    image = str(data_dir() / "images" / "shapes_0.png")
    argv = ["generate", image, "answer en how many shapes", "--max-new-tokens", "4"]
    assert cli.main([*argv, "--quantize", scheme, "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().isdigit(), captured.out  # the answer parses
    assert f"| {scheme} + bfloat16 (" in captured.err  # the status line names the weights


def test_demo_with_int4_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo_world", lambda model, out: None)  # the scores: test above
    assert cli.main(["demo", "--out", str(tmp_path), "--quantize", "int4"]) == 0
    captured = capsys.readouterr()
    assert "| int4 + float32 (" in captured.err
    right, graded = map(int, re.search(r"(\d+) of (\d+) answers right", captured.out).groups())
    assert graded > 0 and right >= graded // 2  # int4 keeps the demo model working
    from pali_kit import data

    assert len(list(tmp_path.glob("*_demo.png"))) == len(data.sample_ground_truth())


def test_eval_with_int8_weights(capsys):
    val = data_dir() / "sample_dataset" / "val.jsonl"
    argv = ["eval", "demo", str(val), "--json", "--max-new-tokens", "12", "--quantize", "int8"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == len(val.read_text().splitlines())
    assert result["scores"]["count/exact_match"] > 0.5  # the trained demo model, int8


def test_finetune_with_int8_frozen_weights(tmp_path, capsys):
    """Frozen weights int8 while training; model.npz holds them dequantized (float), the
    trainable attention in float32, updated."""
    import pali_kit as pk
    from pali_kit import quant

    out = tmp_path / "run"
    argv = ["finetune", str(data_dir() / "sample_dataset" / "train.jsonl"), "--model", "demo",
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--text-len", "24",
            "--trainable", "llm/layers/attn/.*", "--quantize", "int8", "--frozen-dtype",
            "float32", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert json.loads((out / "run.json").read_text())["quantize"] == "int8"
    before, after = pk.load("demo").params, pk.load(out / "model.npz").params
    frozen = before["llm"]["layers"]["mlp"]["linear"]  # a quantized, frozen matrix
    expected = quant.dequantize(
        quant.quantize_params(before, "int8")["llm"]["layers"]["mlp"]["linear"]
    )
    # written as the float array the int8 weight stands for: exactly its dequantized value
    np.testing.assert_array_equal(np.asarray(after["llm"]["layers"]["mlp"]["linear"]),
                                  np.asarray(expected))  # fmt: skip
    # ... which is within half a quantization step of the original, and not the original
    step = np.abs(np.asarray(frozen)).max(axis=-2, keepdims=True) / 127
    diff = np.abs(np.asarray(after["llm"]["layers"]["mlp"]["linear"]) - np.asarray(frozen))
    # half a step, plus the float32 rounding of q * scale (|q| <= 127: 127 * eps * step)
    assert diff.max() > 0 and (diff <= step * (0.5 + 127 * np.finfo(np.float32).eps)).all()
    q = before["llm"]["layers"]["attn"]["q_einsum"]["w"]  # trainable: float32, moved
    assert not np.array_equal(np.asarray(after["llm"]["layers"]["attn"]["q_einsum"]["w"]),
                              np.asarray(q))  # fmt: skip
