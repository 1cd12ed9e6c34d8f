"""``model.detect`` / ``model.segment``: one call from images + labels to scored objects.

    import pali_kit as pk
    model = pk.load("demo")
    [objects] = model.detect(image, ["circle", "square"])
    objects[0].label, objects[0].box, objects[0].score     # 'circle', (x0, y0, x1, y1), 0.93
    [[seg]] = model.segment(image, ["triangle"])           # seg.mask: bool [H, W]

What happens (per image):
  1. the prompt is built as the reference does: ``detect a ; b`` / ``segment a``;
  2. the answer is decoded with the chosen sampler; with ``constrained=True`` a
     token automaton (``pali_kit.constrain``) masks the logits so that the text
     always parses and names only requested labels;
  3. the text is parsed (``parse_detections``), boxes are in pixels of the
     original image;
  4. every object gets a score from the model's own token probabilities (one
     teacher-forced forward pass over prompt + answer; see ``object_scores``
     and docs/detection_scores.md);
  5. duplicates (same label, box IoU > 0.7) are removed after decoding, the
     higher score wins, unless ``keep_duplicates=True``;
  6. ``segment``: the 16 ``<seg>`` codes are decoded by the mask VQ-VAE into a
     bool mask at the original image size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import constrain, decode, metrics
from . import tokenizer as ptok
from .detection import Detection, parse_detections
from .images import is_array, normalize, read_pixels, resize
from .model import PaliGemma
from .vocab import NUM_LOC

WINDOW = 32  # <loc> bins on each side that count as "the same coordinate" (3 % of a side)
DUPLICATE_IOU = 0.7
_DEFAULT_OBJECTS = 16  # the token budget, when neither max_objects nor max_new_tokens is given


# ----------------------------------------------------------------------------- inputs


def _image_list(images) -> list:
    """One image, a list, or a batch array [B, H, W, C] -> a list of single images."""
    if is_array(images):
        arr = np.asarray(images)
        if arr.ndim == 4:
            return list(arr)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is empty: pass at least one image")
        return list(images)
    return [images]


def _label_sets(labels, n: int) -> list[list[str]]:
    """``labels``: one list for all images, or one list per image -> n checked lists."""
    if isinstance(labels, str):
        return [constrain.check_labels([labels])] * n
    labels = list(labels) if labels is not None else []
    if labels and all(isinstance(x, (list, tuple)) for x in labels):
        if len(labels) != n:
            raise ValueError(
                f"labels has {len(labels)} lists for {n} images: give one list of labels for "
                "all images, or exactly one list per image"
            )
        return [constrain.check_labels(x, f"labels[{i}]") for i, x in enumerate(labels)]
    return [constrain.check_labels(labels)] * n


def resolve_vae(model, vae):
    """``vae``: None (the demo model's own), "demo", a path, or a loaded ``MaskVAE``."""
    from .segmentation import MaskVAE, load_vae

    if isinstance(vae, MaskVAE):
        return vae
    if vae is None:
        if getattr(model, "name", "") in ("pali_kit demo", "random demo-size model"):
            return _demo_vae()
        raise ValueError(
            "segment needs the mask VQ-VAE to turn <seg> codes into masks: pass "
            "vae='path/to/vae-oid.npz' (gs://big_vision/paligemma/vae-oid.npz) or "
            "vae=pk.load_vae(...); the demo model uses vae='demo'"
        )
    return load_vae(vae)


@functools.lru_cache(maxsize=1)
def _demo_vae():
    from .segmentation import load_vae

    return load_vae("demo")


# ----------------------------------------------------------------------------- scores


@functools.lru_cache(maxsize=16)
def _score_fn(config, loc_offset: int, window: int):
    """Compiled: prompt + answer -> per-position (token log-prob, near log-prob), [B, T-1] each."""
    module = PaliGemma(config)
    decode.COMPILES.setdefault("score", 0)

    def fn(params, images, text, mask_ar, mask_input):
        logits = module.apply({"params": params}, images, text, mask_ar, mask_input)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # position t predicts text[t + 1]
        nxt = text[:, 1:]
        tok_lp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
        loc_lp = logp[..., loc_offset : loc_offset + NUM_LOC]  # [B, T-1, 1024]
        b = nxt - loc_offset
        near = jnp.abs(jnp.arange(NUM_LOC) - b[..., None]) <= window
        near_lp = jax.nn.logsumexp(jnp.where(near, loc_lp, -jnp.inf), axis=-1)
        is_loc = (b >= 0) & (b < NUM_LOC)
        return tok_lp, jnp.where(is_loc, near_lp, tok_lp)

    return decode.count_traces(jax.jit(fn), "score")


def token_logprobs(model, pixels, head_ids, answers, *, window: int = WINDOW, chunk: int = 8):
    """Teacher-forced log-probs of the answer tokens under the model (no sampling effects).

    Args:
      pixels: float32 [B, R, R, 3] model input; head_ids: per row the prompt ids
        ([BOS] prompt "\\n"); answers: per row the generated ids (up to EOS).
    Returns:
      two lists of float32 [n_i]: each answer token's log-prob, and its "near"
      log-prob: for a ``<loc>`` token the log of the probability mass within
      ``window`` bins of it, for any other token its log-prob.
    """
    tok = model.tokenizer
    fn = _score_fn(model.config, tok.loc_offset, int(window))
    out_tok, out_near = [], []
    for s in range(0, len(answers), chunk):
        rows = range(s, min(s + chunk, len(answers)))
        lengths = [len(head_ids[i]) + len(answers[i]) for i in rows]
        bb, tt = decode.bucket_batch(len(rows)), decode.bucket_length(max(lengths) + 1)
        text = np.zeros((bb, tt), np.int32)
        mask_ar = np.ones((bb, tt), np.int32)
        mask_input = np.zeros((bb, tt), bool)
        for r, i in enumerate(rows):
            seq = list(head_ids[i]) + list(answers[i])
            text[r, : len(seq)], mask_input[r, : len(seq)] = seq, True
            mask_ar[r, : len(head_ids[i])] = 0
        mask_input[len(rows) :, 0] = True  # padding rows: one real token
        px = decode.pad_rows(pixels[s : s + len(rows)], bb)
        tok_lp, near_lp = (np.asarray(a) for a in fn(model.run_params, px, text, mask_ar,
                                                     mask_input))  # fmt: skip
        for r, i in enumerate(rows):
            h, n = len(head_ids[i]), len(answers[i])
            out_tok.append(tok_lp[r, h - 1 : h - 1 + n])
            out_near.append(near_lp[r, h - 1 : h - 1 + n])
    return out_tok, out_near


def object_spans(tokenizer, answer: Sequence[int]) -> list[tuple[tuple[int, ...], str, list[int]]]:
    """Objects of an answer at the token level: (4 loc bins, label, token positions it owns).

    An object owns the separator tokens before it (the decision to write
    another object), its 4 ``<loc>`` and its label tokens; ``<seg>`` codes are
    not part of the score (they say what the mask looks like, not whether the
    object is there).
    """
    loc0 = tokenizer.loc_offset
    is_loc = [loc0 <= t < loc0 + NUM_LOC for t in answer]
    is_seg = [tokenizer.seg_offset <= t < tokenizer.seg_offset + 128 for t in answer]
    out, i, pending = [], 0, []
    while i < len(answer) and answer[i] != tokenizer.eos_id:
        if i + 4 <= len(answer) and all(is_loc[i : i + 4]):
            owned = pending + list(range(i, i + 4))
            j = i + 4
            while j < len(answer) and is_seg[j]:
                j += 1
            start = j
            while (j < len(answer) and answer[j] != tokenizer.eos_id and not is_loc[j]
                   and not is_seg[j] and ";" not in tokenizer.id_to_piece(answer[j])):  # fmt: skip
                j += 1
            label = " ".join(tokenizer.decode(list(answer[start:j])).split())
            bins = tuple(answer[k] - loc0 for k in range(i, i + 4))
            out.append((bins, label, owned + list(range(start, j))))
            pending, i = [], j
        else:
            pending.append(i)
            i += 1
    return out


def object_scores(tokenizer, answer, near_logprobs) -> dict[tuple, list[float]]:
    """(label, bins) -> scores in [0, 1] of the objects with that key, in order.

    score = exp(sum of the near log-probs of the tokens the object owns): the
    model's probability of writing this object here, with each coordinate
    counted as right within ``WINDOW`` bins (see ``object_spans``).
    """
    found: dict[tuple, list[float]] = {}
    for bins, label, owned in object_spans(tokenizer, answer):
        score = float(np.exp(np.sum(np.asarray(near_logprobs)[owned], dtype=np.float64)))
        found.setdefault((label, bins), []).append(min(max(score, 0.0), 1.0))
    return found


def remove_duplicates(objects: Sequence[Detection], iou: float = DUPLICATE_IOU):
    """Keep, per label, the highest-scoring of any boxes with IoU > ``iou``; order kept."""
    order = sorted(range(len(objects)), key=lambda i: -objects[i].score)
    kept: list[int] = []
    for i in order:
        if all(
            objects[k].label != objects[i].label
            or metrics.box_iou(objects[k].box, objects[i].box) <= iou
            for k in kept
        ):
            kept.append(i)
    return [objects[i] for i in sorted(kept)]


# ----------------------------------------------------------------------------- the task


def run(
    model,
    images,
    labels,
    *,
    task: str = "detect",
    sampler="greedy",
    seed: int = 0,
    max_objects: int | None = None,
    constrained: bool = True,
    keep_duplicates: bool = False,
    vae=None,
    max_new_tokens: int | None = None,
    window: int = WINDOW,
) -> list[list[Detection]]:
    """Detect or segment ``labels`` in ``images``: one list of Detection per image.

    See ``Model.detect`` for the arguments. ``window``: ``<loc>`` bins each side
    counted as the same coordinate in the score.
    """
    tok = model._need_tokenizer()
    if task not in constrain.TASKS:
        raise ValueError(f"task must be one of {constrain.TASKS}, got {task!r}")
    if max_objects is not None and (isinstance(max_objects, bool) or not isinstance(max_objects, int)
                                    or max_objects < 1):  # fmt: skip
        raise ValueError(f"max_objects must be a positive int or None, got {max_objects!r}")
    if task == "segment":
        vae = resolve_vae(model, vae)
    items = _image_list(images)
    sets = _label_sets(labels, len(items))
    raw = [read_pixels(x) for x in items]  # float32 [H, W, 3] on the 0..255 scale
    pixels = np.stack([normalize(resize(px, (model.resolution,) * 2)) for px in raw])
    prompt = ptok.detect if task == "detect" else ptok.segment
    prompts = [prompt(*s) for s in sets]
    c = constrain.build(tok, sets, task=task, max_objects=max_objects)
    if max_new_tokens is None:
        max_new_tokens = c.min_new_tokens + c.tail * ((max_objects or _DEFAULT_OBJECTS) - 1)
    elif constrained and max_new_tokens < c.min_new_tokens:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} cannot hold one {task} object with these labels: "
            f"use at least {c.min_new_tokens} (or None to size it from max_objects)"
        )
    enc = tok.encode_prompts(prompts, text_len=None, bucket=None)
    tokens, _ = decode.generate_tokens(
        model.config, model.run_params, pixels, enc["text"], enc["mask_input"],
        max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
        constraint=c if constrained else None,
    )  # fmt: skip
    answers = []
    for row in tokens:
        n = int(np.flatnonzero(row == tok.eos_id)[0]) + 1 if (row == tok.eos_id).any() else len(row)
        answers.append([int(t) for t in row[:n] if t != decode.PAD_ID])
    heads = [list(np.asarray(t)[np.asarray(m)]) for t, m in zip(enc["text"], enc["mask_input"])]
    _, near = token_logprobs(model, pixels, heads, answers, window=window)
    out = []
    for i, (answer, px) in enumerate(zip(answers, raw)):
        h, w = px.shape[:2]
        out.append(answer_objects(tok, answer, near[i], w, h, sets[i], task=task, vae=vae,
                                  constrained=constrained, keep_duplicates=keep_duplicates,
                                  max_objects=max_objects))  # fmt: skip
    return out


