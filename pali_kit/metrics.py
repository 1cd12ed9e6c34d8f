"""Metrics for PaliGemma tasks: boxes and masks, COCO mAP, VQA, ANLS, BLEU, CIDEr-D.

    from pali_kit import metrics
    metrics.box_iou([0, 0, 10, 10], [5, 0, 15, 10])              # 0.333...
    metrics.detection_map(pred_dets_per_image, gt_dets_per_image)  # {"map": .., "map50": .., "map75": ..}
    metrics.precision_recall(pred_dets_per_image, gt_dets_per_image)  # {"recall": [101], "precision": [101]}
    metrics.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7)               # 0.9 (3 of 10 humans)
    metrics.anls("hello world", ["Hello world!"])                  # 0.917
    metrics.cider(["a cat", "a dog"], [["a cat"], ["a dog"]])      # 5.0, corpus CIDEr-D

Each function scores plain Python values, so it works on the output of any
decoder. Optional dependencies are imported when used: ``pycocotools``
(``detection_map``) and ``sacrebleu`` (``bleu``).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- boxes and masks


def box_iou(a, b) -> np.ndarray:
    """IoU of boxes (x0, y0, x1, y1); shapes [..., 4] broadcast against each other.

    ``box_iou(a[:, None], b[None])`` gives the [N, M] matrix. Returns float64
    [...]; 0 where the union is empty (two zero-area boxes).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = _area(a) + _area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _area(box: np.ndarray) -> np.ndarray:
    return np.clip(box[..., 2] - box[..., 0], 0, None) * np.clip(box[..., 3] - box[..., 1], 0, None)


def mask_iou(a, b) -> np.ndarray:
    """IoU of masks [..., H, W] (broadcasting); float masks count where > 0.5.

    Returns float64 [...]; 0 where both masks are empty.
    """
    a, b = _as_bool(a), _as_bool(b)
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _as_bool(mask) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask > 0.5


# ----------------------------------------------------------------------------- COCO mAP


