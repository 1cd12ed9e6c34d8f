"""Measure detect/segment with the demo model: scores, parse rates, decode speed.

    PYTHONPATH=. python scripts/detection_scores.py [--scenes 200] [--seeds 4]

Prints the numbers quoted in docs/detection_scores.md:
  1. how well per-object scores rank right boxes above wrong ones (AUC) and COCO
     AP@0.5 with the scores vs. with a constant score, on held-out scenes
     (``pali_kit.tasks.score_experiment``), for several score windows;
  2. how often answers parse (the automaton accepts them: complete objects,
     requested labels, EOS) with and without the constraint, greedy and
     ``temperature(1.5)``;
  3. decode time per generated token with and without the constraint, same
     prompts, same run (alternating, median of repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import pali_kit as pk
from pali_kit import constrain, data, decode, tasks


def scores_table(model, n: int) -> None:
    print(f"\n## Scores on {n} held-out scenes (make_scene seed 12345, 64 px), greedy, constrained")
    print("| query | window (bins) | right | wrong | AUC | mean score right | mean score wrong "
          "| AP50 scores | AP50 constant |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for query in ("one", "present", "all"):
        for window in (0, 16, 32, 64):
            r = tasks.score_experiment(model, n, query=query, window=window)
            print(f"| {query} | {window} | {r['correct']} | {r['wrong']} | {r['auc']:.3f} "
                  f"| {r['mean_score_correct']:.3f} | {r['mean_score_wrong']:.3f} "
                  f"| {r['ap50']:.3f} | {r['ap50_constant']:.3f} |")  # fmt: skip


def _encode(model, scenes, task):
    labels = [[o.label for o in s.objects] for s in scenes]
    c = constrain.build(model.tokenizer, labels, task=task)
    make = pk.tokenizer.detect if task == "detect" else pk.tokenizer.segment
    enc = model.tokenizer.encode_prompts([make(*x) for x in labels], text_len=None, bucket=None)
    return c, enc, c.min_new_tokens + 2 * c.tail


def parse_rates(model, n: int, seeds: int) -> None:
    print(f"\n## Parse rate ({n} scenes x seeds, all drawn shapes asked for)")
    print("| task | sampler | answers | constrained | unconstrained |")
    print("|---|---|---|---|---|")
    scenes = [data.make_scene(12345, i, model.resolution) for i in range(n)]
    images = [s.image for s in scenes]
    for task in ("detect", "segment"):
        c, enc, budget = _encode(model, scenes, task)
        for sampler, seed_list in (("greedy", [0]), ("temperature(1.5)", range(seeds))):
            rates = {}
            for constrained in (True, False):
                ok = []
                for seed in seed_list:
                    tokens, _ = model.generate_tokens(
                        images, enc["text"], enc["mask_input"], max_new_tokens=budget,
                        sampler=sampler, seed=seed, constraint=c if constrained else None,
                    )  # fmt: skip
                    ok += [constrain.accepts(c, i, list(t), budget) for i, t in enumerate(tokens)]
                rates[constrained] = (np.mean(ok), len(ok))
            print(f"| {task} | {sampler} | {rates[True][1]} | {rates[True][0]:.3f} "
                  f"| {rates[False][0]:.3f} |")  # fmt: skip


def speed(model, batch: int, steps: int, repeats: int) -> None:
    print(f"\n## Decode time per step (batch {batch}, up to {steps} steps, median of {repeats}, "
          "alternating)")  # fmt: skip
    scenes = [data.make_scene(12345, i, model.resolution) for i in range(batch)]
    c, enc, _ = _encode(model, scenes, "detect")
    pixels = model.preprocess([s.image for s in scenes])

    def run(constraint):
        # Time from the first token to the last (the prefill is the same for both),
        # per decode step; temperature(1.5) keeps rows going for a while.
        stamps = [
            time.perf_counter()
            for _ in decode.iter_tokens(
                model.config, model.run_params, pixels, enc["text"], enc["mask_input"],
                max_new_tokens=steps, sampler="temperature(1.5)", seed=0, constraint=constraint,
            )
        ]  # fmt: skip
        return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), len(stamps)

    run(None), run(c)  # compile both
    times = {"plain": [], "constrained": []}
    for _ in range(repeats):
        times["plain"].append(run(None))
        times["constrained"].append(run(c))
    print("| decode | median ms per step | fastest ms per step | steps run |")
    print("|---|---|---|---|")
    stats = {}
    for name, runs in times.items():
        per_step = [t for t, _ in runs]
        stats[name] = (statistics.median(per_step), min(per_step))
        print(f"| {name} | {1e3 * stats[name][0]:.2f} | {1e3 * stats[name][1]:.2f} "
              f"| {runs[0][1]} |")  # fmt: skip
    ratio = [c / p for c, p in zip(stats["constrained"], stats["plain"])]
    print(f"constrained / plain: {ratio[0]:.2f}x (median), {ratio[1]:.2f}x (fastest)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--parse-scenes", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    model = pk.load("demo", verbose=False)
    if args.scenes:
        scores_table(model, args.scenes)
    if args.parse_scenes:
        parse_rates(model, args.parse_scenes, args.seeds)
    speed(model, args.batch, args.steps, args.repeats)


if __name__ == "__main__":
    main()
