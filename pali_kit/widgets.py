"""The prompt panel: try PaliGemma prompts in a notebook, with no code to write.

    import pali_kit as pk
    model = pk.load("demo")
    panel = pk.widgets.prompt_panel(model)              # shows the panel and returns it
    panel = pk.widgets.PromptPanel(model, images=["cat.jpg"], vae=pk.load_vae("demo"))
    panel                                               # a cell ending in the panel shows it

Pick or upload an image, pick a task (caption, detect, ...), fill in the
question or object names, choose a sampler, press Run. The answer streams in as
it is produced; detect/segment answers are drawn over the image. The panel
shows the exact prompt string the model reads, and the ``model.generate`` call
that reproduces the run, so what you learn here carries over to code.

The logic is plain Python that tests (and you) can drive without a browser:

    build_prompt("detect", "cat ; dog")       # -> "detect cat ; dog"
    panel.task.value, panel.text.value = "detect", "circle"
    result = panel.run()                      # what the Run button calls
    result.text, result.detections, result.image, result.timing

Works in Jupyter, JupyterLab, VS Code, Colab and Kaggle (ipywidgets 8; on
Colab the custom widget manager is switched on for you). Importing this module
needs no display.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import PIL.Image

from . import assets, viz
from . import tokenizer as ptok
from .detection import Detection, parse_detections
from .images import load_image

__all__ = [
    "TASKS",
    "SAMPLERS",
    "build_prompt",
    "split_objects",
    "render_answer",
    "sample_images",
    "upload_value",
    "Timing",
    "PanelResult",
    "PromptPanel",
    "prompt_panel",
]


# ----------------------------------------------------------------------------- the logic


@dataclasses.dataclass(frozen=True)
class _Task:
    label: str  # shown in the dropdown
    needs: str | None  # what the text box must hold, or None when the task takes no text
    uses_language: bool
    box: str = ""  # the text box's name for this task


_OBJECTS = "object names (separate with ;)"
TASKS: dict[str, _Task] = {
    "caption": _Task("caption: a short caption", None, True),
    "describe": _Task("describe: a longer description", None, True),
    "ocr": _Task("ocr: read the text in the image", None, False),
    "answer": _Task("answer: answer a question", "a question", True, "question"),
    "question": _Task("question: ask a question with this answer", "an answer", True, "answer"),
    "detect": _Task("detect: boxes around objects", _OBJECTS, False, "objects"),
    "segment": _Task("segment: masks of objects", _OBJECTS, False, "objects"),
    "prompt": _Task("free-form prompt", "a prompt", False, "prompt"),
}

SAMPLERS = ("greedy", "temperature(0.7)", "nucleus(0.9)", "top_k(40)", "beam(3)")
DETECTION_TASKS = ("detect", "segment")


def split_objects(text: str) -> list[str]:
    """``"cat ; dog ;"`` -> ``["cat", "dog"]``: object names as typed, empty ones dropped."""
    return [name.strip() for name in text.split(";") if name.strip()]


def build_prompt(task: str, text: str = "", lang: str = "en") -> str:
    """The exact prompt (prefix) string for a task, built with ``pali_kit.tokenizer``.

    Args:
      task: a key of ``TASKS``: caption, describe, ocr, answer, question,
        detect, segment or prompt (free-form: ``text`` is the prompt).
      text: the question (answer), the answer (question), object names
        separated by ";" (detect, segment) or the prompt; ignored otherwise.
      lang: a code of ``pali_kit.tokenizer.LANGUAGES``; used by caption,
        describe, answer and question.

    >>> build_prompt("answer", "how many circles?", "de")
    'answer de how many circles?'
    >>> build_prompt("detect", "circle ; square")
    'detect circle ; square'
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if lang not in ptok.LANGUAGES:
        raise ValueError(f"unknown language code {lang!r}: use one of {', '.join(ptok.LANGUAGES)}")
    builders = {"caption": ptok.caption, "describe": ptok.describe}
    if task in builders:
        return builders[task](lang)
    if task == "ocr":
        return ptok.ocr()
    text = (text or "").strip()
    if not text:
        raise ValueError(f"the {task} task needs {TASKS[task].needs}: type it in the text box")
    if task == "answer":
        return ptok.answer(text, lang)
    if task == "question":
        return ptok.question(text, lang)
    if task in DETECTION_TASKS:
        objects = split_objects(text)
        if not objects:
            raise ValueError(f"the {task} task needs {TASKS[task].needs}, got only ';'")
        return ptok.detect(*objects) if task == "detect" else ptok.segment(*objects)
    if "\n" in text:
        raise ValueError("a prompt may not contain a newline: the model reads '\\n' as its end")
    return text