def detection_map(
    predictions: Sequence[Iterable[Any]],
    ground_truths: Sequence[Iterable[Any]],
    *,
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO box mAP with pycocotools (``pip install pycocotools``).

    Args:
      predictions: one list per image of Detection-like objects (``.label``,
        ``.box`` (x0, y0, x1, y1) pixels, optional ``.score``) or tuples
        ``(label, box)`` / ``(label, box, score)``. ``Model.detect`` /
        ``Model.segment`` give each object a score (the model's probability of
        it, docs/detection_scores.md), which COCO uses to rank. Parsed text has
        none: the score defaults to 1.0, all predictions tie, and COCO ranks
        ties in the given order (a stable sort), so mAP then measures the set
        of boxes, not a ranking.
      ground_truths: one list per image, same forms (scores ignored).
      max_detections: COCO's maxDets for the reported numbers.
    Returns:
      ``{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75}``; categories
      are the labels (exact strings). NaN when there is no ground-truth box.
    """
    ev = _coco_eval(predictions, ground_truths, max_detections)
    if ev is None or isinstance(ev, float):
        value = math.nan if ev is None else ev
        return {"map": value, "map50": value, "map75": value}
    return {"map": _coco_stat(ev.stats[0]), "map50": _coco_stat(ev.stats[1]),
            "map75": _coco_stat(ev.stats[2])}  # fmt: skip


def precision_recall(
    predictions: Sequence[Iterable[Any]],
    ground_truths: Sequence[Iterable[Any]],
    *,
    iou: float = 0.5,
    max_detections: int = 100,
) -> dict[str, np.ndarray]:
    """COCO's precision-recall curve at one IoU threshold, ranked by the scores.

    Same inputs as ``detection_map``; ``iou`` is one of COCO's thresholds
    0.5, 0.55, ..., 0.95. Returns ``{"recall": float64 [101] (0, 0.01, ..., 1),
    "precision": float64 [101]}``: COCO's interpolated precision at each recall
    (0 past the highest recall reached), averaged over the labels with ground
    truth. Its mean over the recall points is AP at this IoU (``map50`` for 0.5).
    No ground truth: NaN; no predictions: 0.
    """
    thresholds = np.linspace(0.5, 0.95, 10)
    k = int(np.argmin(np.abs(thresholds - iou)))
    if abs(thresholds[k] - iou) > 1e-9:
        raise ValueError(f"iou must be one of COCO's thresholds 0.5, 0.55, ..., 0.95, got {iou}")
    recall = np.linspace(0.0, 1.0, 101)
    ev = _coco_eval(predictions, ground_truths, max_detections)
    if ev is None or isinstance(ev, float):
        value = math.nan if ev is None else ev
        return {"recall": recall, "precision": np.full(101, value)}
    p = ev.eval["precision"][k, :, :, 0, -1]  # [recall 101, label K]; -1: label without GT
    # Labels that only occur in predictions have no curve (-1); every recall row has
    # at least one label with ground truth (else _coco_eval returned None).
    precision = np.nanmean(np.where(p < 0, np.nan, p), axis=1)
    return {"recall": recall, "precision": precision}


def _coco_eval(predictions, ground_truths, max_detections):
    """A finished COCOeval (bbox), or None (no ground truth) or 0.0 (no predictions)."""
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} prediction lists for {len(ground_truths)} images")
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("detection_map needs pycocotools: pip install pycocotools") from e

    preds = [[_as_box_tuple(o) for o in image] for image in predictions]
    gts = [[_as_box_tuple(o) for o in image] for image in ground_truths]
    labels = sorted({label for image in preds + gts for label, _, _ in image})
    cat = {label: i + 1 for i, label in enumerate(labels)}
    gt_anns = [
        _coco_ann(img, cat[label], box) | {"iscrowd": 0}
        for img, image in enumerate(gts)
        for label, box, _ in image
    ]
    for i, ann in enumerate(gt_anns):
        ann["id"] = i + 1  # COCO annotation ids start at 1
    if not gt_anns:
        return None
    dt_anns = [
        _coco_ann(img, cat[label], box) | {"score": score}
        for img, image in enumerate(preds)
        for label, box, score in image
    ]
    if not dt_anns:
        return 0.0

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": i} for i in range(len(gts))],
            "categories": [{"id": c, "name": n} for n, c in cat.items()],
            "annotations": gt_anns,
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_anns)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = [1, 10, max_detections]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _as_box_tuple(obj) -> tuple[str, tuple[float, ...], float]:
    """Detection-like or (label, box[, score]) -> (label, box, score)."""
    if hasattr(obj, "box"):
        return str(obj.label), tuple(map(float, obj.box)), float(getattr(obj, "score", 1.0))
    score = float(obj[2]) if len(obj) > 2 else 1.0
    return str(obj[0]), tuple(map(float, obj[1])), score


def _coco_ann(image_id: int, category_id: int, box) -> dict[str, Any]:
    """(x0, y0, x1, y1) -> a COCO annotation with an (x, y, w, h) bbox."""
    x0, y0, x1, y1 = box
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    return {"image_id": image_id, "category_id": category_id, "bbox": [x0, y0, w, h], "area": w * h}


def _coco_stat(value: float) -> float:
    """COCO writes -1 for "no ground truth in this setting"."""
    return math.nan if value < 0 else float(value)


# ----------------------------------------------------------------------------- VQA

# Answer normalisation of the official VQA evaluation (visualqa.org/evaluation.html),
# written from its description: punctuation, full stops, number words, articles
# and missing apostrophes in contractions.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern, kept as is
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
# Contractions written without apostrophe -> with it (the official list).
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd"
        " he's how'd how'll how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't"
        " must've needn't o'clock oughtn't shan't should've shouldn't that's there'd there're"
        " there's they'd they'll they're they've wasn't we've weren't what'll what're what's"
        " what've when's where'd where's where've who'd who'll who's who've why'll why're why's"
        " won't would've wouldn't y'all you'd you'll you're you've somebody's someone'd"
        " someone'll someone's something'll"
    ).split()
}
_CONTRACTIONS.update({
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hed've": "he'd've", "he'dve": "he'd've", "Id've": "I'd've",
    "I'dve": "I'd've", "itd've": "it'd've", "it'dve": "it'd've", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "notve": "not've", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the official table maps this one backwards
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "thered've": "there'd've",
    "there'dve": "there'd've", "theyd've": "they'd've", "they'dve": "they'd've", "twas": "'twas",
    "wed've": "we'd've", "we'dve": "we'd've", "whod've": "who'd've", "who'dve": "who'd've",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd've": "you'd've", "you'dve": "you'd've",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
})  # fmt: skip


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation.

    Punctuation is removed (or, when it touches no space and the text has no
    "digit,digit", replaced by a space), full stops not inside a number are
    dropped, then the text is lower-cased and split into words; number words
    become digits, articles go, and contractions get their apostrophe back.
    E.g. ``"Two dogs!"`` -> ``"2 dogs"``, ``"the cat's toy."`` -> ``"cat's toy"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    no_space_rule = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        if no_space_rule or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(
    prediction: str, answers: Sequence[str], *, always_normalize: bool = False
) -> float:
    """VQAv2 accuracy of one answer against the human answers (10 in VQAv2).

    ``min(#humans who gave the answer / 3, 1)``: an answer counts as fully
    right once 3 humans gave it. With 10 answers it is averaged over the 10
    ways of leaving one human out, as the official evaluation does (so 3 of 10
    gives 0.9, not 1.0); with another number of answers the plain formula is
    used (as big_vision's OK-VQA evaluator does). With a single reference
    answer use ``exact_match``.

    Normalisation follows the official script: whitespace is always
    stripped; ``normalize_vqa_answer`` is applied to the prediction and the
    answers only when the humans disagree (a quirk of the official code: "Two"
    scores 0 against ten "2"). ``always_normalize=True`` normalises in every
    case, which is kinder to small hand-made data sets but not the official number.
    """
    answers = [_strip_space(a) for a in answers]
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    prediction = _strip_space(prediction)
    if always_normalize or len(set(answers)) > 1:
        prediction = normalize_vqa_answer(prediction)
        answers = [normalize_vqa_answer(a) for a in answers]
    matches = np.array([a == prediction for a in answers])
    if len(answers) != 10:
        return float(min(matches.sum() / 3.0, 1.0))
    return float(np.mean([min(np.delete(matches, i).sum() / 3.0, 1.0) for i in range(10)]))


def _strip_space(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def exact_match(
    prediction: str, answers: str | Sequence[str], *, ignore_case: bool = False
) -> float:
    """1.0 if the prediction equals one of the answers (after ``strip``), else 0.0."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    norm = (lambda s: s.strip().lower()) if ignore_case else str.strip
    return float(any(norm(prediction) == norm(a) for a in answers))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA, ST-VQA).

    For each reference: ``nl = levenshtein / max(len(pred), len(ref))`` on
    lower-cased, whitespace-collapsed strings; score ``1 - nl`` if
    ``nl < threshold`` else 0. Returns the best score over the references (an
    empty reference scores 1 only for an empty prediction). Average over the
    questions for the dataset's ANLS.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in answers:
        ref = " ".join(ref.lower().split())
        if not ref or not pred:
            score = float(ref == pred)
        else:
            nl = levenshtein(pred, ref) / max(len(pred), len(ref))
            score = 1.0 - nl if nl < threshold else 0.0
        best = max(best, score)
    return best


# ----------------------------------------------------------------------------- captions


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], **kw) -> float:
    """Corpus BLEU-4 (0..100) with sacreBLEU (``pip install sacrebleu``).

    Args:
      predictions: one caption per example.
      references: one list of reference captions per example (any number).
      kw: passed to ``sacrebleu.corpus_bleu`` (e.g. ``lowercase=True``).

    sacreBLEU's default 13a tokenisation differs from the COCO caption
    toolkit's PTB tokenisation, so numbers are close to, not equal to, COCO
    BLEU-4 papers report.
    """
    try:
        import sacrebleu
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("bleu needs sacrebleu: pip install sacrebleu") from e
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    n_refs = max((len(r) for r in references), default=0)
    # sacreBLEU takes reference *streams*; None pads examples with fewer references.
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams, **kw).score)


