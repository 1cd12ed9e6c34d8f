"""``pali-kit finetune`` and ``pali-kit eval``: fine-tuning and evaluation from the command line.

pali-kit finetune TRAIN.jsonl --model MODEL --out DIR [--steps N --batch-size B --trainable SUBSET
        --lr LR --optimizer sgd|adamw --seed S --text-len T --frozen-dtype D --quantize int8|int4
        --trainable-dtype float32|bfloat16
        --val VAL.jsonl --eval-every K --resume] [--coordinator HOST:PORT --num-processes N --process-id I]
    -> DIR/history.jsonl (one JSON object per update: step, loss, grad_norm, lr, and the
       evaluation scores on the lines where it evaluated), DIR/model.npz (pk.load opens it;
       with the optimizer state and step, so --resume continues it), DIR/run.json
pali-kit eval MODEL VAL.jsonl [--json] [--dtype D --quantize int8|int4]   the task metrics

Several processes (one per host, or several on one machine) run the same
command with ``--coordinator HOST:PORT --num-processes N --process-id I``
(or ``--distributed`` where ``jax.distributed.initialize()`` finds the
cluster by itself, as on a Cloud TPU pod slice). ``--batch-size`` is the
global batch: each process reads only its rows of it. Process 0 writes DIR.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

from .atomic import write_bytes, write_text

FINETUNE = (
    "Fine-tune a PaliGemma on a jsonl dataset; writes DIR/history.jsonl (one JSON object per "
    "update) and DIR/model.npz (pk.load opens it; --resume continues it). Several processes "
    "(one per host, or several on one machine) run the same command with --coordinator "
    "HOST:PORT --num-processes N --process-id I, or --distributed where "
    "jax.distributed.initialize() finds the cluster itself (Cloud TPU pod slices). "
    "--batch-size is the global batch; each process reads only its rows. Process 0 writes DIR."
)
HISTORY, CHECKPOINT, RUN = "history.jsonl", "model.npz", "run.json"


# ============================================================================ argument types


def _positive(kind, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'number' if kind is float else 'whole number'}"
            ) from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _trainable_dtype(text: str) -> str:
    if text in ("float32", "bfloat16"):
        return text
    why = " (float16 gradients underflow below 6e-8)" if text in ("float16", "fp16", "f16") else ""
    raise argparse.ArgumentTypeError(
        f"{text!r}{why}: use float32 (default) or bfloat16 (half the memory of the trainable "
        "weights and their gradients; each update is rounded stochastically)"
    )


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (e.g. 10.0.0.1:1234; process 0's address, "
            "reachable from every process)"
        )
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model (default: the one beside the checkpoint)")  # fmt: skip
    p.add_argument("--metric", default="auto",
                   help="auto (each task its metric) | cider | bleu | vqa | anls | exact_match | "
                        "detection")  # fmt: skip
    p.add_argument("--max-new-tokens", type=_positive(int, "max-new-tokens"), default=32)


def add_parsers(sub) -> None:
    """Add ``finetune`` and ``eval`` to the ``pali-kit`` subcommands."""
    from .cli_args import add_weight_args, weight_dtype

    f = sub.add_parser("finetune", help="fine-tune on a jsonl dataset (one or several processes)",
                       description=FINETUNE)  # fmt: skip
    f.add_argument("train", metavar="TRAIN.jsonl")
    f.add_argument("--model", required=True, help="'demo', a pk.CHECKPOINTS name, or an .npz")
    f.add_argument("--out", required=True, metavar="DIR", help="where the run writes its files")
    f.add_argument(
        "--steps",
        type=_positive(int, "steps"),
        default=64,
        help="updates of the whole run (the learning-rate schedule spans them)",
    )
    f.add_argument(
        "--until",
        type=_positive(int, "until"),
        default=None,
        metavar="STEP",
        help="stop after this update (default: --steps); continue with --resume",
    )
    f.add_argument(
        "--batch-size",
        type=_positive(int, "batch-size"),
        default=8,
        help="global batch: all processes together (a multiple of the devices)",
    )
    f.add_argument(
        "--trainable",
        default="attention",
        help="attention | llm | img | all, or a regex over keys (llm/layers/mlp/.*)",
    )
    f.add_argument(
        "--lr",
        type=_positive(float, "lr"),
        default=None,
        help="peak learning rate (default: sgd 0.03, adamw 1e-5)",
    )
    f.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    f.add_argument("--seed", type=int, default=0, help="the data order")
    f.add_argument(
        "--text-len",
        type=_positive(int, "text-len"),
        default=64,
        help="tokens of prompt + answer (longer examples are cut)",
    )
    f.add_argument(
        "--frozen-dtype",
        type=weight_dtype,
        metavar="DTYPE",
        default=None,
        help="dtype of the frozen weights (default: the device's)",
    )
    f.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="quantize the frozen large matrices (int8 per channel, int4 in groups of 64; they "
        "stand for --frozen-dtype); the trainable ones stay --trainable-dtype, model.npz is "
        "written in float",
    )
    f.add_argument(
        "--trainable-dtype",
        type=_trainable_dtype,
        default="float32",
        help="dtype of the trainable weights: float32 or bfloat16 (updated in float32, rounded "
        "back stochastically; half the memory of those weights and their gradients)",
    )
    f.add_argument(
        "--val",
        default=None,
        metavar="VAL.jsonl",
        help="evaluate on it every --eval-every updates and at the end",
    )
    f.add_argument("--eval-every", type=_positive(int, "eval-every"), default=None, metavar="K")
    f.add_argument("--save-every", type=_positive(int, "save-every"), default=None, metavar="K",
                   help="write DIR/model.npz every K updates (default: at evaluations, and at "
                        "the end)")  # fmt: skip
    f.add_argument("--resume", action="store_true", help="continue the run in DIR")
    f.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_model_args(f)
    m = f.add_argument_group("several processes")
    m.add_argument("--coordinator", type=_address, default=None, metavar="HOST:PORT")
    m.add_argument("--num-processes", type=_positive(int, "num-processes"), default=None)
    m.add_argument("--process-id", type=int, default=None)
    m.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() finds the cluster itself (Cloud TPU, "
                        "SLURM, ...)")  # fmt: skip
    f.set_defaults(func=functools.partial(_finetune, parser=f))

    e = sub.add_parser("eval", help="the task metrics of a model on a jsonl dataset",
                       description="Greedy-decode VAL.jsonl and print each task's metric "
                       "(the trainer's evaluation): captions CIDEr, answers exact match or VQA "
                       "accuracy, detections mAP and mean IoU.")  # fmt: skip
    e.add_argument("model", help="'demo', a pk.CHECKPOINTS name, an .npz or a folder")
    e.add_argument("val", metavar="VAL.jsonl")
    e.add_argument("--batch-size", type=_positive(int, "batch-size"), default=8)
    e.add_argument(
        "--text-len",
        type=_positive(int, "text-len"),
        default=None,
        help="prompt tokens (default: the longest prompt of each batch)",
    )
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_weight_args(e)
    _add_model_args(e)
    e.set_defaults(func=functools.partial(_eval, parser=e))


def _check_finetune(args, parser) -> None:
    """Usage errors that argparse cannot see alone (exit status 2, before JAX starts)."""
    from .train import METRICS

    several = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in several) and any(v is None for v in several):
        parser.error("--coordinator, --num-processes and --process-id go together: give all "
                     "three (or --distributed to let JAX find the cluster)")  # fmt: skip
    if args.coordinator is not None and args.distributed:
        parser.error("--distributed finds the cluster itself: drop it, or drop --coordinator")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        parser.error(f"argument --process-id: {args.process_id} must be in 0..."
                     f"{args.num_processes - 1} for --num-processes {args.num_processes}")  # fmt: skip
    if args.until is not None and args.until > args.steps:
        parser.error(
            f"argument --until: {args.until} is after the last step (--steps {args.steps})"
        )
    if args.eval_every is not None and args.val is None:
        parser.error("argument --eval-every needs --val VAL.jsonl (the data to evaluate on)")
    if args.metric not in METRICS:
        parser.error(f"argument --metric: {args.metric!r} is not one of {', '.join(METRICS)}")
    for name in ("train", "val"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            parser.error(f"{name} file {path} does not exist")
    checkpoint = Path(args.out) / CHECKPOINT
    if args.resume and not checkpoint.is_file():
        parser.error(f"--resume: {checkpoint} does not exist (start the run without --resume)")
    if args.resume:
        _check_same_run(Path(args.out), args, parser)
    if not args.resume and checkpoint.exists():
        parser.error(f"--out {args.out} already holds {CHECKPOINT}: pass --resume to continue "
                     "that run, or choose another --out")  # fmt: skip


# ============================================================================ the model


def _resolve(model: str, tokenizer_path: str | None):
    """(checkpoint path, config, tokenizer, text_len) of a ``--model`` value."""
    from . import api, checkpoints
    from .assets import asset_dir
    from .configs import registry_semantics
    from .tokenizer import Tokenizer, find_tokenizer

    registered = None
    if model == "demo":
        path = asset_dir() / api.DEMO_FILE
    else:
        path, registered = api.resolve_checkpoint(model, where="--model")
        if path.is_dir():
            raise ValueError(
                f"--model {model} is a folder: finetune reads a big_vision .npz; write one with "
                "pk.save(pk.load(folder), 'model.npz')"
            )
    shapes = {k: s for k, (s, _) in checkpoints.checkpoint_keys(path).items()
              if k.startswith(("img/", "llm/"))}  # fmt: skip
    config = checkpoints.infer_config(shapes, str(path))
    if registered is not None:
        config = registry_semantics(config, registered.config)
    if tokenizer_path is not None:
        tokenizer = Tokenizer(tokenizer_path)
    elif model == "demo":
        tokenizer = Tokenizer.demo()
    else:
        tokenizer = find_tokenizer(path.parent, config.llm.vocab_size)
        if tokenizer is None:
            raise FileNotFoundError(
                f"no tokenizer beside {path} (paligemma_tokenizer.model): pass --tokenizer PATH"
            )
    return path, config, tokenizer


# ============================================================================ finetune


def _runtime_errors(command: str):
    """Failures while running (not usage): one line on stderr, exit status 1."""

    def wrap(run):
        @functools.wraps(run)
        def wrapped(args, parser) -> int:
            try:
                return run(args, parser)
            except (OSError, ValueError, RuntimeError, KeyError) as error:
                text = " ".join(str(error).split()) or type(error).__name__
                print(f"pali-kit {command}: error: {text}", file=sys.stderr)
                return 1

        return wrapped

    return wrap


@_runtime_errors("finetune")
def _finetune(args, parser) -> int:
    _check_finetune(args, parser)
    jax = _start_jax(args)
    from . import data as pdata
    from . import train as pt

    out, main = Path(args.out), jax.process_index() == 0
    path, config, tokenizer = _resolve(args.model, args.tokenizer)
    start_from = out / CHECKPOINT if args.resume else path
    _check_with_devices(args, parser, start_from)
    train = pdata.JsonlDataset(args.train)
    batcher = pdata.Batcher(train, tokenizer, batch_size=args.batch_size, text_len=args.text_len,
                            image_size=config.resolution, seed=args.seed)  # fmt: skip
    evaluator = None
    if args.val is not None:
        evaluator = pt.Evaluator(pdata.JsonlDataset(args.val), tokenizer, metric=args.metric,
                                 max_new_tokens=args.max_new_tokens)  # fmt: skip
    trainer = _make_trainer(args, config, start_from)
    start, end = trainer.step_count, args.until or args.steps
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _start_history(out / HISTORY, start)
        if not args.resume:
            _write_json(out / RUN, _run_record(args, config))
            _keep_tokenizer(tokenizer, out)
        print(f"pali-kit finetune: {trainer.summary}; {jax.process_count()} process(es), "
              f"{jax.device_count()} devices; steps {start + 1}..{end} of {args.steps}",
              file=sys.stderr)  # fmt: skip
    if start >= end:
        if main:
            print(f"{out / CHECKPOINT} is already at step {start}: nothing to do")
        return 0
    _fit(args, trainer, batcher, evaluator, end, log=out / HISTORY if main else None)
    if main:
        history, last = trainer.history, trainer.last_eval
        shown = "".join(f", {k} {v:.4g}" for k, v in (last.scores if last else {}).items())
        print(f"step {history.step[-1]}: loss {history.loss[-1]:.4f}{shown}; "
              f"wrote {out / CHECKPOINT}")  # fmt: skip
    return 0


def _keep_tokenizer(tokenizer, out: Path) -> None:
    """A copy of the tokenizer beside model.npz, where pk.load looks (the demo's it finds)."""
    from .assets import asset_dir

    source = Path(tokenizer.path)
    if source.is_file() and source.resolve() != (asset_dir() / "tokenizer.model").resolve():
        write_bytes(out / "paligemma_tokenizer.model", source.read_bytes())


def _start_jax(args):
    """Join the other processes first (when asked), before JAX starts its backends."""
    from . import api
    from . import train as pt

    if args.coordinator is not None or args.distributed:
        pt.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    if jax.process_count() == 1:  # a persistent cache of programs, for one process only
        api.enable_compilation_cache()
    return jax


def _check_with_devices(args, parser, start_from: Path) -> None:
    """Usage errors that need the checkpoint's keys or the device count (exit status 2)."""
    import jax

    from . import checkpoints
    from . import train as pt

    shapes = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in
              checkpoints.checkpoint_keys(start_from).items() if k.startswith(("img/", "llm/"))}  # fmt: skip
    try:
        pt.trainable_mask(checkpoints.unflatten(shapes), args.trainable)
    except (ValueError, TypeError) as error:
        parser.error(f"argument --trainable: {error}")
    n = jax.device_count()
    if args.batch_size % n:
        parser.error(f"argument --batch-size: {args.batch_size} is not a multiple of the {n} "
                     f"devices ({jax.process_count()} process(es)); use "
                     f"{n * max(1, args.batch_size // n)}")  # fmt: skip


