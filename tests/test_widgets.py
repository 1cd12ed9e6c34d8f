"""The prompt panel: prompt building, rendering, and the panel driven from code."""

from __future__ import annotations

import html
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
        ("detect", " red  circle ; square;red circle", "en", "detect red circle ; square"),
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


def test_boxes_take_captions_one_per_object():
    from pali_kit import viz

    image = solid((255, 255, 255), size=(100, 200))
    detections, drawn = render_answer(image, BOXED)
    captioned = viz.draw_detections(image, detections, captions=["circle 0.93"])
    assert not np.array_equal(np.asarray(captioned), np.asarray(drawn))  # a longer tag
    with pytest.raises(ValueError, match="captions has 2 entries for 1 detections"):
        viz.draw_detections(image, detections, captions=["a", "b"])


# ----------------------------------------------------------------------------- the panel


def test_panel_streams_the_same_answer_as_generate(tiny_model):
    image = solid((200, 30, 30))
    panel = PromptPanel(tiny_model, images=[image])
    pieces, statuses = [], []
    panel.answer.observe(lambda c: pieces.append(c["new"]), "value")
    panel.status.observe(lambda c: statuses.append(c["new"]), "value")
    panel.task.value, panel.text.value, panel.max_new_tokens.value = "prompt", "detect circle", 6
    assert panel.prompt.value == "detect circle"

    panel.run_button.click()

    [expected] = tiny_model.generate(image, "detect circle", max_new_tokens=6, sampler="greedy")
    result = panel.last_result
    assert result.error is None
    assert panel.answer.value == result.text == expected.text
    assert len(pieces) > 2 and all(expected.text.startswith(p) for p in pieces)  # live updates
    assert "compiling" in statuses[0] and "done" in statuses[-1]
    assert "tokens/s" in panel.footer.value and "first token" in panel.footer.value


def test_panel_uses_generate_for_beam_search(panel, echo):
    panel.task.value, panel.sampler.value, panel.max_new_tokens.value = "caption", "beam(3)", 9
    result = panel.run()
    assert echo.calls == [
        ("generate", "caption en", {"max_new_tokens": 9, "sampler": "beam(3)", "seed": 0})
    ]
    assert panel.answer.value == result.text == BOXED
    assert result.timing.num_tokens == len(echo.tokenizer.encode(BOXED))
    assert "beam search" in panel.footer.value


def test_a_free_form_answer_with_boxes_is_drawn_and_listed_without_scores(panel):
    panel.task.value, panel.text.value = "prompt", "detect circle"
    result = panel.run()
    assert [d.label for d in result.detections] == ["circle"]
    assert result.detections[0].box == (0.0, 0.0, 16.0, 12.0)
    assert "circle" in panel.objects.value and "score" not in panel.objects.value
    assert panel._result_box.layout.display is None  # shown
    assert result.image.size == (32, 24)  # drawn on the image
    assert bytes(panel.result_image.value).startswith(b"\x89PNG")


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
    assert "the answer task needs a question: type it in the &#x27;question&#x27; box" in (
        panel.status.value
    )
    assert echo.calls == [] and not panel.run_button.disabled


def test_model_errors_are_shown_recorded_and_raised_by_run(demo_tokenizer):
    panel = PromptPanel(EchoModel(demo_tokenizer, error=RuntimeError("out of memory")), [solid(0)])
    with pytest.raises(RuntimeError, match="out of memory"):  # a notebook calling run() fails
        panel.run()
    assert panel.last_result.error == "RuntimeError: out of memory"
    assert panel.last_result.text == ""
    assert "RuntimeError: out of memory" in panel.status.value
    assert not panel.run_button.disabled


def test_the_run_button_shows_and_records_errors_without_raising(demo_tokenizer, caplog):
    panel = PromptPanel(EchoModel(demo_tokenizer, error=KeyError("bug")), [solid(0)])
    panel.run_button.click()  # raising here would reach only the kernel's log
    assert panel.last_result.error == "KeyError: 'bug'"
    assert "KeyError: &#x27;bug&#x27;" in panel.status.value
    assert "KeyError: 'bug'" in caplog.text  # the traceback is logged
    assert not panel.run_button.disabled


