"""Measure detect/segment with the demo model: scores, parse rates, decode speed.

Builds: no file in ``data/``; prints the tables of docs/detection_scores.md.
Takes minutes: 7.5 min of wall time (66 s of CPU) with the defaults on a shared
2-core machine. Deterministic: the scenes (make_scene seed 12345) and the
samplers' seeds are fixed, so the score and parse-rate tables come out the same
on every run; only the decode times vary with the machine.

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

import jax
import jax.numpy as jnp
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
        return stamps

    k = min(len(run(None)), len(run(c))) - 1  # compile both; steps both runs make
    times = {"plain": [], "constrained": []}
    for _ in range(repeats):
        for name, constraint in (("plain", None), ("constrained", c)):
            stamps = run(constraint)
            times[name].append((stamps[k] - stamps[0]) / k)
    print(f"(per step over the first {k} steps after the first token, which both runs make)")
    print("| decode | median ms per step | fastest ms per step |")
    print("|---|---|---|")
    stats = {}
    for name, per_step in times.items():
        stats[name] = (statistics.median(per_step), min(per_step))
        print(f"| {name} | {1e3 * stats[name][0]:.2f} | {1e3 * stats[name][1]:.2f} |")
    ratio = [c / p for c, p in zip(stats["constrained"], stats["plain"])]
    print(f"constrained / plain: {ratio[0]:.2f}x (median), {ratio[1]:.2f}x (fastest)")

    # The sampling function alone (where the mask is built), on the same logits,
    # interleaved: the cost of the constraint without the model's step around it.
    sampler = decode.parse_sampler("temperature(1.5)")
    plain_fn, cons_fn = decode._sampler_fn(sampler), decode._constrained_fn(sampler)
    logits = jax.random.normal(jax.random.key(0), (batch, model.config.llm.vocab_size))
    rng, done, t = jax.random.key(1), jnp.zeros(batch, bool), jnp.int32(3)
    tables, state = c.tables(steps), c.initial_state()
    calls = {
        "plain": lambda: plain_fn(logits, rng, t, done, None),
        "constrained": lambda: cons_fn(logits, rng, t, done, tables, state),
    }
    alone = {name: [] for name in calls}
    for _ in range(300):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            alone[name].append(time.perf_counter() - start)
    print("sampling function alone (300 interleaved calls): " + ", ".join(
        f"{name} median {1e3 * statistics.median(v):.3f} ms, fastest {1e3 * min(v):.3f} ms"
        for name, v in alone.items()))  # fmt: skip

    # The scores: one teacher-forced forward pass over prompt + answer, against the
    # whole constrained decode (prefill included) of the same batch.
    heads = [list(t[m]) for t, m in zip(enc["text"], enc["mask_input"])]
    tokens, _ = decode.generate_tokens(
        model.config, model.run_params, pixels, enc["text"], enc["mask_input"],
        max_new_tokens=steps, constraint=c,
    )  # fmt: skip
    answers = [[int(x) for x in row if x != decode.PAD_ID] for row in tokens]
    tasks.token_logprobs(model, pixels, heads, answers)  # compile
    t_dec, t_score = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        decode.generate_tokens(
            model.config, model.run_params, pixels, enc["text"], enc["mask_input"],
            max_new_tokens=steps, constraint=c,
        )  # fmt: skip
        t_dec.append(time.perf_counter() - start)
        start = time.perf_counter()
        tasks.token_logprobs(model, pixels, heads, answers)
        t_score.append(time.perf_counter() - start)
    dec, score = statistics.median(t_dec), statistics.median(t_score)
    print(f"greedy constrained decode {1e3 * dec:.1f} ms, score pass {1e3 * score:.1f} ms "
          f"({score / dec:.2f}x the decode; medians of {repeats})")  # fmt: skip


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
