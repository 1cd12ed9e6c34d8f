"""The prompt panel: prompt building, rendering, and the panel driven from code."""

from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import ipywidgets as W
import numpy as np
import PIL.Image
import pytest

from pali_kit import widgets
from pali_kit.api import Generation
from pali_kit.widgets import PromptPanel, build_prompt, render_answer, upload_value

BOXED = "<loc0000><loc0000><loc0512><loc0512> circle"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def solid(color, size=(24, 32)) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (*size, 3)).copy()


class EchoModel:
    """A stand-in model without JAX: answers every prompt with ``reply``, piece by piece."""

    name, resolution = "echo", 28

    def __init__(self, tokenizer, reply: str = BOXED, error: Exception | None = None):
        self.tokenizer, self.reply, self.error = tokenizer, reply, error
        self.calls: list[tuple[str, str, dict]] = []

    def stream(self, image, prompt, **kw):
        self.calls.append(("stream", prompt, kw))
        if self.error:
            raise self.error
        yield from re.findall(r"<[^>]+>|[^<]+", self.reply)

    def generate(self, images, prompt, **kw):
        self.calls.append(("generate", prompt, kw))
        tokens = np.array([*self.tokenizer.encode(self.reply), 1], np.int32)
        return [Generation(prompt, self.reply, tokens, np.zeros(len(tokens), np.float32))]


@pytest.fixture
def echo(demo_tokenizer):
    return EchoModel(demo_tokenizer)


@pytest.fixture
def panel(echo):
    return PromptPanel(echo, images={"red": solid((255, 0, 0)), "blue": solid((0, 0, 255))})


# ----------------------------------------------------------------------------- build_prompt


@pytest.mark.parametrize(
    "task, text, lang, expected",
    [
        ("caption", "", "en", "caption en"),
        ("caption", "ignored", "es", "caption es"),
        ("describe", "", "fr", "describe fr"),
        ("ocr", "", "en", "ocr"),
        ("answer", " how many circles? ", "de", "answer de how many circles?"),
        ("question", "red", "en", "question en red"),
        ("detect", "circle", "en", "detect circle"),
        ("detect", "circle;square ; ", "en", "detect circle ; square"),
        ("segment", "yellow triangle", "en", "segment yellow triangle"),
        ("prompt", "  caption pt ", "en", "caption pt"),
    ],
)
def test_build_prompt_gives_the_exact_prompt_of_each_task(task, text, lang, expected):
    assert build_prompt(task, text, lang) == expected


@pytest.mark.parametrize("task", ["answer", "question", "detect", "segment", "prompt"])
@pytest.mark.parametrize("text", ["", "   "])
def test_build_prompt_needs_text_for_tasks_that_take_it(task, text):
    with pytest.raises(ValueError, match=f"the {task} task needs"):
        build_prompt(task, text)


def test_build_prompt_needs_an_object_name_not_just_separators():
    with pytest.raises(ValueError, match="object names"):
        build_prompt("detect", " ; ;")


def test_build_prompt_rejects_an_unknown_language():
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        build_prompt("caption", "", "xx")


def test_build_prompt_rejects_an_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'count'"):
        build_prompt("count", "circles")


def test_build_prompt_rejects_a_newline_in_a_free_form_prompt():
    with pytest.raises(ValueError, match="newline"):
        build_prompt("prompt", "caption en\nred")


# ----------------------------------------------------------------------------- render_answer


def test_render_answer_draws_the_parsed_boxes_on_the_image():
    image = solid((255, 255, 255), size=(100, 200))
    detections, drawn = render_answer(image, BOXED)
    assert [d.label for d in detections] == ["circle"]
    assert detections[0].box == (0.0, 0.0, 100.0, 50.0)
    assert drawn.size == (200, 100)
    assert np.asarray(drawn)[25, 0].tolist() != [255, 255, 255]  # the box's left edge
    assert np.asarray(drawn)[75, 150].tolist() == [255, 255, 255]  # outside the box