def render_answer(image, text: str, vae=None) -> tuple[list[Detection], PIL.Image.Image]:
    """Parse a detect/segment answer and draw it: (detections, image with boxes and masks).

    image: uint8 [H, W, 3] (or anything ``viz.to_pil`` takes); boxes come out in
    its pixels. Masks are decoded only when a VAE is given and the answer has
    ``<seg>`` codes.
    """
    width, height = viz.to_pil(image).size
    detections = parse_detections(text, width, height)
    if vae is not None and any(d.seg_codes is not None for d in detections):
        from .segmentation import with_masks  # JAX: imported only when needed

        detections = with_masks(detections, vae, width, height)
    return detections, viz.draw_detections(image, detections)


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long one run took. Times are seconds from pressing Run."""

    first_token_s: float  # includes preprocessing, prefill and any compiling
    total_s: float
    num_tokens: int  # generated tokens, EOS not counted
    compiled: bool = False  # True when this run compiled new code
    streamed: bool = True  # False for beam search: the whole answer arrives at once

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: the tokens after the first, over the time after the first."""
        if self.num_tokens > 1 and self.total_s > self.first_token_s:
            return (self.num_tokens - 1) / (self.total_s - self.first_token_s)
        return self.num_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        """One line, e.g. ``first token 0.21 s · 12 tokens · 48.3 tokens/s · total 0.44 s``."""
        first = f"first token {self.first_token_s:.2f} s" if self.streamed else "beam search"
        if self.compiled:
            first += " (includes compiling)"
        return (
            f"{first} · {self.num_tokens} tokens · {self.tokens_per_s:.1f} tokens/s "
            f"· total {self.total_s:.2f} s"
        )


@dataclasses.dataclass
class PanelResult:
    """What one Run produced (``panel.last_result``)."""

    prompt: str = ""
    text: str = ""  # the raw answer, <loc>/<seg> tokens kept as text
    detections: list[Detection] = dataclasses.field(default_factory=list)
    image: PIL.Image.Image | None = None  # the image with boxes/masks (detect, segment)
    timing: Timing | None = None
    error: str | None = None  # set when the run failed; the panel shows it


# ----------------------------------------------------------------------------- images


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")


sample_images = assets.sample_images  # {file name: path} of the kit's sample images


