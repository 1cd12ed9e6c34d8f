"""Fine-tuning: loss, schedule, trainable subsets, dtypes, the guarded step, resume, plan."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pali_kit import checkpoints
from pali_kit import data as pdata
from pali_kit import train as pt
from pali_kit.model import init_params

from .conftest import FORWARD_REL, assert_close_to_scale, tiny_config

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]


def _examples(n: int = 16) -> list[pdata.Example]:
    """n solid-colour images with a caption each: easy to memorise."""
    out = []
    for i in range(n):
        image = np.zeros((28, 28, 3), np.uint8)
        image[...] = np.random.default_rng(i).integers(0, 256, 3)
        shape = "square" if i < n // 2 else "circle"
        out.append(pdata.Example(image, "caption en", f"a {COLOURS[i % 8]} {shape}", f"ex{i}"))
    return out


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in checkpoints.flatten(tree).items()}


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def params0(config):
    return init_params(config, 0)


@pytest.fixture(scope="module")
def batcher(demo_tokenizer):
    return pdata.Batcher(
        _examples(), demo_tokenizer, batch_size=8, text_len=16, image_size=28, seed=0, prefetch=0
    )


# attention-only AdamW with clipping: optimizer state, frozen weights and a schedule all matter
RUN = dict(trainable="attention", optimizer="adamw", lr=3e-3, num_steps=6, clip_norm=1.0)


# ----------------------------------------------------------------------------- loss


def test_loss_is_normalised_per_example_then_averaged():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
                                [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # fmt: skip
    targets = jnp.array([[0, 1, 2], [1, 1, 0]])
    weights = jnp.array([[1, 1, 0], [0, 0, 1]])
    loss, per_example = pt.next_token_loss(logits, targets, weights)
    first = -(math.log(0.5) + math.log(0.8)) / 2  # two counted tokens
    second = -math.log(0.2)  # one counted token
    # float32 log-softmax over 3 classes and means over <= 3 tokens against float64: a few
    # roundings of values ~1, so rtol = 1e-6 (8 eps).
    np.testing.assert_allclose(per_example, [first, second], rtol=1e-6)
    np.testing.assert_allclose(loss, (first + second) / 2, rtol=1e-6)


def test_example_without_loss_tokens_counts_zero_not_nan():
    logits = jnp.zeros((2, 3, 5))
    loss, per_example = pt.next_token_loss(
        logits, jnp.zeros((2, 3), int), jnp.array([[0] * 3, [1] * 3])
    )
    # log-softmax of equal logits: log(5) up to a few float32 roundings (rtol 8 eps)
    np.testing.assert_allclose(per_example, [0.0, math.log(5)], rtol=1e-6)
    np.testing.assert_allclose(loss, math.log(5) / 2, rtol=1e-6)


def test_label_smoothing_matches_soft_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 4)))
    weights = jnp.ones((2, 4))
    eps = 0.1
    soft = jax.nn.one_hot(targets, 7) * (1 - eps) + (1 - jax.nn.one_hot(targets, 7)) * eps / 6
    expect = jnp.mean(jnp.mean(-jnp.sum(soft * jax.nn.log_softmax(logits), -1), -1))
    loss, _ = pt.next_token_loss(logits, targets, weights, label_smoothing=eps)
    # the same float32 sums over 7 classes x 8 tokens in another order: K = 56 terms of
    # size ~ the loss, K * eps = 7e-6 of it
    np.testing.assert_allclose(loss, expect, rtol=1e-5)


# ----------------------------------------------------------------------------- schedule


def test_schedule_reproduces_the_colab_log():
    # colab: total_steps=65 (64 updates + 1), base 0.03, 10 % warmup -> 6 warmup steps
    lr = pt.bv_schedule(65, 0.03, "cosine", warmup_percent=0.10)
    # a product or a cosine in float32 against the exact value: a few roundings (rtol
    # 8 eps); the cosine's argument (~pi/2) carries its own rounding, so 1e-5 mid-way
    np.testing.assert_allclose(lr(1), 0.005, rtol=1e-6)
    np.testing.assert_allclose(lr(3), 0.015, rtol=1e-6)
    np.testing.assert_allclose(lr(6), 0.03, rtol=1e-6)
    np.testing.assert_allclose(lr(6 + 59 / 2), 0.015, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(lr(65), 0.0, atol=1e-9)
    # the optax-count form: update k (0-based) uses step k + 1
    count = pt.learning_rate_schedule(64, 0.03, warmup_percent=0.10)
    np.testing.assert_allclose([count(0), count(5)], [0.005, 0.03], rtol=1e-6)


def test_schedule_linear_constant_and_warmup_checks():
    np.testing.assert_allclose(pt.bv_schedule(11, 1.0, "linear", warmup_steps=1)(6), 0.5)
    np.testing.assert_allclose(pt.bv_schedule(10, 0.2, "constant")(7), 0.2)
    with pytest.raises(ValueError, match="warmup_steps"):
        pt.bv_schedule(10, 1.0, warmup_steps=10)


# ----------------------------------------------------------------------------- trainable subsets


def test_trainable_presets_regex_and_predicate(params0):
    flat = checkpoints.flatten(params0)

    def chosen(trainable):
        mask, summary = pt.trainable_mask(params0, trainable)
        return {k for k, v in checkpoints.flatten(mask).items() if v}, summary

    keys, summary = chosen("attention")
    assert keys == {k for k in flat if k.startswith("llm/layers/attn/")} and len(keys) == 3
    n = sum(flat[k].size for k in keys)
    assert summary.startswith(f"{n:,} of {sum(a.size for a in flat.values()):,} parameters")
    assert chosen("llm")[0] == {k for k in flat if k.startswith("llm/")}
    assert chosen("img")[0] == {k for k in flat if k.startswith("img/")}
    assert chosen("all")[0] == set(flat)
    assert chosen(r"llm/layers/mlp/.*")[0] == {
        "llm/layers/mlp/gating_einsum",
        "llm/layers/mlp/linear",
    }
    assert chosen(lambda key, shape: len(shape) == 1)[0] == {
        k for k, v in flat.items() if v.ndim == 1
    }


def test_trainable_that_matches_nothing_says_how_keys_look(params0):
    with pytest.raises(ValueError, match="matches no parameter.*llm/layers/attn/q_einsum/w"):
        pt.trainable_mask(params0, "llm/layers/attn")  # a regex must match the whole key


def test_frozen_dtype_follows_the_device():
    dev = lambda platform, kind: SimpleNamespace(platform=platform, device_kind=kind)
    assert pt.default_frozen_dtype(dev("gpu", "Tesla T4")) == np.float16
    assert pt.default_frozen_dtype(dev("gpu", "Tesla V100-SXM2-16GB")) == np.float16
    assert pt.default_frozen_dtype(dev("gpu", "NVIDIA A100-SXM4-40GB")) == ml_dtypes.bfloat16
    assert pt.default_frozen_dtype(dev("gpu", "NVIDIA L4")) == ml_dtypes.bfloat16
    assert pt.default_frozen_dtype(dev("tpu", "TPU v3")) == ml_dtypes.bfloat16
    assert pt.default_frozen_dtype(dev("cpu", "cpu")) == np.float32
    assert pt.default_frozen_dtype(dev("cpu", "cpu"), cpu="bfloat16") == ml_dtypes.bfloat16


def test_fsdp_rule_shards_the_largest_divisible_dimension_of_big_arrays():
    mib = 2**20
    assert pt.fsdp_spec((257152, 2304), 1000 * mib, 8) == jax.sharding.PartitionSpec("data", None)
    assert pt.fsdp_spec((26, 8, 2304, 256), 500 * mib, 8)[2] == "data"  # W, not the depth
    assert pt.fsdp_spec((27, 1152, 4303), 500 * mib, 8)[1] == "data"  # 4303 % 8 != 0
    assert pt.fsdp_spec((2304,), 1 * mib, 8) == jax.sharding.PartitionSpec()  # small
    assert pt.fsdp_spec((7, 9), 100 * mib, 8) == jax.sharding.PartitionSpec()  # none divides
    assert pt.fsdp_spec((1024, 1024), 100 * mib, 1) == jax.sharding.PartitionSpec()


# ----------------------------------------------------------------------------- training


def test_tiny_model_overfits_16_examples(config, params0, demo_tokenizer):
    batches = pdata.Batcher(_examples(), demo_tokenizer, batch_size=16, text_len=16,
                            image_size=28, seed=0, prefetch=0)  # fmt: skip
    trainer = pt.Trainer(params0, config, trainable="all", optimizer="adamw", lr=1e-2,
                         warmup_percent=0.05, num_steps=100)  # fmt: skip
    history = trainer.fit(batches, progress=False)
    assert history.step == list(range(1, 101))
    assert history.loss[0] > 5.0
    assert max(history.loss[-5:]) < 0.05
    preds = pt.evaluate(trainer.params, config, _examples()[:8], demo_tokenizer,
                        metric="exact_match", max_new_tokens=6)  # fmt: skip
    assert preds.score == 1.0, preds.predictions


def test_frozen_weights_stay_bit_identical_and_trainable_ones_move(config, params0, batcher):
    trainer = pt.Trainer(params0, config, frozen_dtype="bfloat16", **RUN)
    trainer.fit(batcher, num_steps=3, progress=False)
    before, after = _flat(params0), _flat(trainer.params)
    mask = checkpoints.flatten(trainer.mask)
    for key, value in after.items():
        if mask[key]:
            assert value.dtype == np.float32 and not np.array_equal(value, before[key]), key
        else:
            expect = before[key].astype(ml_dtypes.bfloat16)
            assert value.dtype == ml_dtypes.bfloat16, key
            np.testing.assert_array_equal(value.view(np.uint16), expect.view(np.uint16), key)
    # the optimizer holds state for the trainable leaves only
    sizes = [x.size for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim]
    assert sum(sizes) == 2 * sum(before[k].size for k in mask if mask[k])  # Adam mu + nu
    # and the caller's tree was not donated away
    assert np.isfinite(np.asarray(params0["llm"]["layers"]["attn"]["q_einsum"]["w"])).all()


def test_gradient_accumulation_equals_one_big_batch(config, params0, batcher):
    batch = pt.shard_batch(batcher.batch(0), pt.make_mesh())
    mask, _ = pt.trainable_mask(params0, "attention")
    trainable, frozen = pt.split_params(params0, mask)
    tx, schedule = pt.make_optimizer("sgd", num_steps=1, lr=0.5, warmup_percent=0)
    results = []
    for k in (1, 4):
        step = pt.make_train_step(config, tx, schedule=schedule, accum_steps=k)
        state = pt.init_state(jax.tree.map(jnp.copy, trainable), tx)
        results.append(step(state, frozen, batch))
    (one, m1), (four, m4) = results
    # One batch vs four micro-batches: the same float32 sums over the batch's tokens grouped
    # otherwise, on top of the forward's re-association: FORWARD_REL of the scale (conftest).
    # The weights are compared by their updates (new - old), relative to the update's size.
    assert_close_to_scale(m4["loss"], m1["loss"], FORWARD_REL, "loss")
    assert_close_to_scale(m4["grad_norm"], m1["grad_norm"], FORWARD_REL, "grad norm")
    before = jax.tree.leaves(trainable)
    for a, b, p in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), before):
        a, b, p = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(p, np.float64)
        assert_close_to_scale(b - p, a - p, FORWARD_REL, "update")
    assert not np.allclose(jax.tree.leaves(one.params)[0], jax.tree.leaves(trainable)[0])


def test_resumed_run_equals_uninterrupted_run(config, params0, batcher, tmp_path):
    straight = pt.Trainer(params0, config, **RUN)
    straight.fit(batcher, progress=False)
    assert straight.step_count == 6

    first = pt.Trainer(params0, config, **RUN)
    first.fit(batcher, num_steps=3, progress=False)
    path = first.save(tmp_path / "run.npz")
    del first
    resumed = pt.Trainer(params0, config, **RUN).restore(path)
    assert resumed.step_count == 3 and resumed.history.step == [1, 2, 3]
    resumed.fit(batcher, progress=False)  # the Batcher restarts at step 3
    assert resumed.history.step == list(range(1, 7))
    # The same compiled step on the same (losslessly saved) state and batches: bit-identical.
    np.testing.assert_array_equal(resumed.history.loss[3:], straight.history.loss[3:])
    for key, value in _flat(straight.params).items():
        np.testing.assert_array_equal(_flat(resumed.params)[key], value, err_msg=key)


def test_training_checkpoint_loads_as_an_official_one(config, params0, batcher, tmp_path):
    import pali_kit as pk

    trainer = pt.Trainer(params0, config, **RUN)
    trainer.fit(batcher, num_steps=2, progress=False)
    path = trainer.save(tmp_path / "ft.npz")
    loaded = checkpoints.load_params(path)
    assert set(checkpoints.flatten(loaded)) == set(checkpoints.flatten(params0))
    for key, value in _flat(trainer.params).items():
        np.testing.assert_array_equal(np.asarray(checkpoints.flatten(loaded)[key]), value)
    model = pk.load(str(path), verbose=False)
    assert model.config.llm.depth == config.llm.depth
    # Trainer.load resumes from it: same weights, optimizer state and step
    again = pt.Trainer.load(path, config, **RUN)
    assert again.step_count == 2
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(trainer.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_skips_the_update_and_keeps_the_last_good_state(config, params0, batcher):
    trainer = pt.Trainer(params0, config, **RUN)
    trainer.fit(batcher, num_steps=2, progress=False)
    good = [np.asarray(x) for x in jax.tree.leaves(trainer.state)]
    poisoned = dict(batcher.batch(2))
    poisoned["image"] = poisoned["image"].copy()
    poisoned["image"][3, 5, 5, 0] = np.nan
    with pytest.raises(pt.NonFiniteLossError, match="step 3") as info:
        trainer.step(poisoned)
    assert info.value.step == 3 and info.value.trainer is trainer
    for a, b in zip(good, jax.tree.leaves(info.value.state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(good, jax.tree.leaves(trainer.state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert trainer.step_count == 2 and len(trainer.history.loss) == 2
    trainer.step(batcher.batch(2))  # a good batch trains on from there
    assert trainer.step_count == 3


def test_bad_jsonl_lines_are_reported_by_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    lines = [
        '{"image": "a.png", "prefix": "caption en", "suffix": "red"}',
        '{"image": "a.png", "prefix": "caption en"',
        '{"image": "a.png", "prefix": "caption en", "suffix": 3}',
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(pdata.DataError) as info:
        pdata.JsonlDataset(tmp_path / "train.jsonl")
    message = str(info.value)
    assert "train.jsonl:2: invalid JSON" in message and "train.jsonl:3: 'suffix'" in message
    assert "train.jsonl:1" not in message


# ----------------------------------------------------------------------------- eval and pictures


def test_evaluator_scores_predictions_and_makes_previews(config, params0, demo_tokenizer):
    examples = _examples(4)
    exact = pt.Evaluator(examples, demo_tokenizer, metric="exact_match", batch_size=4,
                         max_new_tokens=4, num_previews=2)(params0, config)  # fmt: skip
    assert len(exact.predictions) == 4 and len(exact.previews) == 2
    assert exact.metric == "exact_match" and 0.0 <= exact.score <= 1.0
    assert exact.previews[0].reference == examples[0].suffix
    assert exact.previews[0].image.shape == (28, 28, 3)
    length = pt.evaluate(params0, config, examples, demo_tokenizer, batch_size=4, max_new_tokens=4,
                         metric=lambda preds, exs: {"chars": float(len(preds[0]))})  # fmt: skip
    assert length.scores == {"chars": float(len(exact.predictions[0]))}
    fig = exact.draw()
    assert len(fig.axes) == 2

    history = pt.History()
    for i in range(20):
        history.add(i + 1, {"loss": 1 / (i + 1), "grad_norm": 1.0, "lr": 0.1}, 0.0)
    history.evals.append((20, {"exact_match": 0.5}))
    assert len(history.plot().axes) == 2


def test_detection_metric_compares_boxes_in_model_pixels(config, demo_tokenizer):
    examples = [pdata.Example(np.zeros((28, 28, 3), np.uint8), "detect red",
                              "<loc0000><loc0000><loc0512><loc0512> red")]  # fmt: skip
    fns = pt.metric_functions()
    same = fns["detection"](["<loc0000><loc0000><loc0512><loc0512> red"], examples, 28)
    # float64 box arithmetic: approx's rel = 1e-6 only absorbs roundings
    assert same["mean_iou"] == pytest.approx(1.0) and same["map"] == pytest.approx(1.0)
    half = fns["detection"](["<loc0000><loc0000><loc0512><loc0256> red"], examples, 28)
    assert half["mean_iou"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- memory plan


def test_plan_of_a_tiny_model_adds_up(config):
    plan = pt.plan(config, batch_size=2, text_len=8, tpu=False)
    assert plan.num_trainable == 6144 and plan.trainable_bytes == 6144 * 4
    assert plan.optimizer_bytes <= 8  # plain SGD keeps no state but its update count
    assert plan.temp > 0
    assert plan.total == (plan.frozen_bytes + plan.trainable_bytes + plan.optimizer_bytes
                          + plan.batch_bytes + plan.temp)  # fmt: skip
    assert plan.fits("T4 16 GB") and "T4 16 GB" in plan.table()


def test_plan_says_paligemma2_3b_attention_only_fits_a_t4():
    plan = pt.plan("paligemma2-3b-pt-224", trainable="attention", batch_size=8, text_len=128,
                   frozen_dtype="float16", optimizer="sgd", tpu=False)  # fmt: skip
    assert plan.num_trainable == 368_050_176
    assert plan.fits("T4 16 GB"), plan.table()
    assert 5e9 < plan.frozen_bytes < 6e9


def test_t4_advice_names_the_largest_subset_and_batch_that_fit(config, monkeypatch):
    from pali_kit.train import memory

    kw = dict(text_len=8, frozen_dtype="float16", optimizer="sgd", tpu=False)
    plans = {
        s: pt.plan(config, trainable=s, batch_size=1, **kw) for s in ("all", "llm", "attention")
    }
    assert (
        plans["all"].num_trainable > plans["llm"].num_trainable > plans["attention"].num_trainable
    )
    # a device that holds the 'llm' subset at batch 1 but not 'all'
    need = {s: p.need("T4 16 GB") for s, p in plans.items()}
    assert need["all"] > need["llm"]
    capacity = (need["llm"] + need["all"]) / 2 / memory.HEADROOM
    monkeypatch.setitem(memory.DEVICES, "tiny device", (capacity, 1))
    advice = pt.t4_advice(config, subsets=("all", "llm", "attention"), device="tiny device",
                          batch_sizes=(1, 2, 4, 8), **{k: kw[k] for k in ("text_len", "frozen_dtype")})  # fmt: skip
    assert "'llm'" in advice, advice
    batch = int(advice.split("largest batch is ")[1].split()[0])
    assert pt.plan(config, trainable="llm", batch_size=batch, **kw).fits("tiny device")
    if batch < 8:
        assert not pt.plan(config, trainable="llm", batch_size=2 * batch, **kw).fits("tiny device")
    monkeypatch.setitem(memory.DEVICES, "tiny device", (1.0, 1))
    assert "nothing fits" in pt.t4_advice(config, device="tiny device", text_len=8)


def test_auto_metric_scores_each_task_with_its_metric():
    image = np.zeros((28, 28, 3), np.uint8)
    box = "<loc0000><loc0000><loc0512><loc0512> red"
    examples = [
        pdata.Example(image, "caption en", "a red square", meta={"task": "caption"}),
        pdata.Example(image, "answer en how many shapes", "2", meta={"task": "count"}),
        pdata.Example(image, "answer en how many shapes", "3", meta={"task": "count"}),
        pdata.Example(image, "answer en what is it", "", meta={"answers": ["a", "a", "a", "b"]}),
        pdata.Example(image, "detect red", box),
    ]
    predictions = ["a red square", "2", "4", "a", box]
    scores = pt.metric_functions()["auto"](predictions, examples, 28)
    assert list(scores) == ["caption/cider", "count/exact_match", "answer/vqa_accuracy",
                            "detect/map", "detect/mean_iou"]  # fmt: skip
    assert scores["count/exact_match"] == 0.5  # one of two
    assert scores["answer/vqa_accuracy"] == 1.0  # 3 humans said "a"
    assert scores["detect/mean_iou"] == pytest.approx(1.0)
    only_counts = pt.metric_functions()["auto"](predictions[1:3], examples[1:3], 28)
    assert only_counts == {"exact_match": 0.5}  # one task: plain names
