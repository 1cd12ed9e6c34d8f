"""bfloat16 trainable weights with stochastic rounding: the rounding, the train step, the plan.

``stochastic_round`` is unbiased and lands on a neighbour; an update far below
half a bfloat16 ulp survives on average (and is lost by round-to-nearest); a
``Trainer(trainable_dtype="bfloat16")`` trains a tiny model, saves, resumes;
the plan counts 2 bytes a trainable weight and gradient; the device check of
``scripts/plan_finetune.py`` runs its small version on the CPU.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pali_kit import checkpoints, quant
from pali_kit import train as pt
from pali_kit.model import init_params

from .conftest import tiny_config

BF16 = ml_dtypes.bfloat16


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 values below and above float32 x, toward and away from zero (exact)."""
    bits = x.view(np.uint32)
    low = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    high = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return low, high


# values strictly between two bfloat16 neighbours: around 1, negative, just below a binade
# edge (the carry goes into the exponent), tiny (subnormal in float32 and bfloat16), large,
# and one float32 ulp above 1 (low bits 1: fewer random bits would round it up too often)
VALUES = np.array(
    [1 + 2**-9, 1 + 3 * 2**-10, -(1 + 2**-12), 2 - 2**-9, 3e-40, -7.3e-39, 1.234567e30, 0.1,
     1 + 2**-23],
    np.float32,
)  # fmt: skip


def test_rounding_lands_on_a_neighbour_and_is_unbiased():
    n = 1_000_000  # draws of each value (every element of x gets its own random bits)
    x = np.broadcast_to(VALUES, (n, len(VALUES)))
    out = np.asarray(pt.stochastic_round(x, jax.random.key(0))).astype(np.float32)
    low, high = _neighbours(VALUES)
    assert np.all((out == low) | (out == high))  # always one of the two neighbours
    ulp = np.abs(high.astype(np.float64) - low.astype(np.float64))
    p = np.abs(VALUES.astype(np.float64) - low) / ulp  # the chance of rounding away from zero
    assert np.all((p > 0) & (p < 1)), p
    # Unbiased: the mean of n draws is low + ulp * (fraction rounded up), a binomial mean
    # with standard deviation ulp * sqrt(p (1 - p) / n) <= ulp / (2 sqrt(n)) = ulp / 2000.
    # 5 of those (a 1-in-10^6 event for a correct rounding) bound the error. With 8 random
    # bits instead of 16, 1 + 2^-23 (p = 2^-16) would round up with probability 2^-8: a bias
    # of 0.0039 ulp, above its bound of 5 ulp sqrt(p / n) = 2e-5 ulp, so that fails.
    mean = out.astype(np.float64).mean(axis=0)
    bound = 5 * ulp * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(mean - VALUES.astype(np.float64)) <= bound), (mean - VALUES) / ulp


def test_rounding_keeps_bfloat16_values_and_non_finite_ones():
    exact = np.array([0.0, -0.0, 1.0, -2.5, 2**-130, 3.3895314e38], np.float32)
    exact = exact.astype(BF16).astype(np.float32)  # representable in bfloat16
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([exact, special])
    for seed in range(4):
        out = np.asarray(pt.stochastic_round(x, jax.random.key(seed))).astype(np.float32)
        np.testing.assert_array_equal(out[: len(exact)], exact)
        assert np.isposinf(out[-3]) and np.isneginf(out[-2]) and np.isnan(out[-1])
        assert out[1] == 0 and np.signbit(out[1])  # -0.0 keeps its sign


