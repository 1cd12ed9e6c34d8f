"""What fine-tuning a large PaliGemma fits on a free T4 / Kaggle's 2x T4, by ``pk.train.plan``.

    PYTHONPATH=. python scripts/plan_finetune.py [--model paligemma2-10b-pt-224] [--batch 4]

Prints (as markdown) the numbers quoted in docs/finetune.md (nothing is allocated: every
step is compiled abstractly, XLA's memory analysis gives the temporaries):
  1. the full plan of the ``attention`` subset (the colab's) at ``--batch``,
     frozen weights float16 / int8 / int4, with its verdict per device;
  2. one line per (frozen dtype, trainable subset): GB on one T4 and per
     device on 2x T4, at ``--batch``;
  3. ``t4_advice``: the largest subset (of those in 2.) that fits at batch
     >= ``--batch``, and its largest batch, on one T4 and on 2x T4;
  4. how long the compiles took on this host.
"""

from __future__ import annotations

import argparse
import time

from pali_kit import train as pt

# largest first: the colab's subset, then single attention matrices, then smaller ones
SUBSETS = (
    "attention",
    "llm/layers/attn/(q_einsum|attn_vec_einsum)/w",
    "llm/layers/attn/q_einsum/w",
    "llm/layers/attn/attn_vec_einsum/w",
    "img",
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/.*",
    "img/head/.*",
)
ONE, TWO = "T4 16 GB", "2x T4 16 GB (Kaggle)"
FROZEN = ("float16", "int8", "int4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="paligemma2-10b-pt-224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=128)
    args = parser.parse_args()
    kw = dict(batch_size=args.batch, text_len=args.text_len, optimizer="sgd")
    start = time.perf_counter()

    print(f"### 1. {args.model}, trainable 'attention', batch {args.batch}\n\n```")
    for frozen in FROZEN:
        print(pt.plan(args.model, trainable="attention", frozen_dtype=frozen, **kw).table(), "\n")
    print("```\n")

    print(f"### 2. GB needed at batch {args.batch} (text_len {args.text_len}, SGD); "
          f"usable: {pt.HEADROOM:.0%} of {pt.DEVICES[ONE][0] / pt.GB:.2f} GB\n")  # fmt: skip
    print("| frozen | trainable | params | one T4 | 2x T4, per device |")
    print("|---|---|---|---|---|")
    for frozen in FROZEN[1:]:
        for subset in SUBSETS:
            p = pt.plan(args.model, trainable=subset, frozen_dtype=frozen, **kw)
            cells = [
                f"{p.need(d) / pt.GB:.2f} ({'fits' if p.fits(d) else 'no'})" for d in (ONE, TWO)
            ]
            name = subset.replace("|", "\\|")  # a regex's "|" inside a markdown cell
            print(f"| {frozen} | `{name}` | {p.num_trainable / 1e6:,.0f} M | {' | '.join(cells)} |")

    print(f"\n### 3. t4_advice (largest subset at batch >= {args.batch}, then its largest batch)")
    print("\n```")
    for device in (ONE, TWO):
        for frozen in FROZEN[1:]:
            print(pt.t4_advice(args.model, subsets=SUBSETS, frozen_dtype=frozen, device=device,
                               text_len=args.text_len, min_batch=args.batch))  # fmt: skip

    print("```")
    elapsed = time.perf_counter() - start
    one = pt.plan(args.model, trainable="attention", frozen_dtype="int8", **kw)
    print(f"\n### 4. compile time on this host ({one.measured_on}): one plan of 'attention' int8 "
          f"(3 compiles: the batch, per-device batches of 2 and 8 devices) took "
          f"{one.compile_seconds:.0f} s; everything above {elapsed:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