def test_a_validation_error_clears_the_previous_answer_drawing_and_timing(panel):
    panel.task.value, panel.text.value = "prompt", "detect circle"
    assert panel.run().error is None and panel.answer.value == BOXED
    assert panel._result_box.layout.display is None and panel.footer.value

    panel.task.value, panel.text.value = "answer", ""
    result = panel.run()
    assert "the answer task needs a question" in result.error
    assert (result.text, result.detections, result.image, result.timing) == ("", [], None, None)
    assert panel.last_result is result
    assert panel.answer.value == "" and panel.footer.value == "" and panel.objects.value == ""
    assert panel._result_box.layout.display == "none"
    assert bytes(panel.result_image.value) == b""


@pytest.mark.parametrize("task", ["caption", "describe", "ocr"])
def test_the_prompt_stays_visible_when_the_text_box_is_hidden(panel, task):
    panel.task.value = task
    assert panel.text.layout.display == "none"
    assert panel.prompt.layout.display is None
    assert panel.prompt.value == widgets.build_prompt(task)


@pytest.mark.parametrize("task", list(widgets.TASKS))
def test_the_visible_fields_have_distinct_labels(panel, task):
    panel.task.value = task
    fields = [panel.text, panel.language, panel.prompt, panel.sampler, panel.seed,
              panel.constrained, panel.max_new_tokens]  # fmt: skip
    labels = [f.description for f in fields if f.layout.display != "none"]
    assert len(labels) == len(set(labels)), labels


def test_the_code_line_is_shown_and_selectable_with_one_click(panel):
    panel.task.value, panel.language.value = "caption", "de"
    line = "model.generate(image, 'caption de', max_new_tokens=32, sampler='greedy', seed=0)"
    assert panel.code_line() == line + "[0].text"
    assert html.escape(panel.code_line()) in panel.code.value
    assert "user-select:all" in panel.code.value


def test_the_code_line_of_detect_and_segment_is_the_one_call(panel):
    panel.task.value, panel.text.value = "detect", "circle ;  red  square"
    kw = "max_new_tokens=32, sampler='greedy', seed=0"
    assert panel.code_line() == f"model.detect(image, ['circle', 'red square'], {kw})[0]"
    assert html.escape(panel.code_line()) in panel.code.value
    panel.constrained.value = False
    assert panel.code_line().endswith(f"{kw}, constrained=False)[0]")
    assert html.escape(panel.code_line()) in panel.code.value  # the shown line follows
    panel.task.value = "segment"  # the demo tokenizer: segment finds the demo VAE itself
    assert panel.code_line() == (
        f"model.segment(image, ['circle', 'red square'], {kw}, constrained=False)[0]"
    )


def test_the_segment_code_line_names_the_vae_of_a_model_that_needs_one(demo_tokenizer):
    panel = PromptPanel(EchoModel(OtherTokenizer(demo_tokenizer)), [solid(0)])
    panel.task.value, panel.text.value = "segment", "blob"
    assert panel.code_line().startswith("model.segment(image, ['blob'], vae=vae, ")


def test_the_constrained_box_shows_for_detect_and_segment_only(panel):
    for task in widgets.TASKS:
        panel.task.value = task
        shown = panel.constrained.layout.display != "none"
        assert shown == (task in ("detect", "segment")), task
    assert panel.constrained.value  # ticked by default


SEGMENTED = "<loc0100><loc0100><loc0900><loc0900>" + "".join(
    f"<seg{j:03d}>" for j in range(16)
) + " blob"  # fmt: skip


def test_segment_with_the_demo_tokenizer_finds_the_demo_vae(demo_tokenizer):
    panel = PromptPanel(EchoModel(demo_tokenizer, reply=SEGMENTED), [solid(0, size=(40, 40))])
    panel.task.value, panel.text.value = "prompt", "segment blob"  # drawn as text: no JAX
    result = panel.run()
    assert result.error is None and panel.vae is not None
    assert result.detections[0].mask.shape == (40, 40)
    assert "mask" in panel.objects.value and "no masks" not in panel.status.value