def _named_images(images) -> dict[str, Any]:
    """Images as given (None, one image, a list or a dict) -> {name shown: image}."""
    if images is None:
        return sample_images()
    if isinstance(images, Mapping):
        return {str(k): v for k, v in images.items()}
    if isinstance(images, (str, os.PathLike, bytes, PIL.Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim <= 3
    ):
        images = [images]
    named: dict[str, Any] = {}
    for i, image in enumerate(images):
        name = Path(image).name if isinstance(image, (str, os.PathLike)) else f"image {i}"
        named[name if name not in named else f"{name} ({i})"] = image
    return named


def _png(image, max_side: int) -> bytes:
    """PNG bytes of an image shrunk to fit ``max_side`` (aspect kept), for display."""
    pil = viz.to_pil(image)
    pil.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _uploaded_files(value) -> list[tuple[str, bytes]]:
    """FileUpload.value -> [(name, bytes)]: ipywidgets 8 (tuple of dicts) or 7 (dict)."""
    if isinstance(value, Mapping):  # ipywidgets 7: {name: {"metadata": ..., "content": ...}}
        return [(name, bytes(f["content"])) for name, f in value.items()]
    return [(f["name"], bytes(f["content"])) for f in value]


def upload_value(name: str, content: bytes) -> tuple[dict, ...]:
    """A FileUpload value (ipywidgets 8) holding one file: to drive the panel from code."""
    now = datetime.datetime.now(datetime.timezone.utc)
    entry = {"name": name, "type": "", "size": len(content), "content": memoryview(content),
             "last_modified": now}  # fmt: skip
    return (entry,)


# ----------------------------------------------------------------------------- the panel


_STATUS_COLORS = {"info": "#555", "busy": "#b26b00", "ok": "#2e7d32", "error": "#c62828"}


class PromptPanel:
    """An ipywidgets panel to prompt a PaliGemma: image, task, decoding, streamed answer.

    Args:
      model: a ``pk.load(...)`` Model with a tokenizer.
      images: the images offered in the dropdown: a list (paths, arrays, PIL
        images), a dict {name: image}, or None for the kit's sample images.
      vae: a ``pk.load_vae(...)`` mask decoder; with it, segment answers show masks.
      max_new_tokens: the slider's starting value.

    The widgets are attributes (``task``, ``text``, ``language``, ``prompt``,
    ``sampler``, ``seed``, ``max_new_tokens``, ``run_button``, ``answer``,
    ``status``, ``footer``, ...), so code can set them; ``run()`` does what the
    Run button does; ``last_result`` holds the latest ``PanelResult``.
    """

    def __init__(self, model, images=None, vae=None, *, max_new_tokens: int = 32):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "the prompt panel needs a model with a tokenizer: pk.load(..., tokenizer=path)"
            )
        self.model, self.vae = model, vae
        self.image: np.ndarray | None = None  # uint8 [H, W, 3], the current image
        self.last_result: PanelResult | None = None
        self._sources = _named_images(images)
        self._settings_seen: set = set()
        self._current: str | None = None  # the dropdown name of ``image``
        self._quiet = False  # True while the panel itself changes the image dropdown
        self._make_widgets(max_new_tokens)
        self._connect()
        self._update_task()
        if self._sources:
            self.select_image(next(iter(self._sources)))

    # --- building ------------------------------------------------------------------

    def _make_widgets(self, max_new_tokens: int) -> None:
        wide = W.Layout(width="100%")
        self.image_picker = W.Dropdown(options=list(self._sources), description="image")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.thumbnail = W.Image(format="png", layout=W.Layout(max_width="256px"))
        self.task = W.Dropdown(
            options=[(t.label, key) for key, t in TASKS.items()], value="caption",
            description="task",
        )  # fmt: skip
        self.text = W.Text(description="text", layout=wide)
        self.language = W.Dropdown(options=ptok.LANGUAGES, value="en", description="language")
        self.prompt = W.Text(description="prompt", disabled=True, layout=wide)
        self.sampler = W.Dropdown(options=SAMPLERS, value="greedy", description="sampler")
        self.seed = W.IntText(value=0, description="seed")
        self.max_new_tokens = W.IntSlider(
            value=max_new_tokens, min=1, max=256, description="max tokens"
        )
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML()
        self.code = W.HTML()
        self.answer = W.Textarea(
            description="answer", disabled=True, layout=W.Layout(width="100%", height="80px")
        )
        self.result_image = W.Image(format="png", layout=W.Layout(max_width="512px"))
        self.objects = W.HTML()
        self.footer = W.HTML()
        self._result_box = W.HBox([self.result_image, self.objects])
        self._result_box.layout.display = "none"

    def _connect(self) -> None:
        self.image_picker.observe(self._on_pick, "value")
        self.upload.observe(self._on_upload, "value")
        for widget in (self.task, self.text, self.language, self.sampler, self.seed,
                       self.max_new_tokens):  # fmt: skip
            widget.observe(self._on_setting, "value")
        self.run_button.on_click(lambda _: self.run())

    @property
    def widget(self) -> W.VBox:
        """The whole panel as one ipywidgets box (to place it in your own layout)."""
        if not hasattr(self, "_widget"):
            self._widget = self._layout()
        return self._widget

    def _layout(self) -> W.VBox:
        title = W.HTML(f"<b>PaliGemma prompt panel</b> · {html.escape(self.model.name)} "
                       f"· {self.model.resolution} px input")  # fmt: skip
        image_column = W.VBox([self.thumbnail, self.image_picker, self.upload])
        decoding = W.HBox([self.sampler, self.seed])
        prompt_column = W.VBox(
            [self.task, self.text, self.language, self.prompt, decoding, self.max_new_tokens,
             W.HBox([self.run_button, self.status]), self.code],
            layout=W.Layout(flex="1"),
        )  # fmt: skip
        return W.VBox([title, W.HBox([image_column, prompt_column]), self.answer,
                       self._result_box, self.footer])  # fmt: skip

    def _ipython_display_(self) -> None:
        from IPython.display import display

        _enable_colab_widgets()
        display(self.widget)

    # --- images --------------------------------------------------------------------

    def select_image(self, name: str) -> None:
        """Make the dropdown's image ``name`` the current one."""
        self.image_picker.value = name
        if self.image is None or self._current != name:
            self._load(name)

    def add_image(self, image, name: str | None = None) -> bool:
        """Add an image (path, bytes, PIL, array) to the dropdown and select it.

        Returns False, with the error shown in the panel, when it is not an image.
        """
        name = name or f"image {len(self._sources)}"
        try:
            pixels = load_image(image)
        except (ValueError, TypeError) as error:
            self._set_status(f"could not use {name}: {error}", "error")
            return False
        self._sources[name] = pixels
        self._quiet = True
        try:
            self.image_picker.options = list(self._sources)
            self.image_picker.value = name
        finally:
            self._quiet = False
        self._show_image(name, pixels)
        self._set_status(f"using {name}", "info")
        return True

    def _on_pick(self, change) -> None:
        if not self._quiet and change["new"] is not None:
            self._load(change["new"])

    def _on_upload(self, change) -> None:
        for name, content in _uploaded_files(change["new"]):
            self.add_image(content, f"upload: {name}")

    def _load(self, name: str) -> None:
        try:
            pixels = load_image(self._sources[name])
        except (ValueError, TypeError) as error:
            self._set_status(f"could not read {name}: {error}", "error")
            return
        self._show_image(name, pixels)

    def _show_image(self, name: str, pixels: np.ndarray) -> None:
        self.image, self._current = pixels, name
        self.thumbnail.value = _png(pixels, 256)

    # --- settings --------------------------------------------------------------------

    def _on_setting(self, change) -> None:
        if change["owner"] is self.task:
            self._update_task()
        else:
            self._update_prompt()

    def _update_task(self) -> None:
        """Show the text box and language only where the task uses them."""
        task = TASKS[self.task.value]
        self.text.layout.display = None if task.needs else "none"
        self.text.placeholder = f"type {task.needs}" if task.needs else ""
        self.text.description = task.box
        self.language.disabled = not task.uses_language
        self._update_prompt()

    def _update_prompt(self) -> None:
        """Refresh the read-only prompt and the equivalent code line."""
        self.seed.disabled = self.sampler.value == "greedy" or self.sampler.value.startswith("beam")
        try:
            prompt = build_prompt(self.task.value, self.text.value, self.language.value)
        except ValueError as error:
            self.prompt.value, self.code.value = "", _small(str(error))
            return
        self.prompt.value = prompt
        self.code.value = _small(html.escape(self.code_line(prompt)), code=True)

    def generate_kwargs(self) -> dict:
        """The decoding settings as ``model.generate`` / ``model.stream`` keywords."""
        return {"max_new_tokens": self.max_new_tokens.value, "sampler": self.sampler.value,
                "seed": self.seed.value}  # fmt: skip

    def code_line(self, prompt: str | None = None) -> str:
        """The ``model.generate`` call that reproduces the current settings."""
        prompt = self.prompt.value if prompt is None else prompt
        kw = ", ".join(f"{k}={v!r}" for k, v in self.generate_kwargs().items())
        return f"model.generate(image, {prompt!r}, {kw})[0].text"

    # --- running ---------------------------------------------------------------------

    def run(self) -> PanelResult:
        """Generate an answer with the current settings (what Run does); never raises.

        The answer streams into ``answer``; detect/segment answers are drawn; the
        timing goes to ``footer``; an error goes to ``status`` and ``result.error``.
        """
        self.run_button.disabled = True
        try:
            result = self._run()
        except Exception as error:  # the panel must survive anything: show, don't raise
            message = str(error)
            if not isinstance(error, ValueError):  # an unexpected error: name its type
                message = f"{type(error).__name__}: {error}"
            self._set_status(message, "error")
            result = PanelResult(prompt=self.prompt.value, text=self.answer.value, error=message)
        finally:
            self.run_button.disabled = False
        self.last_result = result
        return result

    def _run(self) -> PanelResult:
        prompt = build_prompt(self.task.value, self.text.value, self.language.value)
        if self.image is None:
            raise ValueError("no image: pick one from the dropdown or upload one")
        image, kw = self.image, self.generate_kwargs()
        self.answer.value, self.footer.value = "", ""
        self._result_box.layout.display = "none"
        self._announce(kw)
        text, timing = self._generate(image, prompt, kw)
        result = PanelResult(prompt, text, timing=timing)
        if self.task.value in DETECTION_TASKS or "<loc" in text:
            result.detections, result.image = render_answer(image, text, self.vae)
            self._show_detections(result)
        self.footer.value = _small(timing.summary())
        self._set_status("done", "ok")
        return result

    def _announce(self, kw: dict) -> None:
        """Say what is about to happen: the first run (of new settings) compiles."""
        key = (kw["sampler"], kw["max_new_tokens"])
        if not self._settings_seen:
            self._set_status("compiling... (the first run takes several seconds on CPU)", "busy")
        elif key not in self._settings_seen:
            self._set_status("running... (new settings may compile first)", "busy")
        else:
            self._set_status("running...", "busy")
        self._settings_seen.add(key)

    def _generate(self, image, prompt: str, kw: dict) -> tuple[str, Timing]:
        """Stream the answer into ``answer`` (beam search: generate it whole)."""
        from . import decode

        compiles, start = decode.compile_count(), time.perf_counter()
        first = None
        beam = kw["sampler"].startswith("beam")
        if beam:
            [out] = self.model.generate(image, prompt, **kw)
            self.answer.value = out.text
            num_tokens = int(np.sum(out.tokens != decode.EOS_ID))
        else:
            for piece in self.model.stream(image, prompt, **kw):
                if first is None:
                    first = time.perf_counter() - start
                    self._set_status("generating...", "busy")
                self.answer.value += piece
            # the stream yields text; its token count is that of the text re-encoded
            num_tokens = len(self.model.tokenizer.encode(self.answer.value))
        total = time.perf_counter() - start
        timing = Timing(
            first_token_s=total if first is None else first, total_s=total,
            num_tokens=num_tokens, compiled=decode.compile_count() > compiles,
            streamed=not beam,
        )  # fmt: skip
        return self.answer.value, timing

    def _show_detections(self, result: PanelResult) -> None:
        self.result_image.value = _png(result.image, 512)
        self.objects.value = _detections_table(result.detections)
        self._result_box.layout.display = None

    def _set_status(self, message: str, kind: str = "info") -> None:
        color = _STATUS_COLORS[kind]
        icon = "⚠ " if kind == "error" else ""
        self.status.value = f'<span style="color:{color}">{icon}{html.escape(message)}</span>'