def answer_objects(
    tokenizer, answer: Sequence[int], near_logprobs, width: int, height: int,
    labels: Sequence[str], *, task: str = "detect", constrained: bool = True,
    keep_duplicates: bool = False, max_objects: int | None = None, vae=None,
) -> list[Detection]:  # fmt: skip
    """One answer's token ids (up to EOS) -> its scored objects, as ``run`` returns them.

    ``near_logprobs``: float32 [len(answer)] from ``token_logprobs``; boxes come
    out in pixels of a ``width`` x ``height`` image. Objects get their score,
    unrequested labels are dropped when ``constrained``, duplicates unless
    ``keep_duplicates``; ``segment`` objects get bool [height, width] masks when
    a ``vae`` is given.
    """
    dets = parse_detections(tokenizer.decode(list(answer)), width, height,
                            max_objects=max_objects or 100)  # fmt: skip
    scores = object_scores(tokenizer, answer, near_logprobs)
    dets = [dataclasses.replace(d, score=_take_score(scores, d)) for d in dets]
    if constrained:  # the automaton guarantees this; a cheap check of the guarantee
        dets = [d for d in dets if d.label in labels]
    if not keep_duplicates:
        dets = remove_duplicates(dets)
    if task == "segment" and vae is not None:
        dets = _masks(dets, vae, width, height)
    return dets