class OtherTokenizer:
    """The demo tokenizer under another file name: a model that is not the demo model."""

    path = "elsewhere/tokenizer.model"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_segment_without_a_vae_says_how_to_get_masks(demo_tokenizer):
    model = EchoModel(OtherTokenizer(demo_tokenizer), reply=SEGMENTED)
    panel = PromptPanel(model, [solid(0, size=(40, 40))])
    panel.task.value, panel.text.value = "prompt", "segment blob"  # drawn as text: no JAX
    result = panel.run()
    assert result.error is None and panel.vae is None
    assert result.detections[0].mask is None and result.detections[0].seg_codes is not None
    assert "codes, no VAE" in panel.objects.value
    assert "no masks: give the panel a VAE" in panel.status.value


def test_default_images_are_the_kits_samples(echo):
    panel = PromptPanel(echo)
    assert "shapes_0.png" in panel.image_picker.options
    assert panel.image.shape == (256, 256, 3)  # data/images/shapes_0.png


def widget_views(published: list[dict]) -> int:
    return sum("application/vnd.jupyter.widget-view+json" in data for data in published)


def test_a_cell_ending_in_prompt_panel_shows_one_panel(echo):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        published = []
        shell.display_pub.publish = lambda data, *args, **kw: published.append(data)
        shell.user_ns.update(widgets=widgets, model=echo, images=[solid(0)])
        cells = {
            "widgets.prompt_panel(model, images)": 1,  # shown once, not again as the value
            "panel = widgets.prompt_panel(model, images)": 1,
            "panel": 1,  # a later cell ending in the panel shows it
            "panel\npanel": 1,  # only the last expression is displayed
            "from IPython.display import display\ndisplay(panel)\npanel": 2,
        }
        for cell, views in cells.items():
            published.clear()
            assert shell.run_cell(cell).success
            assert widget_views(published) == views, cell
    finally:
        InteractiveShell.clear_instance()


def test_panel_is_one_widget_and_displays_headless(panel, capsys):
    assert isinstance(panel.widget, W.VBox)
    shown = widgets.prompt_panel(panel.model, images=[solid(0)])
    assert isinstance(shown, PromptPanel)
    capsys.readouterr()


# ----------------------------------------------------------------------------- scores (demo model)


@pytest.fixture(scope="module")
def demo():
    import pali_kit as pk

    return pk.load("demo", verbose=False)


def scene(i: int = 0):
    """A held-out shapes scene (the demo model trained on seed 0), 4x up to 256 x 256."""
    from pali_kit import data

    s = data.make_scene(12345, i, 64)
    return s.image.repeat(4, 0).repeat(4, 1), [o.label for o in s.objects]


def table_rows(objects_html: str) -> list[list[str]]:
    """The objects table's body rows as lists of cell texts."""
    rows = re.findall(r"<tr>(.*?)</tr>", objects_html)[1:]
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r)] for r in rows]


def detect_panel(model, image, labels, **settings) -> PromptPanel:
    panel = PromptPanel(model, images={"scene": image})
    panel.task.value, panel.text.value = "detect", " ; ".join(labels)
    for name, value in settings.items():
        getattr(panel, name).value = value
    return panel


def test_detect_shows_each_objects_score_in_the_table_and_on_the_image(demo):
    from pali_kit import viz

    image, labels = scene(0)
    panel = detect_panel(demo, image, labels)
    result = panel.run()
    dets = result.detections
    assert result.error is None and len(dets) >= 2
    assert all(0.0 <= d.score <= 1.0 for d in dets)
    assert len({d.score for d in dets}) > 1  # the model's own numbers, not a constant
    # the table: label, score, box, mask; one row per object, in order
    assert "<th>score</th>" in panel.objects.value
    rows = table_rows(panel.objects.value)
    assert [r[:2] for r in rows] == [[d.label, widgets._score_text(d.score)] for d in dets]
    # the drawing: boxes captioned "label score", pixel for pixel
    captions = [f"{d.label} {widgets._score_text(d.score)}" for d in dets]
    expected = np.asarray(viz.draw_detections(image, dets, captions=captions))
    np.testing.assert_array_equal(np.asarray(result.image), expected)
    assert not np.array_equal(expected, np.asarray(viz.draw_detections(image, dets)))
    shown = PIL.Image.open(io.BytesIO(bytes(panel.result_image.value)))
    np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), expected)  # 256 px: as is
    assert "then scoring" in panel.footer.value and "tokens/s" in panel.footer.value