# Punctuation tokens the COCO caption toolkit drops after PTB tokenisation.
_PTB_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";",
              "(", ")", "[", "]", "{", "}"}  # fmt: skip
_TOKEN_RE = re.compile(
    r"\d+(?:[.,]\d+)+"  # 3.5, 1,000
    r"|\w+(?=n't\b)|n't\b"  # don't -> do n't
    r"|'(?:s|re|ve|ll|d|m)\b"  # dog's -> dog 's
    r"|\w+(?:-\w+)*"  # words, hyphenated words
    r"|\.\.\.|--|[^\w\s]"  # punctuation
)


def caption_tokens(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped, clitics split ("don't" -> "do n't").

    A pure-Python stand-in for the COCO toolkit's Java PTBTokenizer; identical
    on ordinary captions.
    """
    text = text.lower()
    return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _PTB_PUNCT]


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    return Counter(
        tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1)
    )


def cider(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    sigma: float = 6.0,
    per_example: bool = False,
):
    """Corpus CIDEr-D (x10 scale, as the COCO caption toolkit's "CIDEr").

    Args:
      predictions: one caption per example.
      references: one list of reference captions per example.
      sigma: width of the Gaussian length penalty.
      per_example: also return the per-example scores.

    For each n in 1..4: tf-idf vectors of n-grams, with document frequencies
    over the reference sets of the whole corpus and ``idf = log(N) - log(df)``
    (N = number of examples); the similarity to each reference is
    ``sum_g min(p_g, r_g) r_g / (|p| |r|)`` (the "-D" clipping) times
    ``exp(-delta^2 / (2 sigma^2))``, where delta is the difference in length
    measured, as in the toolkit, in number of bigrams. Scores are averaged over
    n and over the references and multiplied by 10. Because of the idf, CIDEr
    of a single example is always 0; score a whole split at once.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    hyps = [_ngrams(caption_tokens(p)) for p in predictions]
    refs = [[_ngrams(caption_tokens(r)) for r in rs] for rs in references]
    doc_freq = Counter(g for rs in refs for g in set().union(*[set(r) for r in rs]))
    log_n = math.log(max(len(refs), 1))

    def tfidf(counts: Counter):
        vec = [dict() for _ in range(4)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, doc_freq[g])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, norms, length

    scores = []
    for hyp, rs in zip(hyps, refs):
        vh, nh, lh = tfidf(hyp)
        total = np.zeros(4)
        for r in rs:
            vr, nr, lr = tfidf(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for n in range(4):
                dot = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                if nh[n] and nr[n]:
                    dot /= nh[n] * nr[n]
                total[n] += dot * penalty
        scores.append(10.0 * float(total.mean()) / max(len(rs), 1))
    score = float(np.mean(scores)) if scores else 0.0
    return (score, scores) if per_example else score