def _small(content: str, code: bool = False) -> str:
    tag = "code" if code else "span"
    return f'<small style="color:#555"><{tag}>{content}</{tag}></small>'


def _detections_table(detections: list[Detection]) -> str:
    """An HTML table: label, box in pixels, whether a mask was decoded."""
    if not detections:
        return _small("no objects in the answer (no &lt;loc&gt; tokens)")
    rows = "".join(
        f"<tr><td>{html.escape(d.label) or '&nbsp;'}</td>"
        f"<td>({', '.join(f'{v:.0f}' for v in d.box)})</td>"
        f"<td>{'mask' if d.mask is not None else ('codes' if d.seg_codes else '')}</td></tr>"
        for d in detections
    )
    head = "<tr><th>label</th><th>box x0, y0, x1, y1 (px)</th><th></th></tr>"
    return f"<table>{head}{rows}</table>"


def _enable_colab_widgets() -> None:
    """Colab shows ipywidgets 8 only with its custom widget manager on."""
    try:
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:
        return
    output.enable_custom_widget_manager()


def prompt_panel(model, images=None, vae=None, **kw) -> PromptPanel:
    """Show a :class:`PromptPanel` in the notebook and return it."""
    from IPython.display import display

    panel = PromptPanel(model, images, vae, **kw)
    display(panel)
    return panel