@pytest.mark.parametrize(
    "settings",
    [{}, {"sampler": "temperature(0.7)", "seed": 3}, {"constrained": False}],
    ids=["greedy", "temperature", "unconstrained"],
)
def test_the_panels_objects_are_what_its_code_line_returns(demo, settings):
    image, labels = scene(1)
    panel = detect_panel(demo, image, labels, **settings)
    streamed = []
    panel.answer.observe(lambda c: streamed.append(c["new"]), "value")
    result = panel.run()
    assert result.error is None and result.detections
    assert panel.code_line().startswith(f"model.detect(image, {labels!r}, ")
    # run the line the panel shows, with the panel's image: the same objects, scores included
    assert eval(panel.code_line(), {"model": demo, "image": panel.image}) == result.detections
    values = [v for v in streamed if v]  # streamed: the text grew token by token
    assert len(values) >= 4 and values[-1] == result.text
    assert all(b.startswith(a) for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("sampler", ["greedy", "temperature(0.7)", "nucleus(0.9)", "beam(3)"])
def test_constrained_answers_parse_when_unconstrained_ones_are_cut_off(demo, sampler):
    # 12 tokens hold one object (4 <loc>, a label, EOS) but not two plus EOS: the
    # unconstrained answer runs into the budget mid-list (no EOS: it does not parse),
    # the constrained one closes after the objects that fit.
    from pali_kit import constrain

    tok = demo.tokenizer
    image, labels = scene(0)
    c = constrain.build(tok, [labels])
    parses = {}
    for constrained in (True, False):
        panel = detect_panel(demo, image, labels, sampler=sampler, max_new_tokens=12,
                             constrained=constrained)  # fmt: skip
        result = panel.run()
        assert result.error is None
        tokens = tok.encode(result.text) + [tok.eos_id] * (result.timing.num_tokens < 12)
        parses[constrained] = constrain.accepts(c, 0, tokens, 12)
        if constrained:
            assert result.detections and all(d.label in labels for d in result.detections)
            assert all(0.0 <= d.score <= 1.0 for d in result.detections)
    assert parses == {True: True, False: False}


def test_segment_objects_have_masks_and_scores(demo):
    image, labels = scene(2)
    panel = PromptPanel(demo, images={"scene": image})
    panel.task.value, panel.text.value = "segment", labels[0]
    result = panel.run()
    assert result.error is None and result.detections
    for d in result.detections:
        assert d.label == labels[0] and 0.0 <= d.score <= 1.0
        assert d.mask.dtype == bool and d.mask.shape == image.shape[:2]
    assert [r[1] for r in table_rows(panel.objects.value)] == [
        widgets._score_text(d.score) for d in result.detections
    ]
    assert "mask" in panel.objects.value and "no masks" not in panel.status.value
    [again] = [eval(panel.code_line(), {"model": demo, "image": panel.image})]
    assert [(d.label, d.box, d.score) for d in again] == [
        (d.label, d.box, d.score) for d in result.detections
    ]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again, result.detections))


def test_segment_on_a_model_without_a_vae_shows_scored_boxes_and_says_how(demo):
    from pali_kit.api import Model

    model = Model(demo.params, demo.config, OtherTokenizer(demo.tokenizer), name="my model")
    image, labels = scene(2)
    panel = PromptPanel(model, images={"scene": image})
    panel.task.value, panel.text.value = "segment", labels[0]
    result = panel.run()
    assert result.error is None and panel.vae is None and result.detections
    assert all(d.mask is None and d.seg_codes is not None for d in result.detections)
    assert all(0.0 <= d.score <= 1.0 for d in result.detections)
    assert "codes, no VAE" in panel.objects.value
    assert "no masks: give the panel a VAE" in panel.status.value


def test_too_few_tokens_for_one_constrained_object_is_an_input_error(panel):
    panel.task.value, panel.text.value, panel.max_new_tokens.value = "segment", "blob", 10
    result = panel.run()  # returned, not raised: the user fixes it in the panel
    assert "max tokens is 10 but one segment object" in result.error
    assert "raise &#x27;max tokens&#x27; to at least" in panel.status.value
    assert panel.model.calls == []  # the model never ran


def test_scores_are_written_so_that_small_ones_do_not_read_as_zero():
    assert widgets._score_text(0.934) == "0.93"
    assert widgets._score_text(1.0) == "1.00" and widgets._score_text(0.0) == "0.00"
    assert widgets._score_text(0.01) == "0.01"
    assert widgets._score_text(3.2e-5) == "3e-05"