def test_rounding_is_reproducible_for_a_key_and_differs_per_step_and_leaf():
    x = np.full((64, 64), 1 + 2**-8, np.float32)  # half an ulp (2^-7): up with probability 1/2
    key = pt.rounding_key(0, 5)
    first, again = (np.asarray(pt.stochastic_round(x, key)).view(np.uint16) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other_step = np.asarray(pt.stochastic_round(x, pt.rounding_key(0, 6))).view(np.uint16)
    other_seed = np.asarray(pt.stochastic_round(x, pt.rounding_key(1, 5))).view(np.uint16)
    # 4096 fair coins: two independent draws agree on a fraction 1/2 +- 0.008 (one std)
    for other in (other_step, other_seed):
        assert 0.4 < np.mean(first == other) < 0.6
    # two leaves with the same values get different draws; float32 leaves pass through
    like = {"a": jnp.zeros((64, 64), jnp.bfloat16), "b": jnp.zeros((64, 64), jnp.bfloat16),
            "c": jnp.zeros((3,), jnp.float32)}  # fmt: skip
    new = {"a": x, "b": x, "c": np.float32([1 + 2**-20, 2, 3])}
    out = pt.round_like(new, like, key)
    a, b = (np.asarray(out[k]).view(np.uint16) for k in "ab")
    assert 0.4 < np.mean(a == b) < 0.6
    assert out["c"].dtype == jnp.float32 and np.asarray(out["c"])[0] == np.float32(1 + 2**-20)


def test_an_update_below_half_an_ulp_survives_with_stochastic_rounding_only():
    # 512 SGD updates of +2^-10 to weights at 1.0, whose bfloat16 ulp is 2^-7: each
    # update is an eighth of an ulp, a quarter of the half-ulp round-to-nearest needs.
    steps, delta, m = 512, 2.0**-10, 4096
    w0 = jnp.ones((m,), jnp.bfloat16)

    @functools.partial(jax.jit, static_argnums=1)
    def train(w, stochastic: bool):
        def one(i, w):
            new = w.astype(jnp.float32) + delta
            if stochastic:
                return pt.round_like(new, w, pt.rounding_key(0, i))
            return new.astype(jnp.bfloat16)  # round to nearest

        return jax.lax.fori_loop(0, steps, one, w)

    nearest = np.asarray(train(w0, False)).astype(np.float64)
    assert np.all(nearest == 1.0)  # every update rounded away: nothing learned
    sr = np.asarray(train(w0, True)).astype(np.float64)
    target = 1.0 + steps * delta  # 1.5, the float32 result
    # Each step's rounding error has mean 0 and |error| < ulp = 2^-7, so after 512 steps a
    # weight is off by a sum of 512 zero-mean terms, standard deviation <= 2^-7 sqrt(512) / 2
    # = 0.088; the mean of 4096 independent weights: <= 0.0014. 0.01 is 7 of those.
    assert abs(sr.mean() - target) < 0.01, sr.mean()
    assert sr.std() > 0  # the weights took different paths


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def params0(config):
    return init_params(config, 0)


def _batch(config, step: int = 0, size: int = 4, text: int = 12) -> dict:
    """A fixed random batch (the same for every step unless ``step`` differs): to overfit."""
    rng = np.random.default_rng(step)
    prefix = np.arange(text + 1) < 4
    return {
        "image": rng.uniform(-1, 1, (size, 28, 28, 3)).astype(np.float32),
        "text": rng.integers(0, config.llm.vocab_size, (size, text + 1)).astype(np.int32),
        "mask_ar": np.repeat(~prefix[None], size, 0).astype(np.int32),
        "mask_loss": np.repeat(~prefix[None], size, 0).astype(np.int32),
    }


RUN = dict(trainable="attention", optimizer="sgd", momentum=0.9, lr=0.3, num_steps=8,
           warmup_percent=0.0, frozen_dtype="float32", trainable_dtype="bfloat16")  # fmt: skip


def test_bfloat16_trainable_weights_train_save_and_load(config, params0, tmp_path):
    import pali_kit as pk

    trainer = pt.Trainer(params0, config, **RUN)
    batch = _batch(config)
    losses = [trainer.step(batch)["loss"] for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses  # ~7.7 at start
    mask = checkpoints.flatten(trainer.mask)
    trained = {k: np.asarray(v) for k, v in checkpoints.flatten(trainer.state.params).items()}
    # gradients and updates for the attention weights only, stored in bfloat16, and moved
    assert set(trained) == {k for k, t in mask.items() if t} and set(trained)
    before = {k: np.asarray(v) for k, v in checkpoints.flatten(params0).items()}
    for key, value in trained.items():
        assert value.dtype == BF16, key
        assert not np.array_equal(value, before[key].astype(BF16)), key
    # the frozen weights are bit-identical
    for key, value in checkpoints.flatten(trainer.frozen).items():
        np.testing.assert_array_equal(np.asarray(value), before[key], key)
    # the optimizer (momentum) works in float32 for the bfloat16 weights
    traces = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim]
    assert traces and all(x.dtype == jnp.float32 for x in traces)
    assert sum(x.size for x in traces) == sum(v.size for v in trained.values())

    path = trainer.save(tmp_path / "bf16.npz")
    loaded = checkpoints.flatten(checkpoints.load_params(path))
    for key, value in trained.items():  # saved losslessly as bfloat16
        assert np.asarray(loaded[key]).dtype == BF16, key
        np.testing.assert_array_equal(np.asarray(loaded[key]).view(np.uint16),
                                      value.view(np.uint16), key)  # fmt: skip
    model = pk.load(str(path), verbose=False)
    assert model.config.llm.depth == config.llm.depth


def test_bfloat16_resumed_run_draws_what_the_uninterrupted_run_drew(config, params0, tmp_path):
    batches = [_batch(config, step=i) for i in range(4)]
    straight = pt.Trainer(params0, config, **RUN)
    for b in batches:
        straight.step(b)
    first = pt.Trainer(params0, config, **RUN)
    for b in batches[:2]:
        first.step(b)
    path = first.save(tmp_path / "half.npz")
    resumed = pt.Trainer.load(path, config, **RUN)
    assert resumed.step_count == 2
    for b in batches[2:]:
        resumed.step(b)
    # the rounding is keyed by (seed, step, leaf): the same bits, not merely close
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # another rounding seed draws other bits
    other = pt.Trainer(params0, config, **{**RUN, "rounding_seed": 1})
    for b in batches:
        other.step(b)
    q = lambda t: np.asarray(t.state.params["llm"]["layers"]["attn"]["q_einsum"]["w"])  # noqa: E731
    assert not np.array_equal(q(other), q(straight))


def test_trainable_dtype_float16_or_int8_is_refused_with_the_reason(config, params0):
    with pytest.raises(ValueError, match=r"trainable_dtype='float16'.*underflow.*'bfloat16'"):
        pt.Trainer(params0, config, num_steps=1, trainable_dtype="float16")
    with pytest.raises(ValueError, match=r"trainable_dtype='int8'.*'float32'.*'bfloat16'"):
        pt.plan(config, trainable_dtype="int8")


def test_plan_counts_two_bytes_a_trainable_weight_and_gradient(config):
    kw = dict(batch_size=2, text_len=8, frozen_dtype="int8", tpu=False)
    wide = pt.plan(config, **kw)
    half = pt.plan(config, trainable_dtype="bfloat16", **kw)
    n = half.num_trainable
    assert half.trainable_bytes == 2 * n == wide.trainable_bytes // 2
    assert half.gradient_bytes == 2 * n
    assert half.frozen_bytes == wide.frozen_bytes
    # on a CPU host: the same compiled step, gradients counted at 2 bytes instead of 4
    assert wide.total - half.total == 2 * n + 2 * n
    assert "trainable weights (bfloat16)" in half.table()


# ----------------------------------------------------------------------------- device check


def test_device_check_runs_its_small_version_on_the_cpu():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import plan_finetune

    config = tiny_config()
    params = plan_finetune.random_training_params(config, frozen="int4")
    flat = checkpoints.flatten(params)
    # frozen large matrices are quantized as drawn; the trainable attention is bfloat16
    assert isinstance(flat["llm/layers/mlp/linear"], quant.QArray)
    assert flat["llm/layers/mlp/linear"].values.dtype == np.int8
    assert flat["llm/layers/attn/q_einsum/w"].dtype == jnp.bfloat16
    assert flat["llm/final_norm/scale"].dtype == jnp.float16
    result = plan_finetune.check_on_device(config, frozen="int4", batch_size=4, text_len=8)
    assert result["trainable_dtype"] == "bfloat16" and len(result["losses"]) == 2
    assert np.all(np.isfinite(result["losses"]))
    assert result["plan_total_gb_here"] > 0 and result["step_temp_gb"] >= 0
    if jax.devices()[0].platform == "cpu":  # CPU devices keep no peak count
        assert result["peak_bytes_in_use_gb"] is None


# ----------------------------------------------------------------------------- the CLI


def test_finetune_cli_trains_bfloat16_weights_and_records_it(tmp_path, capsys):
    import json

    import pali_kit as pk
    from pali_kit import cli
    from pali_kit.assets import asset_dir

    out = tmp_path / "run"
    argv = ["finetune", str(asset_dir() / "sample_dataset" / "train.jsonl"), "--model", "demo",
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--text-len", "24",
            "--trainable", "llm/layers/attn/.*", "--trainable-dtype", "bfloat16",
            "--frozen-dtype", "float32", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    assert json.loads((out / "run.json").read_text())["trainable_dtype"] == "bfloat16"
    saved = checkpoints.flatten(checkpoints.load_params(out / "model.npz"))
    q = np.asarray(saved["llm/layers/attn/q_einsum/w"])
    before = np.asarray(pk.load("demo").params["llm"]["layers"]["attn"]["q_einsum"]["w"])
    assert q.dtype == BF16 and not np.array_equal(q, before.astype(BF16))
    # resuming with another dtype is another run: refused
    again = [*argv[:-5], "--trainable-dtype", "float32", "--frozen-dtype", "float32",
             "--no-progress", "--resume"]  # fmt: skip
    assert cli.main(again) == 2  # a usage error
    assert "--trainable-dtype bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["float16", "int8"])
def test_finetune_cli_rejects_other_trainable_dtypes(bad, tmp_path, capsys):
    from pali_kit import cli

    argv = ["finetune", "train.jsonl", "--model", "demo", "--out", str(tmp_path),
            "--trainable-dtype", bad]  # fmt: skip
    assert cli.main(argv) == 2  # a usage error
    err = capsys.readouterr().err
    assert f"--trainable-dtype: '{bad}'" in err and "float32" in err and "bfloat16" in err, err
