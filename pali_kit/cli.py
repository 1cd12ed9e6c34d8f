"""The ``pali-kit`` command.

pali-kit demo                                   the embedded demo model on the sample images
pali-kit generate IMAGE "caption en" [--model demo|NAME|PATH] [--sampler ...]
pali-kit info [NAME]                            registry entries, parameter counts
pali-kit export-hf MODEL FOLDER                 a folder transformers loads
pali-kit finetune TRAIN.jsonl --model M --out DIR   fine-tune (pali_kit/cli_train.py)
pali-kit eval MODEL VAL.jsonl [--json]          task metrics
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    import pali_kit as pk
    from pali_kit import data, viz
    from pali_kit.tokenizer import data_dir

    model = pk.load("demo")
    truths = data.sample_ground_truth()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    marks = {True: "right", False: "WRONG", None: "?"}
    t0, right, graded = time.perf_counter(), 0, 0
    for name, truth in truths.items():
        path = data_dir() / "images" / name
        where = "in the demo's world" if truth["in_domain"] else "OUT of the demo's world"
        print(f"\n{name} ({where})")
        if not truth["in_domain"]:
            print(f"  {truth['about']}")
        results = model.generate(path, _demo_prompts(truth), max_new_tokens=48)
        for r in results:
            ok = data.grade_answer(r.prompt, r.text, truth)
            if truth["in_domain"] and ok is not None:
                right, graded = right + ok, graded + 1
            print(f"  {r.prompt:<36} -> {r.text!r:<52} {marks[ok]}")
        picture = pk.images.load_image(path)
        h, w = picture.shape[:2]
        dets = [d for r in results if r.prompt.startswith("detect ")
                for d in pk.parse_detections(r.text, w, h)[:1]]  # fmt: skip
        drawn = viz.draw_caption(viz.draw_detections(picture, dets), results[0].text)
        target = out / f"{Path(name).stem}_demo.png"
        drawn.save(target)
        print(f"  {len(dets)} boxes drawn -> {target}")
    print(f"\nin-domain images: {right} of {graded} answers right; "
          f"{len(truths)} images in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    _demo_world(model, out)
    return 0


def _demo_prompts(truth) -> list[str]:
    """Caption, count, and for each object its colour and its box (one label per prompt)."""
    from pali_kit import tokenizer as ptok

    labels = [o["label"] for o in truth["objects"]]
    return [
        ptok.caption("en"),
        ptok.answer("how many shapes"),
        *(ptok.answer(f"what color is the {label}") for label in labels),
        *(ptok.detect(label) for label in labels),
    ]


def _demo_world(model, out: Path, n: int = 50) -> None:
    """The demo model in its own world: a segmented synthetic scene, and held-out scores."""
    from pali_kit import data, viz
    from pali_kit.segmentation import load_vae, parse_segments

    vae = load_vae("demo")
    scene = data.make_scene(2024, 0, size=model.resolution, min_shapes=3)
    prompts = [f"segment {o.label}" for o in scene.objects]
    results = model.generate(scene.image, prompts, max_new_tokens=24)
    big = 4 * scene.size  # draw on a nearest-neighbour enlargement, so labels stay legible
    dets = [d for r in results for d in parse_segments(r.text, vae, big, big)[:1]]
    picture = viz.draw_detections(scene.image.repeat(4, 0).repeat(4, 1), dets)
    target = out / "scene_segmentation.png"
    picture.save(target)
    print(f"\na synthetic scene ({scene.caption()}): {len(dets)} masks drawn -> {target}")

    t0 = time.perf_counter()
    tasks = ("caption", "count", "color", "detect", "segment")
    scores = data.score_shapes(model, n, seed=12345, tasks=tasks, vae=vae)
    print(f"held-out synthetic scenes, {n} per task, greedy (exact answer / IoU >= 0.5):")
    print("  " + "  ".join(f"{t} {scores[t]:.0%}" for t in tasks))
    print(f"  ({time.perf_counter() - t0:.1f} s)")


def _generate(args) -> int:
    import pali_kit as pk

    model = pk.load(args.model, dtype=args.dtype)
    if args.stream:
        for piece in model.stream(args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                                  sampler=args.sampler, seed=args.seed):  # fmt: skip
            print(piece, end="", flush=True)
        print()
        return 0
    [out] = model.generate(args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                           sampler=args.sampler, seed=args.seed)  # fmt: skip
    print(out.text)
    return 0


def _info(args) -> int:
    import pali_kit as pk
    from pali_kit.model import count_params

    names = [args.name] if args.name else sorted(pk.CHECKPOINTS)
    for name in names:
        info = pk.configs.checkpoint_info(name)
        n = count_params(pk.param_shapes(info.config)) if args.name else None
        extra = f"  {n:,} params" if n else ""
        print(f"{info.name:<36} {info.resolution:>4} px  text {info.text_len:>3}  "
              f"kaggle {info.kaggle_handle}/{info.kaggle_file}  hf {info.hf_repo}{extra}")  # fmt: skip
    return 0


def _export(args) -> int:
    import pali_kit as pk

    model = pk.load(args.model)
    folder = pk.export_hf(model, args.folder)
    print(f"wrote {folder}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pali-kit", description="PaliGemma on JAX, for notebooks.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the embedded demo model on the sample images")
    d.add_argument("--out", default="out/demo_run", help="where to write the rendered images")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="answer one prompt about one image")
    g.add_argument("image")
    g.add_argument("prompt")
    g.add_argument("--model", default="demo", help="'demo', a pk.CHECKPOINTS name, .npz or folder")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    g.add_argument("--sampler", default="greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--stream", action="store_true")
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", help="list the official checkpoints")
    i.add_argument("name", nargs="?")
    i.set_defaults(func=_info)

    e = sub.add_parser("export-hf", help="write a transformers folder")
    e.add_argument("model")
    e.add_argument("folder")
    e.set_defaults(func=_export)

    from pali_kit import cli_train  # finetune, eval

    cli_train.add_parsers(sub)

    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pali-kit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
