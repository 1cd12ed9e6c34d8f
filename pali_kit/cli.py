"""The ``pali-kit`` command.

pali-kit demo                                   the embedded demo model on the sample images
pali-kit generate IMAGE "caption en" [--model demo|NAME|PATH] [--sampler ...]
    demo, generate, eval: [--dtype float32|bfloat16|float16] [--quantize int8|int4]
    finetune: [--frozen-dtype D] [--quantize int8|int4] (the frozen weights)
pali-kit info [NAME]                            registry entries, parameter counts
pali-kit export-hf MODEL FOLDER [--force]       a folder transformers loads
pali-kit finetune TRAIN.jsonl --model M --out DIR   fine-tune (pali_kit/cli_train.py)
pali-kit eval MODEL VAL.jsonl [--json]          task metrics

Answers go to stdout, status lines to stderr. Every failure is one line on
stderr, ``pali-kit: error: ...``, and exit status 2 (the command line is wrong:
a usage error, an unknown model name, a bad option value or image) or 1 (it
failed while running: a missing or broken checkpoint, no credentials, ...).
``--debug`` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .atomic import atomic_write
from .cli_args import add_weight_args


def _demo(args) -> int:
    import pali_kit as pk
    from pali_kit import data, viz

    model = _load("demo", args.dtype, args.quantize)
    truths = data.sample_ground_truth()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    marks = {True: "right", False: "WRONG", None: "?"}
    t0, right, graded = time.perf_counter(), 0, 0
    for name, truth in truths.items():
        path = pk.asset_dir() / "images" / name
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
        with atomic_write(target) as f:
            drawn.save(f, format="PNG")
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
    with atomic_write(target) as f:
        picture.save(f, format="PNG")
    print(f"\na synthetic scene ({scene.caption()}): {len(dets)} masks drawn -> {target}")

    t0 = time.perf_counter()
    tasks = ("caption", "count", "color", "detect", "segment")
    scores = data.score_shapes(model, n, seed=12345, tasks=tasks, vae=vae)
    print(f"held-out synthetic scenes, {n} per task, greedy (exact answer / IoU >= 0.5):")
    print("  " + "  ".join(f"{t} {scores[t]:.0%}" for t in tasks))
    print(f"  ({time.perf_counter() - t0:.1f} s)")


def _status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _load(source, dtype=None, quantize=None, weights_cache=None):
    import pali_kit as pk

    # verbose: the model's status line, and what the weights cache does, on stderr
    return pk.load(source, dtype=dtype, quantize=quantize, verbose=True,
                   weights_cache=weights_cache)  # fmt: skip


def _generate(args) -> int:
    model = _load(args.model, args.dtype, args.quantize, args.weights_cache)
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

    check_export_folder(Path(args.folder), args.force)
    model = _load(args.model)
    folder = pk.export_hf(model, args.folder)
    print(folder)
    _status(f"wrote a transformers folder: {folder}")
    return 0


_EXPORT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def check_export_folder(folder: Path, force: bool = False) -> None:
    """Refuse a target that is a file, or a non-empty folder that is not an earlier export.

    An earlier export holds only config.json (a PaliGemma one) and model*.safetensors
    (+ index); writing over it is allowed. Anything else needs ``--force``.
    """
    from pali_kit.errors import ExportFolderError

    if folder.exists() and not folder.is_dir():
        raise ExportFolderError(
            f"export-hf: {folder} is a file, not a folder: give the path of a new or empty folder"
        )
    if not folder.is_dir() or force:
        return
    entries = sorted(p.name for p in folder.iterdir())
    others = [n for n in entries if n not in _EXPORT_FILES and not _is_shard(n)]
    if not entries or (not others and _is_paligemma_config(folder / "config.json")):
        return
    shown = ", ".join((others or entries)[:4]) + (" ..." if len(others or entries) > 4 else "")
    raise ExportFolderError(
        f"export-hf: {folder} is not empty and is not an earlier pali-kit export (it holds "
        f"{shown}); nothing was written. Choose a new or empty folder, or pass --force to "
        "write config.json and model*.safetensors into it (other files are kept)"
    )


def _cache(args) -> int:
    from pali_kit import weights_cache

    if args.dir is not None:
        folder = Path(args.dir).expanduser()
    else:  # where pk.load keeps it (PALI_KIT_WEIGHTS_CACHE may name a folder)
        folder = weights_cache.resolve_dir(None) or weights_cache.default_dir()
    found = weights_cache.entries(folder)
    total = sum(e["bytes"] for e in found)
    if args.clear:
        removed = weights_cache.clear(folder)
        print(f"removed {len(removed)} file(s), {total / 1e9:.2f} GB of weights caches, "
              f"from {folder}")  # fmt: skip
        return 0
    for e in found:
        gone = "" if e["checkpoint_exists"] else "  (checkpoint gone)"
        print(f"{e['bytes'] / 1e9:8.2f} GB  {e['file'].name}  <- {e['checkpoint']}{gone}")
    print(f"{len(found)} weights cache(s), {total / 1e9:.2f} GB, in {folder}")
    return 0


def _is_shard(name: str) -> bool:
    return name.startswith("model-") and "-of-" in name and name.endswith(".safetensors")


def _is_paligemma_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("model_type") == "paligemma"
    except (OSError, ValueError, AttributeError):
        return False


class UsageError(Exception):
    """A command line argparse cannot parse (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit; we print one line
        raise UsageError(f"{message} (see {self.prog} --help)")


def _one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def exit_status(error: BaseException) -> int:
    """2 when the command line is wrong (usage, an argument's value, an export target that
    needs --force), 1 when running failed."""
    from pali_kit.errors import ArgumentError, ArgumentTypeError, ExportFolderError

    usage = (UsageError, ArgumentError, ArgumentTypeError, ExportFolderError)
    return 2 if isinstance(error, usage) else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("pali-kit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        from pali_kit.errors import PaliKitError

        known = isinstance(error, (PaliKitError, UsageError, OSError, ValueError, TypeError))
        where = "" if known else f"unexpected {type(error).__name__}: "
        hint = "" if known else " (run with --debug for the traceback)"
        print(f"pali-kit: error: {where}{_one_line(error)}{hint}", file=sys.stderr)
        return exit_status(error)


def build_parser() -> argparse.ArgumentParser:
    """The ``pali-kit`` argument parser; subcommands are registered here."""
    ap = _Parser(
        prog="pali-kit",
        description="PaliGemma on JAX, for notebooks. Add --debug anywhere for tracebacks.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the embedded demo model on the sample images")
    d.add_argument("--out", default="out/demo_run", help="where to write the rendered images")
    add_weight_args(d)
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="answer one prompt about one image")
    g.add_argument("image")
    g.add_argument("prompt")
    g.add_argument("--model", default="demo", help="'demo', a pk.CHECKPOINTS name, .npz or folder")
    add_weight_args(g)
    g.add_argument("--weights-cache", nargs="?", const=True, default=None, metavar="DIR",
                   help="map the weights from a CPU-layout copy on disk (written by the first "
                        "run: a second copy of the weights), in DIR or ~/.cache/pali_kit/weights "
                        "(default: the PALI_KIT_WEIGHTS_CACHE variable decides, 0 turns it off; "
                        "unset, the default folder where the copy takes at most half the free "
                        "disk; put it after IMAGE and PROMPT, or write --weights-cache=DIR)")  # fmt: skip
    g.add_argument("--no-weights-cache", dest="weights_cache", action="store_const", const=False,
                   help="neither map nor write the weights cache")  # fmt: skip
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
    e.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not an earlier export")  # fmt: skip
    e.set_defaults(func=_export)

    c = sub.add_parser("cache", help="list (or --clear) the weights caches")
    c.add_argument("--dir", default=None,
                   help="the cache folder (default ~/.cache/pali_kit/weights)")  # fmt: skip
    c.add_argument("--clear", action="store_true", help="remove every weights cache there")
    c.set_defaults(func=_cache)

    from pali_kit import cli_train  # finetune, eval

    cli_train.add_parsers(sub)
    return ap


if __name__ == "__main__":
    sys.exit(main())
