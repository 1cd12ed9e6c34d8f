"""The train step sharded over 8 (forced CPU) devices equals the single-device step.

JAX fixes its device count when it starts, so the sharded run happens in a
fresh Python process with ``--xla_force_host_platform_device_count=8``; it
saves its results to a file that this test compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = r"""
import sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
from conftest import tiny_config
from pali_kit import checkpoints, data as pdata, train as pt
from pali_kit.model import init_params
from pali_kit.tokenizer import Tokenizer

assert jax.device_count() == 8, jax.devices()
config = tiny_config()
params = jax.tree.map(np.asarray, init_params(config, 0))  # host arrays: no reshard compiles
rng = np.random.default_rng(0)
examples = [pdata.Example(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), "caption en",
                          f"shape number {{i}}") for i in range(16)]
batcher = pdata.Batcher(examples, Tokenizer.demo(), batch_size=8, text_len=12, image_size=28,
                        seed=0, prefetch=0)
out = {{}}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = pt.make_mesh(devices)
    # min_shard_bytes=0: the tiny weights are sharded too, as a 3B model's would be
    # SGD with momentum: Adam would blow up float noise in (mathematically) zero
    # gradients, such as the attention key biases', into full-size updates
    trainer = pt.Trainer(params, config, trainable="all", optimizer="sgd", lr=0.1, momentum=0.9,
                         num_steps=3, clip_norm=1.0, mesh=mesh, min_shard_bytes=0)
    trainer.fit(batcher, progress=False)
    out[f"{{name}}/loss"] = np.asarray(trainer.history.loss)
    for key, value in checkpoints.flatten(trainer.params).items():
        out[f"{{name}}/params/{{key}}"] = np.asarray(value)
    if name == "eight":
        table = trainer.state.params["llm"]["embedder"]["input_embedding"]
        mu = trainer.state.opt_state[1][0].trace["llm"]["embedder"]["input_embedding"]
        out["eight/table_shard_rows"] = np.asarray(table.addressable_shards[0].data.shape[0])
        out["eight/mu_shard_rows"] = np.asarray(mu.addressable_shards[0].data.shape[0])
        # a checkpoint of the sharded state loads back onto the mesh, sharded
        path = trainer.save({tmp!r} + "/sharded.npz")
        loaded, mask, _ = pt.load_for_training(path, trainable="all", mesh=mesh,
                                               min_shard_bytes=0)
        again = loaded["llm"]["embedder"]["input_embedding"]
        out["eight/loaded_shard_rows"] = np.asarray(again.addressable_shards[0].data.shape[0])
        # decoding (the evaluator) runs on the sharded weights too
        result = pt.evaluate(trainer.params, config, examples[:2], Tokenizer.demo(),
                             metric="exact_match", batch_size=2, max_new_tokens=3)
        out["eight/predictions"] = np.asarray(len(result.predictions))
        out["eight/loaded_equal"] = np.asarray(all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainer.params))))
np.savez({tmp!r} + "/results.npz", **out)
"""


def test_step_sharded_over_8_devices_equals_one_device(tmp_path):
    tests = str(Path(__file__).parent)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["PALI_KIT_COMPILATION_CACHE"] = "0"
    code = CHILD.format(tests=tests, tmp=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    res = dict(np.load(tmp_path / "results.npz"))

    np.testing.assert_allclose(res["eight/loss"], res["one/loss"], rtol=1e-5)
    keys = [k[len("one/params/") :] for k in res if k.startswith("one/params/")]
    assert len(keys) == 34
    for key in keys:
        np.testing.assert_allclose(
            res[f"eight/params/{key}"], res[f"one/params/{key}"], atol=2e-6, err_msg=key
        )
    # the embedding (2176 x 32) and its momentum are split 8 ways along the vocabulary
    assert res["eight/table_shard_rows"] == 2176 // 8
    assert res["eight/mu_shard_rows"] == 2176 // 8
    assert res["eight/loaded_shard_rows"] == 2176 // 8
    assert res["eight/loaded_equal"]
    assert res["eight/predictions"] == 2