def _take_score(scores: dict, det: Detection) -> float:
    """The score of the token-level object with det's label and bins (0.0 if none matches)."""
    y0, x0, y1, x1 = det.loc_tokens
    for bins in ((y0, x0, y1, x1), (y1, x0, y0, x1), (y0, x1, y1, x0), (y1, x1, y0, x0)):
        found = scores.get((det.label, bins))
        if found:
            return found.pop(0)
    return 0.0


def _masks(dets: list[Detection], vae, width: int, height: int) -> list[Detection]:
    """Decode seg codes; ``mask`` and ``binary_mask`` become bool [height, width]."""
    from .segmentation import with_masks

    out = []
    for d in with_masks(dets, vae, width, height):
        mask = d.binary_mask
        out.append(d if mask is None else dataclasses.replace(d, mask=mask))
    return out


# ----------------------------------------------------------------------------- the score experiment


def auc(scores_pos, scores_neg) -> float:
    """P(a random positive scores above a random negative), ties count one half (Mann-Whitney)."""
    pos, neg = np.asarray(scores_pos, np.float64), np.asarray(scores_neg, np.float64)
    if not pos.size or not neg.size:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def score_experiment(
    model, n: int = 100, *, seed: int = 12345, query: str = "all", batch_size: int = 16, **kw
) -> dict[str, float]:
    """Do the scores rank right boxes above wrong ones? Held-out synthetic shapes scenes.

    Scene i is ``data.make_scene(seed, i, model.resolution)`` (the demo model
    trained on seed 0). ``query="all"`` asks for all three shapes in every
    scene (absent ones included, so some answers must be wrong), ``"present"``
    only for the shapes drawn, ``"one"`` for one drawn shape. A box is correct when it has IoU >= 0.5 with the
    not yet matched drawn shape of its label (higher scores matched first); the
    ground truth for AP is the drawn shapes whose label was asked for.
    ``kw`` go to ``run`` (sampler, constrained, window, ...).

    Returns ``auc`` (correct vs wrong boxes), ``ap50`` (COCO AP@0.5 with the
    scores), ``ap50_constant`` (the same boxes, every score 1.0), the mean
    score of correct and wrong boxes, and the counts.
    """
    from . import data

    scenes = [data.make_scene(seed, i, model.resolution) for i in range(n)]
    rng = np.random.default_rng(seed)
    preds, gts, correct, wrong = [], [], [], []
    for s in range(0, n, batch_size):
        chunk = scenes[s : s + batch_size]
        if query == "all":
            labels = [list(rng.permutation(data.SHAPES)) for _ in chunk]
        elif query == "present":
            labels = [[o.label for o in rng.permutation(sc.objects)] for sc in chunk]
        elif query == "one":
            labels = [[sc.objects[int(rng.integers(len(sc.objects)))].label] for sc in chunk]
        else:
            raise ValueError(f'query must be "all", "present" or "one", got {query!r}')
        results = run(model, [sc.image for sc in chunk], labels, **kw)
        for sc, dets, asked in zip(chunk, results, labels):
            gt = {o.label: o.box for o in sc.objects if o.label in asked}
            used: set[str] = set()
            for d in sorted(dets, key=lambda d: -d.score):
                hit = (d.label in gt and d.label not in used
                       and metrics.box_iou(d.box, gt[d.label]) >= 0.5)  # fmt: skip
                if hit:
                    used.add(d.label)
                (correct if hit else wrong).append(d.score)
            preds.append(dets)
            gts.append(list(gt.items()))
    ap = metrics.detection_map(preds, gts)["map50"]
    flat = [[(d.label, d.box, 1.0) for d in dets] for dets in preds]
    ap_constant = metrics.detection_map(flat, gts)["map50"]
    return {
        "auc": auc(correct, wrong),
        "ap50": ap,
        "ap50_constant": ap_constant,
        "mean_score_correct": float(np.mean(correct)) if correct else float("nan"),
        "mean_score_wrong": float(np.mean(wrong)) if wrong else float("nan"),
        "correct": len(correct),
        "wrong": len(wrong),
    }