# ----------------------------------------------------------------------------- weights


def fake_device(platform: str, kind: str = ""):
    import types

    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize(
    "device, halves",
    [
        (fake_device("cpu", "cpu"), ["bfloat16"]),
        (fake_device("gpu", "Tesla T4"), ["float16"]),  # no bfloat16 units
        (fake_device("gpu", "NVIDIA A100-SXM4-40GB"), ["bfloat16", "float16"]),
        (fake_device("tpu", "TPU v4"), ["bfloat16", "float16"]),
    ],
)
def test_the_weights_offered_are_those_the_device_runs(device, halves):
    assert widgets.weight_choices(device) == ("float32", *halves, "int8", "int4")


def test_a_stand_in_model_has_no_weights_selector(panel):
    assert panel.weights.layout.display == "none" and panel.weights.options == ()
    assert panel.code_line().startswith("model.generate(")
    with pytest.raises(ValueError, match="weights 'int8': this panel offers"):
        panel.set_weights("int8")


@pytest.mark.parametrize("choice", ["bfloat16", "int8", "int4"])
def test_the_weights_chosen_run_and_the_code_line_makes_them(demo, choice):
    image, _ = scene(2)
    panel = PromptPanel(demo, images={"scene": image})
    assert panel.weights.options == widgets.weight_choices()
    loaded = f"{demo.num_params() * 4 / 1e6:.2f} MB of weights"  # float32: 4 bytes each
    assert panel.weights.value == "float32" and panel.weights_info.value.endswith(
        f"{loaded}</small>"
    )
    panel.task.value, panel.text.value = "answer", "how many shapes"
    panel.weights.value = choice  # made from the loaded model, in memory
    assert panel.loaded_model is demo and panel.model is not demo
    assert widgets._weights_of(panel.model) == choice
    size = widgets._weight_bytes(panel.model)
    assert size < widgets._weight_bytes(demo)
    shown = f"{size / 1e6:.2f} MB of weights · {size / widgets._weight_bytes(demo):.2f}x"
    assert shown in panel.weights_info.value
    method = "quantize" if choice in widgets.SCHEMES else "astype"
    assert panel.code_line().startswith(f"model.{method}({choice!r}).generate(image, ")
    assert html.escape(panel.code_line()) in panel.code.value  # the shown line follows
    result = panel.run()
    assert result.error is None and result.text
    # the line, run on the loaded model: the same answer as the panel's
    assert eval(panel.code_line(), {"model": demo, "image": panel.image}) == result.text
    panel.weights.value = "float32"  # back: the loaded model itself, no copy
    assert panel.model is demo and panel.code_line().startswith("model.generate(")
    assert panel.weights_info.value.count("x the loaded") == 0


def test_int8_detections_are_what_the_code_line_returns(demo):
    image, labels = scene(1)
    panel = detect_panel(demo, image, labels, weights="int8")
    result = panel.run()
    assert result.error is None and result.detections
    assert panel.code_line().startswith(f"model.quantize('int8').detect(image, {labels!r}, ")
    assert eval(panel.code_line(), {"model": demo, "image": panel.image}) == result.detections


def test_a_quantized_model_offers_only_its_own_weights():
    import pali_kit as pk

    model = pk.load("demo", quantize="int4", verbose=False)
    panel = PromptPanel(model, images=[solid((255, 0, 0))])
    assert panel.weights.options == ("int4",) and panel.weights.disabled
    assert panel.code_line().startswith("model.generate(")
    assert f"{widgets._weight_bytes(model) / 1e6:.2f} MB" in panel.weights_info.value


def test_weights_that_cannot_be_made_are_an_error_in_the_panel(demo, monkeypatch):
    def out_of_memory(scheme):
        raise MemoryError("no room for the copy")

    panel = PromptPanel(demo, images=[solid((255, 0, 0))])
    monkeypatch.setattr(demo, "quantize", out_of_memory)
    panel.weights.value = "int8"
    assert "could not make int8 weights: no room for the copy" in panel.status.value
    assert panel.weights.value == "float32" and panel.model is demo  # the loaded ones kept
    assert panel.code_line().startswith("model.generate(")
