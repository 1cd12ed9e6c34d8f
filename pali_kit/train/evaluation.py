"""Evaluation and pictures: greedy decoding of a validation split, task metrics, previews, plots.

- ``evaluate(params, config, dataset, tokenizer, metric=...)`` and
  ``Evaluator`` (the same with its arguments bound, what ``Trainer.fit``
  calls): greedy decoding of a validation split, the task metric (CIDEr,
  BLEU, VQA accuracy, ANLS, exact match, detection IoU/mAP or your function)
  and previews (image, prompt, prediction, reference) in an ``EvalResult``.
- ``plot_history``: the loss curve and the evaluation scores of a ``History``;
  ``draw_previews``: images with their predictions. Both return matplotlib
  Figures (headless).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import decode
from ..configs import PaliGemmaConfig
from ..model import inference_params
from .params import Params

if TYPE_CHECKING:
    from .trainer import History


# ============================================================================ evaluation


@dataclasses.dataclass
class Preview:
    """One validation example and what the model said: image float[S, S, 3] in [-1, 1]."""

    image: np.ndarray
    prompt: str
    prediction: str
    reference: str


@dataclasses.dataclass
class EvalResult:
    """Scores (the first is the main one), every prediction, and a few previews."""

    scores: dict[str, float]
    predictions: list[str]
    examples: list
    previews: list[Preview]
    step: int | None = None

    @property
    def metric(self) -> str:
        return next(iter(self.scores))

    @property
    def score(self) -> float:
        return self.scores[self.metric]

    def draw(self, **kw):
        """The previews as a matplotlib Figure (``draw_previews``)."""
        return draw_previews(self.previews, **kw)


def _references(example) -> list[str]:
    for key in ("answers", "references", "captions"):
        value = example.meta.get(key) if example.meta else None
        if isinstance(value, (list, tuple)) and value:
            return [str(v) for v in value]
    return [example.suffix]


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def _detection_scores(predictions, examples, size: int) -> dict[str, float]:
    """mAP (pycocotools) and mean best IoU per ground-truth box (same label)."""
    from .. import metrics
    from ..detection import parse_detections

    preds = [parse_detections(p, size, size) for p in predictions]
    gts = [parse_detections(e.suffix, size, size) for e in examples]
    ious = []
    for pred, gt in zip(preds, gts):
        for g in gt:
            same = [p.box for p in pred if p.label == g.label]
            ious.append(float(np.max(metrics.box_iou(g.box, np.asarray(same)))) if same else 0.0)
    return {"map": metrics.detection_map(preds, gts)["map"], "mean_iou": _mean(ious)}


def _metric_fns() -> dict[str, Callable]:
    from .. import metrics

    refs = lambda examples: [_references(e) for e in examples]
    return {
        "cider": lambda p, e, s: {"cider": metrics.cider(p, refs(e))},
        "bleu": lambda p, e, s: {"bleu": metrics.bleu(p, refs(e))},
        "vqa": lambda p, e, s: {
            "vqa_accuracy": _mean(metrics.vqa_accuracy(x, r) for x, r in zip(p, refs(e)))
        },
        "anls": lambda p, e, s: {"anls": _mean(metrics.anls(x, r) for x, r in zip(p, refs(e)))},
        "exact_match": lambda p, e, s: {
            "exact_match": _mean(metrics.exact_match(x, r) for x, r in zip(p, refs(e)))
        },
        "detection": _detection_scores,
        "auto": _auto_scores,
    }


METRICS = ("auto", "cider", "bleu", "vqa", "anls", "exact_match", "detection")

# metric="auto": the metric of each task, by the prompt's first word
TASK_METRICS = {
    "caption": "cider", "cap": "cider", "describe": "cider", "ocr": "anls",
    "answer": "vqa", "question": "cider", "detect": "detection",
}  # fmt: skip


def _task_of(example) -> str:
    """An example's task: ``meta["task"]`` if present, else the prompt's first word."""
    task = example.meta.get("task") if example.meta else None
    return str(task) if task else (example.prefix.split() or ["?"])[0]


def _metric_of(example) -> str:
    """The metric ``"auto"`` uses for an example: by its prompt's first word.

    ``answer`` prompts: VQA accuracy when the example has several reference
    answers (``meta["answers"]``), otherwise exact match. Unknown tasks: exact match.
    """
    word = (example.prefix.split() or [""])[0]
    metric = TASK_METRICS.get(word, "exact_match")
    if metric == "vqa" and len(_references(example)) < 2:
        metric = "exact_match"
    return metric


def _auto_scores(predictions, examples, size: int) -> dict[str, float]:
    """Each task scored with its metric; names ``task/metric`` when there are several tasks."""
    fns = _metric_fns()
    groups: dict[tuple[str, str], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((_task_of(ex), _metric_of(ex)), []).append(i)
    scores = {}
    for (task, metric), rows in groups.items():
        part = fns[metric]([predictions[i] for i in rows], [examples[i] for i in rows], size)
        for name, value in part.items():
            scores[name if len(groups) == 1 else f"{task}/{name}"] = value
    return scores


def evaluate(
    params: Params,
    config: PaliGemmaConfig,
    dataset: Sequence,
    tokenizer,
    *,
    metric="cider",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    text_len: int | None = None,
    num_previews: int = 4,
    max_examples: int | None = None,
) -> EvalResult:
    """Greedy-decode a validation split and score it.

    metric: one of ``METRICS`` or ``f(predictions, examples) -> float | dict``;
    ``"auto"`` scores every task with its own metric (``TASK_METRICS``: captions
    CIDEr, answers VQA accuracy or exact match, detections mAP and IoU), named
    ``task/metric`` when the split mixes tasks.
    References: ``example.meta["answers"]`` (or ``"references"``) when present,
    else ``example.suffix``. Detection boxes are compared in model pixels.
    """
    from .. import data

    if max_examples is not None:
        dataset = [data.get_example(dataset, i) for i in range(min(max_examples, len(dataset)))]
    size = config.resolution
    run_params = inference_params(params)  # on CPU: per-layer views, no copies
    predictions, examples, previews = [], [], []
    batches = data.eval_batches(
        dataset, tokenizer, batch_size=batch_size, image_size=size, text_len=text_len
    )
    for batch, exs in batches:
        tokens, _ = decode.generate_tokens(
            config, run_params, batch["image"], batch["text"], batch["mask_input"],
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        for i, ex in enumerate(exs):
            text = tokenizer.decode(tokens[i]).strip()
            predictions.append(text)
            examples.append(ex)
            if len(previews) < num_previews:
                previews.append(Preview(batch["image"][i], ex.prefix, text, ex.suffix))
    if callable(metric):
        scores = metric(predictions, examples)
        scores = dict(scores) if isinstance(scores, Mapping) else {"score": float(scores)}
    else:
        fns = _metric_fns()
        if metric not in fns:
            raise ValueError(f"metric={metric!r}: use one of {METRICS} or a function")
        scores = fns[metric](predictions, examples, size)
    return EvalResult(scores, predictions, examples, previews)


@dataclasses.dataclass
class Evaluator:
    """``evaluate`` with its arguments bound: ``Evaluator(val, tok)(params, config)``."""

    dataset: Sequence
    tokenizer: Any
    metric: Any = "cider"
    batch_size: int = 8
    max_new_tokens: int = 32
    text_len: int | None = None
    num_previews: int = 4
    max_examples: int | None = None

    def __call__(self, params: Params, config: PaliGemmaConfig) -> EvalResult:
        return evaluate(
            params, config, self.dataset, self.tokenizer, metric=self.metric,
            batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            text_len=self.text_len, num_previews=self.num_previews,
            max_examples=self.max_examples,
        )  # fmt: skip


# ============================================================================ pictures


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_history(history: History, *, smooth: int = 10, figsize=(9, 3.2)):
    """Loss per step (raw and a running mean) and the evaluation scores; a Figure (headless)."""
    fig = _figure(figsize)
    ax = fig.add_subplot(1, 2 if history.evals else 1, 1)
    steps, loss = np.asarray(history.step), np.asarray(history.loss, np.float64)
    ax.plot(steps, loss, color="0.75", lw=1, label="loss")
    if len(loss) >= smooth > 1:
        kernel = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1 :], np.convolve(loss, kernel, "valid"), lw=2,
                label=f"mean of {smooth}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right")
    if history.evals:
        ax2 = fig.add_subplot(1, 2, 2)
        for name in history.evals[0][1]:
            points = [(s, d[name]) for s, d in history.evals if name in d]
            ax2.plot(*zip(*points), marker="o", label=name)
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation")
        ax2.legend(loc="lower right")
    fig.tight_layout()
    return fig


def draw_previews(previews: Sequence[Preview], *, cols: int = 4, size: float = 3.0,
                  boxes: bool | None = None):  # fmt: skip
    """Each image with its prompt, prediction and reference (boxes drawn for detections)."""
    from .. import viz
    from ..detection import parse_detections

    pictures = []
    for p in previews:
        image = viz.to_pil(p.image)
        found = parse_detections(p.prediction, *image.size)
        if found and boxes is not False:
            image = viz.draw_detections(image, found)
        caption = f"{p.prompt}\n> {p.prediction}\nref: {p.reference}"
        pictures.append(viz.draw_caption(image, caption))
    return viz.show(pictures, cols=cols, size=size)