def test_render_answer_decodes_masks_when_a_vae_is_given(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts/make_random_vae.py"
    spec = importlib.util.spec_from_file_location("make_random_vae", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from pali_kit.segmentation import load_vae

    vae = load_vae(module.make_random_vae(tmp_path / "vae.npz", codebook_dim=16))
    codes = "".join(f"<seg{j:03d}>" for j in range(16))
    text = f"<loc0100><loc0100><loc0900><loc0900>{codes} blob"
    detections, drawn = render_answer(solid((0, 0, 0), size=(64, 64)), text, vae)
    assert detections[0].seg_codes == tuple(range(16))
    assert detections[0].mask.shape == (64, 64)
    assert drawn.size == (64, 64)


# ----------------------------------------------------------------------------- the panel


def test_panel_streams_the_same_answer_as_generate(tiny_model):
    image = solid((200, 30, 30))
    panel = PromptPanel(tiny_model, images=[image])
    pieces, statuses = [], []
    panel.answer.observe(lambda c: pieces.append(c["new"]), "value")
    panel.status.observe(lambda c: statuses.append(c["new"]), "value")
    panel.task.value, panel.text.value, panel.max_new_tokens.value = "detect", "circle", 6
    assert panel.prompt.value == "detect circle"

    panel.run_button.click()

    [expected] = tiny_model.generate(image, "detect circle", max_new_tokens=6, sampler="greedy")
    result = panel.last_result
    assert result.error is None
    assert panel.answer.value == result.text == expected.text
    assert len(pieces) > 2 and all(expected.text.startswith(p) for p in pieces)  # live updates
    assert "compiling" in statuses[0] and "done" in statuses[-1]
    assert "tokens/s" in panel.footer.value and "first token" in panel.footer.value
    assert result.image.size == (32, 24)  # detect answers are drawn on the image
    assert bytes(panel.result_image.value).startswith(b"\x89PNG")


def test_panel_uses_generate_for_beam_search(panel, echo):
    panel.task.value, panel.sampler.value, panel.max_new_tokens.value = "caption", "beam(3)", 9
    result = panel.run()
    assert echo.calls == [
        ("generate", "caption en", {"max_new_tokens": 9, "sampler": "beam(3)", "seed": 0})
    ]
    assert panel.answer.value == result.text == BOXED
    assert result.timing.num_tokens == len(echo.tokenizer.encode(BOXED))
    assert "beam search" in panel.footer.value


def test_panel_draws_detections_and_lists_them(panel):
    panel.task.value, panel.text.value = "detect", "circle"
    result = panel.run()
    assert [d.label for d in result.detections] == ["circle"]
    assert result.detections[0].box == (0.0, 0.0, 16.0, 12.0)
    assert "circle" in panel.objects.value
    assert panel._result_box.layout.display is None  # shown


def test_panel_shows_the_prompt_and_the_code_that_reproduces_it(panel):
    panel.task.value, panel.text.value, panel.language.value = "answer", "what color?", "fr"
    assert panel.prompt.value == "answer fr what color?"
    assert panel.text.description == "question"
    assert "model.generate(image, &#x27;answer fr what color?&#x27;" in panel.code.value
    panel.task.value = "detect"
    assert panel.language.disabled
    panel.task.value = "caption"
    assert panel.text.layout.display == "none"


def test_uploaded_image_becomes_the_current_image(panel):
    green = solid((0, 255, 0), size=(10, 12))
    panel.upload.value = upload_value("green.png", png_bytes(green))
    assert panel.image_picker.value == "upload: green.png"
    np.testing.assert_array_equal(panel.image, green)
    assert bytes(panel.thumbnail.value).startswith(b"\x89PNG")


def test_broken_upload_shows_an_error_and_keeps_the_image(panel):
    before = panel.image.copy()
    panel.upload.value = upload_value("broken.png", b"this is not a png")
    assert "could not use upload: broken.png" in panel.status.value
    assert "not in an image format" in panel.status.value
    np.testing.assert_array_equal(panel.image, before)
    assert panel.run().error is None  # the panel still works


def test_picking_an_image_from_the_dropdown_makes_it_current(panel):
    panel.image_picker.value = "blue"
    assert panel.image[0, 0].tolist() == [0, 0, 255]


def test_empty_question_is_shown_in_the_panel_not_raised(panel, echo):
    panel.task.value, panel.text.value = "answer", ""
    result = panel.run()
    assert "the answer task needs a question" in result.error
    assert "the answer task needs a question" in panel.status.value
    assert echo.calls == [] and not panel.run_button.disabled


def test_model_errors_are_shown_with_their_type(demo_tokenizer):
    panel = PromptPanel(EchoModel(demo_tokenizer, error=RuntimeError("out of memory")), [solid(0)])
    result = panel.run()
    assert result.error == "RuntimeError: out of memory"
    assert "RuntimeError: out of memory" in panel.status.value
    assert not panel.run_button.disabled


def test_default_images_are_the_kits_samples(echo):
    panel = PromptPanel(echo)
    assert "shapes_0.png" in panel.image_picker.options
    assert panel.image.shape == (256, 256, 3)  # data/images/shapes_0.png


def test_panel_is_one_widget_and_displays_headless(panel, capsys):
    assert isinstance(panel.widget, W.VBox)
    shown = widgets.prompt_panel(panel.model, images=[solid(0)])
    assert isinstance(shown, PromptPanel)
    capsys.readouterr()
