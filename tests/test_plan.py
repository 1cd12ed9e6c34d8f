"""The memory plan on devices with several chips (Kaggle's 2x T4) and ``t4_advice``'s batch floor.

The plan's per-device numbers for a sharded device are checked against XLA's
own memory analysis of the sharded step that ``Trainer`` runs on 2 forced CPU
devices (a fresh Python process: JAX fixes its device count when it starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pali_kit import train as pt
from pali_kit.train import memory

from .conftest import tiny_config

CHILD = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
from conftest import tiny_config
from pali_kit import quant, train as pt
from pali_kit.model import init_params
from pali_kit.train import memory

assert jax.device_count() == 2, jax.devices()
# only the 1- and 2-device entries: no 8-core compile
memory.DEVICES = {{k: v for k, v in memory.DEVICES.items() if v[1] <= 2}}
# layer weights dominate (as in a 10B model) over the embedding table and activations
config = tiny_config(llm_depth=8, llm_width=256, llm_mlp_dim=1024, llm_head_dim=64, llm_num_heads=8,
                     num_kv_heads=4, img_width=128, img_mlp_dim=256)
B, T = 4, 16
rng = np.random.default_rng(0)
prefix = np.arange(T + 1) < 4
batch = {{
    "image": rng.uniform(-1, 1, (B, 28, 28, 3)).astype(np.float32),
    "text": rng.integers(0, config.llm.vocab_size, (B, T + 1)).astype(np.int32),
    "mask_ar": np.repeat(~prefix[None], B, 0).astype(np.int32),
    "mask_loss": np.repeat(~prefix[None], B, 0).astype(np.int32),
    "mask_input": np.ones((B, T + 1), bool),
}}
out = {{}}
for scheme, meshes in (("int8", ("one", "two")), ("int4", ("two",))):
    params = quant.quantize_params(jax.tree.map(np.asarray, init_params(config, 0)), scheme)
    plan = pt.plan(config, trainable="attention", batch_size=B, text_len=T, frozen_dtype=scheme,
                   min_shard_bytes=0)
    out[scheme] = {{"plan_one": plan.total, "plan_two": plan.per_core(2),
                   "gathered": plan.largest_layer_bytes, "grads": plan.gradient_bytes}}
    for name in meshes:
        mesh = pt.make_mesh(jax.devices()[: 1 if name == "one" else 2])
        # float32 frozen: the dtype a CPU plan compiles with; min_shard_bytes=0 as in the plan
        trainer = pt.Trainer(params, config, trainable="attention", num_steps=3, lr=0.1,
                             frozen_dtype="float32", mesh=mesh, min_shard_bytes=0)
        sharded = pt.shard_batch(batch, mesh)
        m = trainer._step.lower(trainer.state, trainer.frozen, sharded).compile().memory_analysis()
        loss = [trainer.step(batch)["loss"] for _ in range(3)]  # (the step donates the state)
        q = trainer.state.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
        frozen = trainer.frozen["llm"]["layers"]["mlp"]["linear"].values
        out[scheme][name] = {{
            "measured": m.argument_size_in_bytes + m.output_size_in_bytes
                        - m.alias_size_in_bytes + m.temp_size_in_bytes,
            "loss": loss,
            "trainable_shard": q.addressable_shards[0].data.size / q.size,
            "frozen_shard": frozen.addressable_shards[0].data.size / frozen.size,
        }}
with open({tmp!r} + "/results.json", "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_devices")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PALI_KIT_COMPILATION_CACHE="0")  # fmt: skip
    code = CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((tmp / "results.json").read_text())


def test_quantized_frozen_step_runs_fsdp_sharded_over_two_devices(two_devices):
    one, two = two_devices["int8"]["one"], two_devices["int8"]["two"]
    # each device holds half of every weight: trainable float32 and frozen int8 / int4 alike
    for scheme in ("int8", "int4"):
        res = two_devices[scheme]["two"]
        assert res["trainable_shard"] == 0.5 and res["frozen_shard"] == 0.5, (scheme, res)
        assert all(map(lambda x: x == x and abs(x) < 1e3, res["loss"])), res["loss"]  # finite
        assert res["loss"][-1] < res["loss"][0] - 0.1, res["loss"]
    # the same updates as on one device: float32 sums over 2 shards re-associated (losses ~ 5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_plan_per_device_matches_the_sharded_step_xla_compiles(two_devices):
    for scheme in ("int8", "int4"):
        res = two_devices[scheme]
        two = res["two"]["measured"]
        # The plan of the sharded device never under-states what XLA allocates per device
        # (weights, optimizer state and gradients reduce-scattered, per-device batch) and
        # over-states it by at most the one layer it counts as gathered (XLA gathers
        # smaller pieces) plus 10 % for the partitioned program's other buffer reuse
        # (about 5 % here). A plan that kept every gradient on each device would be off by
        # half the gradients, more than that 10 %: the bound catches it.
        assert two <= res["plan_two"] <= two + res["gathered"] + 0.1 * two, res
        assert res["grads"] / 2 > 0.1 * two + res["gathered"], res
        if "one" in res:
            # one device: the same arrays; the plan counts the few small frozen leaves
            # (norms, biases) in float16 where this step holds them in float32: < 2 %
            one = res["one"]["measured"]
            assert res["plan_one"] == pytest.approx(one, rel=0.02), res
            # sharding saves: half the weights, gradients and batch per device
            assert two < 0.6 * one, res


def test_per_core_of_a_device_count_not_planned_says_how_to_add_it():
    plan = pt.plan(tiny_config(), batch_size=2, text_len=8, tpu=False)
    assert plan.per_core(1) == plan.total
    assert plan.per_core(2) == plan.need("2x T4 16 GB (Kaggle)")
    with pytest.raises(ValueError, match="cores=3.*DEVICES"):
        plan.per_core(3)


def test_plan_without_per_device_compiles_over_states_the_sharded_need():
    config = tiny_config()
    exact = pt.plan(config, batch_size=4, text_len=8, frozen_dtype="int8")
    rough = pt.plan(config, batch_size=4, text_len=8, frozen_dtype="int8", tpu=False)
    for a, b in zip(exact.sharded, rough.sharded, strict=True):
        assert a.exact_temp and not b.exact_temp and a.devices == b.devices
        assert a.state == b.state and b.temp >= a.temp  # the full batch's temporaries
    assert "FSDP over 2 devices, batch 2 each" in exact.table()


def test_t4_advice_with_a_batch_floor_and_quantized_frozen_weights(monkeypatch):
    config = tiny_config()
    kw = dict(text_len=8, frozen_dtype="int8", optimizer="sgd", tpu=False)
    plans = {s: pt.plan(config, trainable=s, batch_size=4, **kw) for s in ("all", "llm")}
    # a device that holds 'llm' at batch 4 but not 'all'
    need = {s: p.need("T4 16 GB") for s, p in plans.items()}
    assert need["all"] > need["llm"]
    capacity = (need["llm"] + need["all"]) / 2 / memory.HEADROOM
    monkeypatch.setitem(memory.DEVICES, "tiny device", (capacity, 1))
    advice = pt.t4_advice(config, subsets=("all", "llm", "attention"), device="tiny device",
                          text_len=8, frozen_dtype="int8", min_batch=4, batch_sizes=(1, 2, 4, 8))  # fmt: skip
    assert "fits at batch 4 is 'llm'" in advice and "frozen int8" in advice, advice
    batch = int(advice.split("largest batch is ")[1].split()[0])
    assert batch >= 4 and pt.plan(config, trainable="llm", batch_size=batch, **kw).fits(
        "tiny device"
    )
    # below the floor nothing counts: a device too small at batch 4
    monkeypatch.setitem(memory.DEVICES, "tiny device", (need["llm"] * 0.5, 1))
    advice = pt.t4_advice(config, subsets=("llm",), device="tiny device", text_len=8,
                          frozen_dtype="int8", min_batch=4)  # fmt: skip
    assert "nothing fits at batch 4" in advice, advice


def test_t4_advice_on_two_devices_uses_even_batches_and_per_device_memory():
    advice = pt.t4_advice(tiny_config(), subsets=("attention",), device="2x T4 16 GB (Kaggle)",
                          text_len=8, frozen_dtype="int4", min_batch=3, batch_sizes=(3, 4, 6, 8))  # fmt: skip
    assert "fits at batch 4 is 'attention'" in advice and "largest batch is 8" in advice, advice
    with pytest.raises(ValueError, match="multiples of 2"):
        pt.t4_advice(tiny_config(), device="2x T4 16 GB (Kaggle)", batch_sizes=(1, 3))


# ----------------------------------------------------------------------------- loading for it


def test_load_for_training_quantizes_only_the_frozen_matrices(tmp_path):
    import jax
    import numpy as np

    from pali_kit import checkpoints, quant
    from pali_kit.model import init_params

    config = tiny_config()
    params = jax.tree.map(np.asarray, init_params(config, 0))
    path = checkpoints.save_params(params, tmp_path / "tiny.npz")
    loaded, mask, _ = pt.load_for_training(path, trainable="attention", frozen_dtype="float32",
                                           quantize="int4", min_shard_bytes=0)  # fmt: skip
    flat, before, flags = (checkpoints.flatten(t) for t in (loaded, params, mask))
    for key, value in flat.items():
        axes = quant.contraction_axes(key)
        if flags[key] or axes is None:  # trainable (float32, full precision) or small
            assert not isinstance(value, quant.QArray), key
            np.testing.assert_array_equal(np.asarray(value), before[key], key)
        else:  # frozen large matrix: exactly what quantizing the float weight gives
            want = quant.quantize(before[key], "int4", axes)
            assert isinstance(value, quant.QArray) and value.dtype == np.float32, key
            np.testing.assert_array_equal(np.asarray(value.values), want.values, key)
            np.testing.assert_array_equal(np.asarray(value.scales), want.scales, key)
    assert flags["llm/layers/attn/q_einsum/w"] and not flags["llm/layers/mlp/linear"]
    # the loaded tree trains as is: gradients for the float32 attention only
    trainer = pt.Trainer(loaded, config, trainable="attention", num_steps=1,
                         frozen_dtype="float32", copy=False)  # fmt: skip
    assert set(checkpoints.flatten(trainer.state.params)) == {
        k for k, v in flags.items() if v
    }  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32),
        "text": rng.integers(0, config.llm.vocab_size, (2, 9)).astype(np.int32),
        "mask_ar": np.ones((2, 9), np.int32), "mask_loss": np.ones((2, 9), np.int32),
    }  # fmt: skip
    assert np.isfinite(trainer.step(batch)["loss"])
    with pytest.raises(ValueError, match="int3"):
        pt.load_for_training(path, quantize="int3")