def _make_trainer(args, config, start_from: Path):
    """A Trainer on every device of every process, from the model or (--resume) DIR/model.npz."""
    from . import train as pt

    mesh = pt.make_mesh()
    # --quantize: the frozen large matrices become integers and scales as they are read
    params, _, _ = pt.load_for_training(start_from, trainable=args.trainable,
                                        frozen_dtype=args.frozen_dtype, mesh=mesh, progress=False,
                                        quantize=args.quantize,
                                        trainable_dtype=args.trainable_dtype)  # fmt: skip
    trainer = pt.Trainer(params, config, trainable=args.trainable, num_steps=args.steps,
                         optimizer=args.optimizer, lr=args.lr, frozen_dtype=args.frozen_dtype,
                         mesh=mesh, copy=False, trainable_dtype=args.trainable_dtype)  # fmt: skip
    if args.resume:  # the step and optimizer state; the weights are loaded already
        trainer.restore(start_from, params=False)
    return trainer


def _fit(args, trainer, batcher, evaluator, end: int, log: Path | None) -> None:
    """Train to update ``end``; ``log`` (process 0 only) gets one JSON line per update."""
    from . import train as pt

    file = open(log, "a", encoding="utf-8") if log is not None else None  # noqa: SIM115
    try:
        trainer.fit(batcher, num_steps=end, evaluator=evaluator, eval_every=args.eval_every,
                    checkpoint=Path(args.out) / CHECKPOINT, checkpoint_every=args.save_every,
                    progress=not args.no_progress,
                    callback=functools.partial(_log_line, file) if file else None)  # fmt: skip
    except pt.NonFiniteLossError as error:
        raise RuntimeError(str(error)) from None
    finally:
        if file is not None:
            file.close()


