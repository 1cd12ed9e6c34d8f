"""Evaluation and pictures: greedy decoding of a validation split, task metrics, previews, plots.

- ``evaluate(params, config, dataset, tokenizer, metric=...)`` and
  ``Evaluator`` (the same with its arguments bound, what ``Trainer.fit``
  calls): greedy decoding of a validation split, the task metric (CIDEr,
  BLEU, VQA accuracy, ANLS, exact match, detection IoU/mAP or your function)
  and previews (image, prompt, prediction, reference) in an ``EvalResult``.
- ``metric_functions()``: the scoring function behind each name of ``METRICS``.
- ``score_shapes``: a model's held-out scores in the synthetic shapes world;
  ``grade_answer``: is one answer about a sample image right (``pali-kit demo``).
- ``draw_previews``: images with their predictions (a matplotlib Figure,
  headless). The loss curve, ``plot_history``, is with ``History`` in ``trainer.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import decode, metrics
from .. import tokenizer as ptok
from ..configs import PaliGemmaConfig
from ..data.batching import eval_batches
from ..data.examples import Example, get_example
from ..data.shapes import ShapesDataset
from ..detection import parse_detections
from ..model import inference_params
from .params import Params

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
    preds = [parse_detections(p, size, size) for p in predictions]
    gts = [parse_detections(e.suffix, size, size) for e in examples]
    ious = []
    for pred, gt in zip(preds, gts):
        for g in gt:
            same = [p.box for p in pred if p.label == g.label]
            ious.append(float(np.max(metrics.box_iou(g.box, np.asarray(same)))) if same else 0.0)
    return {"map": metrics.detection_map(preds, gts)["map"], "mean_iou": _mean(ious)}


def metric_functions() -> dict[str, Callable]:
    """The scoring function of each name in ``METRICS``.

    Each is ``f(predictions, examples, image_size) -> {score name: value}``:
    predictions are decoded strings, examples the ``Example`` they answer
    (references from ``meta["answers"]``/``"references"``, else ``suffix``),
    image_size the model resolution (detection boxes are in model pixels).
    """
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
    fns = metric_functions()
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
    if max_examples is not None:
        dataset = [get_example(dataset, i) for i in range(min(max_examples, len(dataset)))]
    size = config.resolution
    # one array per layer: on CPU views (no copies); on one GPU/TPU a copy of the
    # stacks for this evaluation, which slicing them in every decode step would
    # make anyway (pali_kit.model.accel)
    run_params = inference_params(params)
    predictions, examples, previews = [], [], []
    batches = eval_batches(
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
        fns = metric_functions()
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


def draw_previews(previews: Sequence[Preview], *, cols: int = 4, size: float = 3.0,
                  boxes: bool | None = None):  # fmt: skip
    """Each image with its prompt, prediction and reference (boxes drawn for detections)."""
    from .. import viz

    pictures = []
    for p in previews:
        image = viz.to_pil(p.image)
        found = parse_detections(p.prediction, *image.size)
        if found and boxes is not False:
            image = viz.draw_detections(image, found)
        caption = f"{p.prompt}\n> {p.prediction}\nref: {p.reference}"
        pictures.append(viz.draw_caption(image, caption))
    return viz.show(pictures, cols=cols, size=size)


# ============================================================================ the shapes world


def score_shapes(
    model,
    n: int = 100,
    *,
    seed: int = 12345,
    tasks: Sequence[str] = ("caption", "count", "color", "detect"),
    vae=None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> dict[str, float]:
    """How well a model knows the shapes world: greedy answers on ``n`` scenes per task.

    Scenes come from ``ShapesDataset(seed=seed)`` at the model's resolution
    (the demo model trained on seed 0; 12345 is held out). Scores per task:
    caption / count / color: exact match; detect: the first box has the right
    label and IoU >= 0.5 with the object asked about; segment (needs ``vae``):
    the decoded mask's IoU >= 0.5 with the drawn shape.
    Returns ``{task: fraction}``.
    """
    size = model.resolution
    scores = {}
    for task in tasks:
        ds = ShapesDataset(n, size=size, seed=seed, tasks=[task], vae=vae)
        hits = []
        for start in range(0, n, batch_size):
            chunk = [ds[i] for i in range(start, min(start + batch_size, n))]
            outs = model.generate([e.image for e in chunk], [e.prefix for e in chunk],
                                  max_new_tokens=max_new_tokens)  # fmt: skip
            for ex, out in zip(chunk, outs):
                hits.append(_shape_hit(task, out.text, ex, size, vae))
        scores[task] = float(np.mean(hits))
    return scores


def _shape_hit(task: str, text: str, ex: Example, size: int, vae) -> bool:
    """Is one answer right? (the rules of ``score_shapes``)"""
    if task not in ("detect", "segment"):
        return text.strip() == ex.suffix
    want = ex.meta["objects"][0]
    got = parse_detections(text, size, size)
    if not got or got[0].label != want.label:
        return False
    if task == "detect":
        return float(metrics.box_iou(np.array(got[0].box), np.array(want.box))) >= 0.5
    from ..segmentation import with_masks

    [det] = with_masks(got[:1], vae, size, size)
    return (
        det.binary_mask is not None and float(metrics.mask_iou(det.binary_mask, want.mask)) >= 0.5
    )


def grade_answer(prompt: str, text: str, truth: Mapping) -> bool | None:
    """Is ``text`` the right answer to ``prompt`` about an image with ground truth ``truth``?

    Prompts: ``caption en`` (exact caption), ``answer en how many shapes``
    (exact count), ``answer en what color is the <label>`` (exact colour),
    ``detect <label> [; <label> ...]`` (every asked label that is in the image
    has its first box of that label at IoU >= 0.5 with the true box, the rule
    of ``score_shapes``). Returns None when the truth cannot say (another
    prompt, or no caption known).
    """
    answer = text.strip()
    objects = {o["label"]: o for o in truth["objects"]}
    if prompt == ptok.caption("en"):
        return None if truth.get("caption") is None else answer == truth["caption"]
    if prompt == ptok.answer("how many shapes"):
        return answer == str(truth["count"])
    colour_question = ptok.answer("what color is the x")[:-1]  # the prompt up to the label
    if prompt.startswith(colour_question):
        label = prompt[len(colour_question) :]
        return answer == objects[label]["colour"] if label in objects else None
    if prompt.startswith("detect "):
        width, height = truth["size"]
        found = parse_detections(answer, width, height)
        asked = [label.strip() for label in prompt[len("detect ") :].split(";")]
        present = [label for label in asked if label in objects]
        if not present:
            return None
        for label in present:
            boxes = [d.box for d in found if d.label == label]
            true_box = np.array(objects[label]["box"], np.float64)
            if not boxes or float(metrics.box_iou(np.array(boxes[0]), true_box)) < 0.5:
                return False
        return True
    return None
