"""The prompt panel: try PaliGemma prompts in a notebook, with no code to write.

    import pali_kit as pk
    model = pk.load("demo")
    pk.widgets.prompt_panel(model)                      # shows the panel (once) and returns it
    panel = pk.widgets.prompt_panel(model)              # the same, keeping it in a variable
    panel = pk.widgets.PromptPanel(model, images=["cat.jpg"], vae=pk.load_vae("vae-oid.npz"))
    panel                                               # a cell ending in the panel shows it

Pick or upload an image, pick a task (caption, detect, ...), fill in the
question or object names, choose a sampler and the weights (float32,
bfloat16, float16, int8, int4: those the device runs), press Run. The answer streams in as
it is produced. The panel shows the exact prompt string the model reads, and the
call that reproduces the run (``model.generate``, or ``model.detect`` /
``model.segment``), so what you learn here carries over to code.

The weights selector makes the chosen weights from the loaded model, in
memory (``model.astype(dtype)`` or ``model.quantize(scheme)``, as the code
line then says; nothing is read from disk), and shows their size. The loaded
model is kept, so the panel holds it and at most one other copy.

Detect and segment run as ``model.detect`` / ``model.segment`` do, streamed:
with "constrained" ticked (the default) the decoder can only write answers that
parse and name only the typed objects (``pali_kit.constrain``); then every
object gets its score in [0, 1] from one teacher-forced pass over the answer
(``tasks.token_logprobs`` + ``tasks.object_scores``, docs/detection_scores.md),
repeated boxes are dropped, and the objects are drawn with their scores
("circle 0.93") and listed in a table. The panel's objects equal what the code
line returns. A free-form prompt whose answer has ``<loc>`` tokens is parsed and
drawn as text, without scores.

The logic is plain Python that tests (and you) can drive without a browser:

    build_prompt("detect", "cat ; dog")       # -> "detect cat ; dog"
    panel.task.value, panel.text.value = "detect", "circle"
    result = panel.run()                      # what the Run button calls
    result.text, result.detections, result.image, result.timing
    result.detections[0].score                # detect/segment: in [0, 1]

Errors are shown in the panel and recorded in ``last_result.error``. Bad input
(an empty question, no image) is the user's to fix: ``run()`` returns the
failed result. Anything else (the model ran out of memory, a bug) is shown,
recorded, and raised again by ``run()`` so that a notebook calling it fails
loudly; the Run button shows it without raising.

Where it is tested: JupyterLab 4.6 with ipywidgets 8.1 (jupyterlab_widgets 3,
ipykernel 7) in headless Chromium 156, clicking through the panel
(``tests/test_browser.py``, ``make test-browser``, which writes the versions it
ran with to ``out/browser/versions.json``), and from Python
(``tests/test_widgets.py``). Colab renders ipywidgets 8 only through its custom
widget manager, which the panel switches on (``google.colab.output.
enable_custom_widget_manager()``) each time it is displayed there; Colab, VS
Code and Kaggle are not covered by the tests. Importing this module needs no
display.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import logging
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
    "WEIGHTS",
    "weight_choices",
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
    "prompt": _Task("free-form prompt", "a prompt", False, "free-form"),
}

SAMPLERS = ("greedy", "temperature(0.7)", "nucleus(0.9)", "top_k(40)", "beam(3)")
DETECTION_TASKS = ("detect", "segment")
WEIGHTS = ("float32", "bfloat16", "float16", "int8", "int4")  # the selector's order
SCHEMES = ("int8", "int4")  # made with model.quantize; the float dtypes with model.astype


def weight_choices(device=None) -> tuple[str, ...]:
    """The weights the panel offers on ``device`` (default: JAX's first device).

    float32, the half-precision dtypes the device computes in (``pk.device_dtype``'s
    rule: a CPU bfloat16, a GPU without bfloat16 units float16, others both), int8, int4.
    """
    from .devices import device_dtype

    if device is None:
        import jax

        device = jax.devices()[0]
    if device.platform == "cpu":
        halves = ("bfloat16",)
    elif device_dtype(device) == "float16":
        halves = ("float16",)
    else:
        halves = ("bfloat16", "float16")
    return ("float32", *halves, *SCHEMES)


def _weights_of(model) -> str | None:
    """ "float32", "bfloat16", ..., "int8", "int4": the model's weights; None for a stand-in
    without ``astype`` / ``quantize``."""
    if not (hasattr(model, "astype") and hasattr(model, "quantize")):
        return None
    return model.quantization or np.dtype(model.dtype).name


def _weight_bytes(model) -> int:
    """Bytes of the model's weights (QArrays: integers + scales)."""
    if model.quantization:
        from .quant import tree_nbytes

        return tree_nbytes(model.params)
    return model.num_params() * np.dtype(model.dtype).itemsize


def _megabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def split_objects(text: str) -> list[str]:
    """``"cat ; dog ;  big  cat ; cat"`` -> ``["cat", "dog", "big cat"]``: object names.

    Whitespace inside a name is collapsed; empty names and repeats are dropped
    (as ``model.detect`` does with its labels).
    """
    names = (" ".join(name.split()) for name in text.split(";"))
    return list(dict.fromkeys(name for name in names if name))


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
        box = TASKS[task].box
        raise ValueError(f"the {task} task needs {TASKS[task].needs}: type it in the {box!r} box")
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
    total_s: float  # until the answer is complete
    num_tokens: int  # generated tokens, EOS not counted
    compiled: bool = False  # True when this run compiled new code
    streamed: bool = True  # False for beam search: the whole answer arrives at once
    score_s: float | None = None  # detect/segment: the scoring pass after the answer

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: the tokens after the first, over the time after the first."""
        if self.num_tokens > 1 and self.total_s > self.first_token_s:
            return (self.num_tokens - 1) / (self.total_s - self.first_token_s)
        return self.num_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        """One line, e.g. ``first token 0.21 s · 12 tokens · 48.3 tokens/s · total 0.44 s``
        (detect/segment add `` · then scoring 0.05 s``: the score pass after the answer)."""
        first = f"first token {self.first_token_s:.2f} s" if self.streamed else "beam search"
        if self.compiled:
            first += " (includes compiling)"
        scores = "" if self.score_s is None else f" · then scoring {self.score_s:.2f} s"
        return (
            f"{first} · {self.num_tokens} tokens · {self.tokens_per_s:.1f} tokens/s "
            f"· total {self.total_s:.2f} s{scores}"
        )


@dataclasses.dataclass
class PanelResult:
    """What one Run produced (``panel.last_result``)."""

    prompt: str = ""
    text: str = ""  # the raw answer, <loc>/<seg> tokens kept as text
    # detect/segment: scored objects (.score in [0, 1]), as model.detect/segment returns
    # them; a free-form answer with <loc> tokens: parsed from the text (.score 1.0)
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


_log = logging.getLogger(__name__)
_STATUS_COLORS = {"info": "#555", "busy": "#b26b00", "ok": "#2e7d32", "error": "#c62828"}


class PromptPanel:
    """An ipywidgets panel to prompt a PaliGemma: image, task, decoding, streamed answer.

    Args:
      model: a ``pk.load(...)`` Model with a tokenizer.
      images: the images offered in the dropdown: a list (paths, arrays, PIL
        images), a dict {name: image}, or None for the kit's sample images.
      vae: a ``pk.load_vae(...)`` mask decoder; with it, segment answers show
        masks. None: the demo VAE for a model that uses the demo tokenizer (the
        demo model), else no masks (segment answers are drawn as boxes).
      max_new_tokens: the slider's starting value.

    The widgets are attributes (``task``, ``text``, ``language``, ``prompt``,
    ``sampler``, ``seed``, ``constrained``, ``max_new_tokens``, ``weights``,
    ``run_button``, ``answer``, ``objects``, ``status``, ``code``, ``footer``, ...),
    so code can set them; ``run()`` does what the Run button does; ``last_result``
    holds the latest ``PanelResult``. ``model`` is the model that runs (the
    weights chosen), ``loaded_model`` the one given.
    Each widget carries a CSS class ``pk-<name>`` (``pk-task``, ``pk-answer``,
    ...) for styling and for browser tests.
    """

    def __init__(self, model, images=None, vae=None, *, max_new_tokens: int = 32):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "the prompt panel needs a model with a tokenizer: pk.load(..., tokenizer=path)"
            )
        self.model, self.loaded_model, self.vae = model, model, vae
        self._loaded_weights = _weights_of(model)  # None: a stand-in, no selector
        self._given_vae = vae is not None  # the code line then names it: vae=vae
        self._demo_tokenizer = _uses_demo_tokenizer(model)  # the demo model: finds its VAE
        self.image: np.ndarray | None = None  # uint8 [H, W, 3], the current image
        self.last_result: PanelResult | None = None
        self._sources = _named_images(images)
        self._settings_seen: set = set()
        self._current: str | None = None  # the dropdown name of ``image``
        self._quiet = False  # True while the panel itself changes the image dropdown
        self._looked_for_vae = vae is not None
        self._shown_by_call = False  # displayed by prompt_panel() in the running cell
        self._make_widgets(max_new_tokens)
        self._connect()
        self._update_task()
        if self._sources:
            self.select_image(next(iter(self._sources)))

    # --- building ------------------------------------------------------------------

    def _make_widgets(self, max_new_tokens: int) -> None:
        # one Layout per widget: a shared one would hide the prompt with the text box
        wide = lambda: W.Layout(width="100%")
        self.image_picker = W.Dropdown(options=list(self._sources), description="image")
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.thumbnail = W.Image(format="png", layout=W.Layout(max_width="256px"))
        self.task = W.Dropdown(
            options=[(t.label, key) for key, t in TASKS.items()], value="caption",
            description="task",
        )  # fmt: skip
        self.text = W.Text(description="text", layout=wide())
        self.language = W.Dropdown(options=ptok.LANGUAGES, value="en", description="language")
        self.prompt = W.Text(description="prompt", disabled=True, layout=wide())
        self.sampler = W.Dropdown(options=SAMPLERS, value="greedy", description="sampler")
        self.seed = W.IntText(value=0, description="seed")
        self.constrained = W.Checkbox(
            value=True, description="constrained", indent=False, layout=W.Layout(width="auto"),
            tooltip="detect/segment: only answers that parse, naming only the typed objects",
        )  # fmt: skip
        self.max_new_tokens = W.IntSlider(
            value=max_new_tokens, min=1, max=256, description="max tokens"
        )
        self.weights = W.Dropdown(options=self._weight_options(), value=self._loaded_weights,
                                  description="weights")  # fmt: skip
        self.weights.disabled = len(self.weights.options) < 2
        self.weights_info = W.HTML()
        if self._loaded_weights is None:
            self.weights.layout.display = "none"
        else:
            self._show_weight_bytes()
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
        for name in ("image_picker", "upload", "thumbnail", "task", "text", "language", "prompt",
                     "sampler", "seed", "constrained", "max_new_tokens", "weights", "weights_info",
                     "run_button", "status", "code", "answer", "result_image", "objects",
                     "footer"):  # fmt: skip
            getattr(self, name).add_class("pk-" + name.replace("_", "-"))
        self._result_box.add_class("pk-result")

    def _connect(self) -> None:
        self.image_picker.observe(self._on_pick, "value")
        self.upload.observe(self._on_upload, "value")
        for widget in (self.task, self.text, self.language, self.sampler, self.seed,
                       self.constrained, self.max_new_tokens):  # fmt: skip
            widget.observe(self._on_setting, "value")
        self.weights.observe(self._on_weights, "value")
        self.run_button.on_click(self._on_run_click)

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
        wrap = lambda: W.Layout(flex_flow="row wrap")  # narrow notebooks: rows wrap
        decoding = W.HBox([self.sampler, self.seed, self.constrained], layout=wrap())
        prompt_column = W.VBox(
            [self.task, self.text, self.language, self.prompt, decoding, self.max_new_tokens,
             W.HBox([self.weights, self.weights_info], layout=wrap()),
             W.HBox([self.run_button, self.status]), self.code],
            layout=W.Layout(flex="1 1 360px", min_width="0"),
        )  # fmt: skip
        box = W.VBox([title, W.HBox([image_column, prompt_column], layout=wrap()), self.answer,
                      self._result_box, self.footer])  # fmt: skip
        box.add_class("pk-panel")
        return box

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self._shown_by_call:  # the value of a cell ending in prompt_panel(): shown already
            self._shown_by_call = False
            return
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

    # --- weights ---------------------------------------------------------------------

    def _weight_options(self) -> list[str]:
        loaded = self._loaded_weights
        if loaded is None:
            return []
        if loaded in SCHEMES:  # integers cannot be made float again without the file
            return [loaded]
        offered = set(weight_choices()) | {loaded}
        return [w for w in WEIGHTS if w in offered]

    def _on_weights(self, change) -> None:
        if self._quiet or change["new"] is None:
            return
        try:
            self.set_weights(change["new"])
        except Exception as error:  # e.g. out of memory: shown; set_weights fell back
            self._set_status(
                f"could not make {change['new']} weights: {error}; running the loaded "
                f"{self._loaded_weights} weights",
                "error",
            )

    def set_weights(self, choice: str) -> None:
        """Run with ``choice`` weights (an entry of ``weights.options``), made from the
        loaded model in memory: ``loaded_model.astype(choice)`` for a float dtype,
        ``loaded_model.quantize(choice)`` for int8 / int4; the loaded ones for its own.
        If making them fails (out of memory), the loaded weights run and the error is raised."""
        if choice not in self.weights.options:
            raise ValueError(
                f"weights {choice!r}: this panel offers {', '.join(self.weights.options)}"
            )
        if choice != _weights_of(self.model):
            self._set_status(f"making {choice} weights from the loaded model...", "busy")
            base = self.model = self.loaded_model  # drop the previous copy before the next
            try:
                if choice in SCHEMES:
                    self.model = base.quantize(choice)
                elif choice != self._loaded_weights:
                    self.model = base.astype(choice)
            except Exception:
                self._select_weights(self._loaded_weights)
                raise
            self._set_status(f"weights: {choice}", "info")
        self._select_weights(choice)

    def _select_weights(self, choice: str) -> None:
        """Show ``choice`` in the selector (without acting on it), its size and code line."""
        self._quiet = True
        try:
            self.weights.value = choice
        finally:
            self._quiet = False
        self._show_weight_bytes()
        self._update_prompt()

    def _show_weight_bytes(self) -> None:
        """The chosen weights' size, and its ratio to the loaded weights'."""
        size, loaded = _weight_bytes(self.model), _weight_bytes(self.loaded_model)
        ratio = "" if self.model is self.loaded_model else (
            f" · {size / loaded:.2f}x the loaded {self._loaded_weights}"
        )  # fmt: skip
        self.weights_info.value = _small(f"{_megabytes(size)} of weights{ratio}")

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
        self.constrained.layout.display = None if self.task.value in DETECTION_TASKS else "none"
        self._update_prompt()

    def _update_prompt(self) -> None:
        """Refresh the read-only prompt and the equivalent code line."""
        self.seed.disabled = self.sampler.value == "greedy" or self.sampler.value.startswith("beam")
        try:
            prompt = build_prompt(self.task.value, self.text.value, self.language.value)
        except ValueError as error:
            self.prompt.value, self.code.value = "", _small(html.escape(str(error)))
            return
        self.prompt.value = prompt
        self.code.value = _code_html(self.code_line(prompt))

    def generate_kwargs(self) -> dict:
        """The decoding settings as ``model.generate`` / ``model.stream`` keywords."""
        return {"max_new_tokens": self.max_new_tokens.value, "sampler": self.sampler.value,
                "seed": self.seed.value}  # fmt: skip

    def code_line(self, prompt: str | None = None) -> str:
        """The call that reproduces the current settings: ``model.generate(...)[0].text``,
        or for detect/segment ``model.detect(...)[0]`` / ``model.segment(...)[0]`` (the
        objects the panel shows)."""
        prompt = self.prompt.value if prompt is None else prompt
        kw = ", ".join(f"{k}={v!r}" for k, v in self.generate_kwargs().items())
        task, model = self.task.value, self._model_expression()
        if task not in DETECTION_TASKS:
            return f"{model}.generate(image, {prompt!r}, {kw})[0].text"
        if not self.constrained.value:
            kw += ", constrained=False"
        if task == "segment" and (self._given_vae or not self._demo_tokenizer):
            kw = "vae=vae, " + kw  # the demo model's segment finds the demo VAE itself
        return f"{model}.{task}(image, {split_objects(self.text.value)!r}, {kw})[0]"

    def _model_expression(self) -> str:
        """``model`` (the loaded model, as given to the panel), or the weights made from it:
        ``model.quantize('int8')``, ``model.astype('bfloat16')``."""
        choice = self.weights.value
        if choice is None or choice == self._loaded_weights:
            return "model"
        return f"model.{'quantize' if choice in SCHEMES else 'astype'}({choice!r})"

    # --- running ---------------------------------------------------------------------

    def run(self) -> PanelResult:
        """Generate an answer with the current settings (what Run does).

        The answer streams into ``answer``; detect/segment objects are scored,
        drawn and listed (as ``model.detect`` / ``model.segment`` return them); the
        timing goes to ``footer``. The previous answer, drawing and timing are
        cleared first. A failure is shown in ``status`` and recorded in
        ``last_result`` (``.error`` set, ``.text`` what came before it): bad
        input found before the model runs (an empty question, no image) is
        returned; any other error is raised again after it is shown, so that
        code calling ``run()`` (a notebook, a test) cannot miss it.
        """
        self.run_button.disabled = True
        self._clear_output()
        try:
            try:
                prompt = build_prompt(self.task.value, self.text.value, self.language.value)
                if self.image is None:
                    raise ValueError("no image: pick one from the dropdown or upload one")
                constraint = self._constraint()
            except ValueError as error:  # bad input: the user fixes it in the panel
                return self._failed(PanelResult(), str(error))
            result = PanelResult(prompt)
            try:
                self._run(result, constraint)
            except Exception as error:
                self._failed(result, f"{type(error).__name__}: {error}")
                raise
            self.last_result = result
            return result
        finally:
            self.run_button.disabled = False

    def _on_run_click(self, _button) -> None:
        """The Run button: like ``run()``, but an error is only shown, not raised.

        Raised from a button callback it would reach only the kernel's log; the
        panel shows it and ``last_result.error`` records it; the traceback is logged.
        """
        try:
            self.run()
        except Exception:
            _log.exception("the prompt panel's run failed")

    def _clear_output(self) -> None:
        self.answer.value, self.footer.value, self.objects.value = "", "", ""
        self.result_image.value = b""
        self._result_box.layout.display = "none"

    def _failed(self, result: PanelResult, message: str) -> PanelResult:
        result.text, result.error = self.answer.value, message
        self._set_status(message, "error")
        self.last_result = result
        return result

    def _constraint(self):
        """The automaton for detect/segment with "constrained" ticked, else None.

        Raises ValueError (the user's to fix) when the object names cannot be
        constrained or "max tokens" cannot hold one object.
        """
        task = self.task.value
        if task not in DETECTION_TASKS or not self.constrained.value:
            return None
        from . import constrain  # JAX: imported only when needed

        c = constrain.build(self.model.tokenizer, [split_objects(self.text.value)], task=task)
        if self.max_new_tokens.value < c.min_new_tokens:
            raise ValueError(
                f"max tokens is {self.max_new_tokens.value} but one {task} object with these "
                f"names needs up to {c.min_new_tokens} tokens: raise 'max tokens' to at least "
                f"{c.min_new_tokens}, or untick 'constrained'"
            )
        return c

    def _run(self, result: PanelResult, constraint) -> None:
        image, kw = self.image, self.generate_kwargs()
        self._announce(kw)
        note = ""
        if self.task.value in DETECTION_TASKS:
            note = self._detect(result, image, kw, constraint)
        else:
            result.text, result.timing = self._generate(image, result.prompt, kw)
            if "<loc" in result.text:  # a free-form prompt answered with boxes: draw the text
                vae = self._vae() if "<seg" in result.text else self.vae
                result.detections, result.image = render_answer(image, result.text, vae)
                self._show_detections(result, scored=False)
        if any(d.seg_codes is not None and d.mask is None for d in result.detections):
            note += " · no masks: give the panel a VAE, PromptPanel(model, vae=pk.load_vae(...))"
        self.footer.value = _small(html.escape(result.timing.summary()))
        self._set_status("done" + note, "ok")

    def _detect(self, result: PanelResult, image, kw: dict, constraint) -> str:
        """Detect/segment as ``model.detect`` / ``model.segment`` do, streamed into ``answer``.

        The same inputs, decoder and constraint as ``pali_kit.tasks.run``, one
        token at a time (beam search: whole); then the score pass, the objects
        (``tasks.answer_objects``) and their drawing. Returns a note for the status.
        """
        from . import decode, tasks  # JAX: imported only when needed

        model, tok, task = self.model, self.model.tokenizer, self.task.value
        compiles, start = decode.compile_count(), time.perf_counter()
        pixels = model.preprocess(image)  # float32 [1, R, R, 3]
        enc = tok.encode_prompts([result.prompt], text_len=None, bucket=None)  # as tasks.run
        args = (model.config, model.run_params, pixels, enc["text"], enc["mask_input"])
        beam, first = kw["sampler"].startswith("beam"), None
        answer: list[int] = []  # token ids up to and including EOS
        if beam:
            tokens, _ = decode.generate_tokens(*args, **kw, constraint=constraint)
            answer = _up_to_eos(tokens[0], tok.eos_id)
        else:
            for step, _ in decode.iter_tokens(*args, **kw, constraint=constraint):
                if first is None:
                    first = time.perf_counter() - start
                    self._set_status("generating...", "busy")
                if int(step[0]) == decode.PAD_ID:
                    break
                answer.append(int(step[0]))
                text = tok.decode(answer)
                if not text.endswith("\ufffd"):  # half of a multi-byte character: wait
                    self.answer.value = text
                if answer[-1] == tok.eos_id:
                    break
        self.answer.value = result.text = tok.decode(answer)
        total = time.perf_counter() - start
        self._set_status("scoring...", "busy")
        head = [int(t) for t in enc["text"][0][enc["mask_input"][0]]]
        _, near = tasks.token_logprobs(model, pixels, [head], [answer])
        height, width = image.shape[:2]
        result.detections = tasks.answer_objects(
            tok, answer, near[0], width, height, split_objects(self.text.value), task=task,
            constrained=constraint is not None, vae=self._vae() if task == "segment" else None,
        )  # fmt: skip
        result.timing = Timing(
            first_token_s=total if first is None else first, total_s=total,
            num_tokens=sum(t != tok.eos_id for t in answer),
            compiled=decode.compile_count() > compiles, streamed=not beam,
            score_s=time.perf_counter() - start - total,
        )  # fmt: skip
        result.image = viz.draw_detections(
            image, result.detections, captions=[f"{d.label} {_score_text(d.score)}"
                                                for d in result.detections]
        )  # fmt: skip
        self._show_detections(result, scored=True)
        dropped = len(parse_detections(result.text, width, height)) - len(result.detections)
        return f" · {dropped} repeated box(es) dropped (same label, IoU > 0.7)" if dropped else ""

    def _vae(self):
        """The mask VAE: the one given, else the demo VAE for a model with the demo tokenizer."""
        if not self._looked_for_vae:
            self._looked_for_vae = True
            if self._demo_tokenizer:
                from .segmentation import load_vae

                try:
                    self.vae = load_vae("demo")
                except FileNotFoundError as error:  # a kit installed without its data
                    _log.warning("no masks: %s", error)
        return self.vae

    def _announce(self, kw: dict) -> None:
        """Say what is about to happen: the first run (of new settings) compiles."""
        key = (kw["sampler"], kw["max_new_tokens"], self.weights.value)
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

    def _show_detections(self, result: PanelResult, scored: bool) -> None:
        self.result_image.value = _png(result.image, 512)
        self.objects.value = _detections_table(result.detections, scored)
        self._result_box.layout.display = None

    def _set_status(self, message: str, kind: str = "info") -> None:
        color = _STATUS_COLORS[kind]
        icon = "⚠ " if kind == "error" else ""
        self.status.value = f'<span style="color:{color}">{icon}{html.escape(message)}</span>'


def _small(content: str) -> str:
    return f'<small style="color:#555">{content}</small>'


def _code_html(line: str) -> str:
    """The code line as HTML: one click selects all of it (user-select: all), to copy."""
    return (
        '<small style="color:#555">code: <code class="pk-code-line" style="user-select:all" '
        f'title="click to select, then copy">{html.escape(line)}</code></small>'
    )


def _uses_demo_tokenizer(model) -> bool:
    """True when the model reads the demo tokenizer's file (the demo model does)."""
    path = getattr(model.tokenizer, "path", None)
    try:
        demo = ptok.Tokenizer.demo().path
    except FileNotFoundError:
        return False
    return path is not None and Path(path).resolve() == Path(demo).resolve()


def _up_to_eos(tokens, eos_id: int) -> list[int]:
    """int32[T] generated ids -> a list up to and including the first EOS (PAD dropped)."""
    out = []
    for t in (int(t) for t in tokens):
        if t != 0:  # PAD
            out.append(t)
        if t == eos_id:
            break
    return out


def _score_text(score: float) -> str:
    """``0.93``; a score under 0.01 as ``3e-05`` (two decimals would say 0.00)."""
    return f"{score:.2f}" if score >= 0.01 or score == 0 else f"{score:.0e}"


def _detections_table(detections: list[Detection], scored: bool = False) -> str:
    """An HTML table: label, score (``scored``), box in pixels, whether a mask was decoded."""
    if not detections:
        return _small("no objects in the answer (no &lt;loc&gt; tokens)")

    def row(d: Detection) -> str:
        label = html.escape(d.label) or "&nbsp;"
        score = f"<td>{_score_text(d.score)}</td>" if scored else ""
        box = ", ".join(f"{v:.0f}" for v in d.box)
        mask = "mask" if d.mask is not None else ("codes, no VAE" if d.seg_codes else "")
        return f"<tr><td>{label}</td>{score}<td>({box})</td><td>{mask}</td></tr>"

    rows = "".join(row(d) for d in detections)
    score = "<th>score</th>" if scored else ""
    head = f"<tr><th>label</th>{score}<th>box x0, y0, x1, y1 (px)</th><th></th></tr>"
    return f'<table style="border-spacing:10px 2px">{head}{rows}</table>'


def _enable_colab_widgets() -> None:
    """Colab shows ipywidgets 8 only with its custom widget manager on."""
    try:
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:
        return
    output.enable_custom_widget_manager()


def prompt_panel(model, images=None, vae=None, **kw) -> PromptPanel:
    """Show a :class:`PromptPanel` in the notebook and return it.

    A cell ending in this call shows one panel: the returned panel does not
    show itself again as the cell's value (in a later cell, ``panel`` does).
    """
    from IPython import get_ipython
    from IPython.display import display

    panel = PromptPanel(model, images, vae, **kw)
    display(panel)
    shell = get_ipython()
    if shell is not None:
        panel._shown_by_call = True

        def forget(*_) -> None:  # after the cell: `panel` alone shows it again
            panel._shown_by_call = False
            shell.events.unregister("post_run_cell", forget)

        shell.events.register("post_run_cell", forget)
    return panel