def _finite(value):
    return value if isinstance(value, (int, str)) or math.isfinite(value) else None


def _log_line(log, record: dict) -> None:
    log.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
    log.flush()


def _start_history(path: Path, step: int) -> None:
    """Keep the lines of updates 1..step (a resumed run may have logged past its checkpoint)."""
    lines = []
    if step and path.exists():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                 if _step_of(ln) is not None and _step_of(ln) <= step]  # fmt: skip
    write_text(path, "".join(ln + "\n" for ln in lines))


def _step_of(line: str) -> int | None:
    """The step of a history line; None for a line cut short (a run killed while writing)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


SAME_RUN = ("trainable", "optimizer", "steps", "batch_size", "seed", "text_len", "lr", "quantize",
            "trainable_dtype")  # fmt: skip


def _run_record(args, config) -> dict:
    record = {k: getattr(args, k) for k in SAME_RUN}
    return {**record, "model": args.model, "train": str(args.train),
            "llm_variant": config.llm.variant, "resolution": config.resolution}  # fmt: skip


def _check_same_run(out: Path, args, parser) -> None:
    """--resume with other settings than the run had would not continue it: a usage error."""
    path = out / RUN
    if not path.is_file():
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    for key in SAME_RUN:
        if key in before and before[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            parser.error(f"--resume: the run in {out} used {flag} {before[key]}, not "
                         f"{getattr(args, key)}; give the same value to continue it, or start a "
                         f"new run from its weights with --model {path.parent / CHECKPOINT}")  # fmt: skip


def _write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n")


# ============================================================================ eval


@_runtime_errors("eval")
def _eval(args, parser) -> int:
    from .train import METRICS

    if args.metric not in METRICS:
        parser.error(f"argument --metric: {args.metric!r} is not one of {', '.join(METRICS)}")
    if not Path(args.val).is_file():
        parser.error(f"val file {args.val} does not exist")
    import pali_kit as pk

    from . import data as pdata
    from . import train as pt

    model = pk.load(args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                    quantize=args.quantize, verbose=False)  # fmt: skip
    if model.tokenizer is None:
        raise FileNotFoundError(f"no tokenizer found for {args.model}: pass --tokenizer PATH")
    val = pdata.JsonlDataset(args.val)
    result = pt.evaluate(model.params, model.config, val, model.tokenizer, metric=args.metric,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         text_len=args.text_len)  # fmt: skip
    scores = {k: _finite(float(v)) for k, v in result.scores.items()}
    if args.json:
        print(json.dumps({"model": args.model, "data": str(args.val),
                          "examples": len(result.predictions), "scores": scores}))  # fmt: skip
        return 0
    print(f"{model.name} on {args.val} ({len(result.predictions)} examples, greedy):")
    width = max(map(len, scores))
    for name, value in scores.items():
        print(f"  {name:<{width}}  {'nan' if value is None else f'{value:.4f}'}")
    return 0
