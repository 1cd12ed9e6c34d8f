"""Multi-process training for real (JAX's distributed runtime, CPU collectives over localhost),
and ``pali-kit finetune`` / ``pali-kit eval`` end to end through subprocesses.

The same run (demo model, sample dataset, seed 0, global batch 8, attention
weights, plain SGD) is made

- A: in 1 process with 4 CPU devices, in two pieces (steps 1-2, then
  ``--resume`` for 3-4; test_train shows a resumed run equals an
  uninterrupted one);
- B: in 2 processes with 2 CPU devices each, steps 1-2 (process 1 is given
  its own ``--out``, as a host without a shared disk, to show it writes nothing);
- R: B's checkpoint resumed in 1 process with 4 devices, steps 3-4.

Tolerances. Both meshes have 4 devices holding 2 rows each, so every device
computes the same per-row numbers; what differs is how the 4 partial sums of
the loss and the gradients are reduced (in-process collectives vs gloo across
processes), i.e. the association order of 4 float32 terms: at most ~3 eps
(4e-7) relative per reduction. Plain SGD carries that into the weights as
lr * |g| * 4e-7, far below 1e-5 (weights here are O(0.1)), and the next
losses move by the same relative amount; 1e-4 relative on losses and 1e-5 on
weights leave a margin of > 100x over two steps. Frozen weights are never
touched: bit-identical. Greedy decoding of weights that close gives the same
tokens unless two logits tie within ~1e-6, so evaluation scores must agree exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pali_kit.assets import asset_dir

SAMPLE = asset_dir() / "sample_dataset"
RUN = ["--model", "demo", "--steps", "4", "--batch-size", "8", "--trainable", "llm/layers/attn/.*",
       "--text-len", "24", "--lr", "0.01", "--seed", "0", "--no-progress"]  # fmt: skip
TIMEOUT = 240  # seconds for one run; a healthy one takes 10-40 s on 2 busy cores
ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    env["PALI_KIT_COMPILATION_CACHE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "pali_kit.cli", *map(str, args)]


def _run(args, devices: int = 4, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=_env(devices), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _free_port() -> int:
    """A port the OS just handed out (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(argvs, devices: int):
    """Run the commands at once; when one fails (or after TIMEOUT) the rest are killed.

    Output goes to files (no pipe can fill up and block a process).
    Returns ``[(returncode, stdout, stderr)]``.
    """
    procs, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/{i}.out", "w+"), open(f"{logs}/{i}.err", "w+"))  # noqa: SIM115
                 for i in range(len(argvs))]  # fmt: skip
        try:
            for argv, (out, err) in zip(argvs, files):
                procs.append(subprocess.Popen(_cli(*argv), env=_env(devices), stdout=out,
                                              stderr=err))  # fmt: skip
            while any(p.poll() is None for p in procs):
                failed = any(p.poll() not in (None, 0) for p in procs)
                if failed or time.perf_counter() - start > TIMEOUT:
                    break  # processes of one run would wait for it until JAX's timeouts
                time.sleep(0.2)
        finally:
            for p in procs:  # on a failure, a timeout or an exception: nothing left running
                if p.poll() is None:
                    p.kill()
                p.wait()
        outputs = []
        for p, (out, err) in zip(procs, files):
            out.seek(0), err.seek(0)
            outputs.append((p.returncode, out.read(), err.read()))
            out.close(), err.close()
    return outputs


def _run_processes(args_of, n: int, devices: int, tries: int = 3):
    """The ``n`` processes ``args_of(port, i)`` of one run: ``(outputs, seconds)``.

    Retries with a new port when the coordinator's port was taken in between.
    """
    for attempt in range(tries):
        port, start = _free_port(), time.perf_counter()
        outputs = _run_together([args_of(port, i) for i in range(n)], devices)
        if any("could not listen" in err for _, _, err in outputs) and attempt + 1 < tries:
            continue  # the port was taken between _free_port and the coordinator: again
        return outputs, time.perf_counter() - start
    raise AssertionError("unreachable")


def _history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if k.startswith("params/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A (1 process), B (2 processes), R (B resumed in 1 process); their folders and times."""
    tmp = tmp_path_factory.mktemp("runs")
    train = SAMPLE / "train.jsonl"
    a, b, b1 = tmp / "A", tmp / "B", tmp / "B_process1"
    evaluate = ["--val", SAMPLE / "val.jsonl", "--max-new-tokens", "12"]
    seconds = {}

    t0 = time.perf_counter()
    tokenizer = tmp / "tok" / "my_tokenizer.model"  # a tokenizer given by path is kept in --out
    tokenizer.parent.mkdir()
    shutil.copy(asset_dir() / "tokenizer.model", tokenizer)
    first = _run(["finetune", train, "--out", a, *RUN, "--until", "2", "--tokenizer", tokenizer])
    seconds["A steps 1-2, 1 process"] = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr[-3000:]

    def args_of(port, i):
        out = b if i == 0 else b1
        return ["finetune", train, "--out", out, *RUN, "--until", "2", *evaluate,
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", i]  # fmt: skip

    outputs, seconds["B steps 1-2, 2 processes"] = _run_processes(args_of, 2, devices=2)
    for i, (code, _, err) in enumerate(outputs):
        assert code == 0, f"process {i}:\n{err[-3000:]}"
    b_files = sorted(p.name for p in b.iterdir())
    b_history = _history(b)
    shutil.copy(b / "model.npz", tmp / "B_step2.npz")  # the resumes below overwrite them
    shutil.copy(a / "model.npz", tmp / "A_step2.npz")
    t0 = time.perf_counter()  # independent: A resumed, and B continued in 1 process, at once
    resumes = _run_together([["finetune", train, "--out", folder, *RUN, "--resume"]
                             for folder in (a, b)], devices=4)  # fmt: skip
    seconds["A steps 3-4 and R (B resumed), 1 process each, together"] = time.perf_counter() - t0
    for (code, _, err), name in zip(resumes, "AB"):
        assert code == 0, f"{name} resumed:\n{err[-3000:]}"
    print("\nwall times:", {k: round(v, 1) for k, v in seconds.items()})
    return dict(a=a, b=b, b1=b1, b_files=b_files, b_history=b_history, outputs=outputs,
                a2=tmp / "A_step2.npz", b2=tmp / "B_step2.npz")  # fmt: skip


@pytest.mark.slow
def test_two_processes_compute_the_one_process_steps(runs):
    a, b = _history(runs["a"]), _history(runs["b"])
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    print("\nstep  loss 1 process x 4 devices  loss 2 processes x 2 devices (then 1 process)")
    for x, y in zip(a, b):
        print(f"{x['step']:>4}  {x['loss']:.8f}  {y['loss']:.8f}")
    # The same loss with the 4 devices' partial sums added in another order: re-association
    # only, FORWARD_REL (1e-4) of the loss (tests/conftest.py).
    np.testing.assert_allclose([r["loss"] for r in b[:2]], [r["loss"] for r in a[:2]], rtol=1e-4)
    # The weights differ by the updates' rounding only: lr (0.01) times updates of size <= 1,
    # each off by ~1e-4 of itself, is ~1e-6; atol = 1e-5 bounds it. The checkpoint the 2 processes wrote at step 2 holds the 1-process weights
    two, one = _weights(runs["b2"]), _weights(runs["a2"])
    assert two.keys() == one.keys() and len(one) == 34
    for key in one:
        if "/attn/" in key:
            np.testing.assert_allclose(two[key], one[key], atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(two[key], one[key], err_msg=key)


@pytest.mark.slow
def test_only_process_0_writes(runs):
    assert not runs["b1"].exists()  # process 1's --out: never created
    (code0, out0, _), (code1, out1, _) = runs["outputs"]
    assert "wrote" in out0 and "wrote" not in out1
    kept = runs["a"] / "paligemma_tokenizer.model"  # A was given --tokenizer PATH
    assert kept.read_bytes() == (asset_dir() / "tokenizer.model").read_bytes()
    assert runs["b_files"] == ["history.jsonl", "model.npz", "run.json"]
    assert [r["step"] for r in runs["b_history"]] == [1, 2]  # one line per step: one writer


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    a, r = _history(runs["a"]), _history(runs["b"])
    np.testing.assert_allclose([x["loss"] for x in r[2:]], [x["loss"] for x in a[2:]], rtol=1e-4)
    # the schedule: the same float arithmetic on the same step numbers (rtol = 8 float32 eps);
    # losses and weights as in test_two_processes_compute_the_one_process_steps
    np.testing.assert_allclose([x["lr"] for x in r], [x["lr"] for x in a], rtol=1e-6)
    resumed, one = _weights(runs["b"] / "model.npz"), _weights(runs["a"] / "model.npz")
    for key in one:
        np.testing.assert_allclose(resumed[key], one[key], atol=1e-5, err_msg=key)
    with np.load(runs["b"] / "model.npz") as npz:
        assert int(npz["train/step"]) == 4


@pytest.mark.slow
def test_eval_command_gives_the_scores_the_trainer_logged(runs):
    """``pali-kit eval`` (1 process) of the 1-process step-2 checkpoint scores what the
    2-process trainer's evaluation logged at step 2 (weights within ~1e-7: see the top)."""
    run = _run(
        ["eval", runs["a2"], SAMPLE / "val.jsonl", "--max-new-tokens", "12", "--json"], devices=1
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    logged = {k: v for k, v in runs["b_history"][1].items() if "/" in k}  # task/metric
    assert {"caption/cider", "count/exact_match", "color/exact_match", "detect/map"} <= set(logged)
    assert result["examples"] == 16 and result["scores"] == logged
    assert "loss" in runs["b_history"][0] and "caption/cider" not in runs["b_history"][0]


# ----------------------------------------------------------------------------- bad arguments

USAGE = 2  # argparse's status for a bad command line
RUNTIME = 1  # the command line was fine, running it failed


@pytest.mark.slow
def test_bad_arguments_end_to_end(tmp_path):
    """As a user sees them: exit status and the message on stderr's last line."""
    train = SAMPLE / "train.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/shapes_00.png", "prefix": "caption en"\n')
    cases = {  # name: (argv, devices, status, what the last line says)
        "no model": (["finetune", train, "--out", tmp_path / "x"], 1, USAGE,
                     "the following arguments are required: --model"),
        "batch vs devices": (["finetune", train, *RUN, "--out", tmp_path / "y",
                              "--batch-size", "6"], 4, USAGE,
                             "--batch-size: 6 is not a multiple of the 4 devices"),
        "bad jsonl line": (["finetune", bad, *RUN, "--out", tmp_path / "z"], 1, RUNTIME,
                           "bad.jsonl:1: invalid JSON"),
        "eval missing model": (["eval", tmp_path / "none.npz", SAMPLE / "val.jsonl"], 1,
                               RUNTIME, "none.npz: no such file"),
    }  # fmt: skip
    procs = {}
    try:
        for name, (argv, devices, _, _) in cases.items():
            procs[name] = subprocess.Popen(_cli(*argv), env=_env(devices), text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        for name, (_, _, status, message) in cases.items():
            _, err = procs[name].communicate(timeout=TIMEOUT)
            last = err.strip().splitlines()[-1]
            assert procs[name].returncode == status, f"{name}: {err[-2000:]}"
            assert last.startswith("pali-kit") and message in last, f"{name}: {err[-2000:]}"
            if status == RUNTIME:  # the kit's own message: exactly one line
                assert len(err.strip().splitlines()) == 1, f"{name}: {err[-2000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "argument --steps: steps must be > 0, got 0"),
        (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
        (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
        (["--coordinator", "127.0.0.1:1234"], "go together: give all three"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
         "'localhost' is not HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id: 2 must be in 0...1"),
        (["--until", "9"], "--until: 9 is after the last step (--steps 4)"),
        (["--eval-every", "2"], "--eval-every needs --val"),
        (["--metric", "f1"], "--metric: 'f1' is not one of auto, cider"),
        (["--frozen-dtype", "int8"], "--frozen-dtype: 'int8' is a quantization scheme"),
        (["--trainable", "attention/.*"], "--trainable: trainable='attention/.*' matches no"),
        (["--resume"], "model.npz does not exist (start the run without --resume)"),
    ],
)  # fmt: skip
def test_finetune_usage_errors(argv, message, tmp_path, capsys):
    from pali_kit import cli

    assert (
        cli.main(["finetune", str(SAMPLE / "train.jsonl"), *RUN, "--out", str(tmp_path), *argv])
        == USAGE
    )
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_finetune_refuses_to_overwrite_a_run_and_checks_the_files(tmp_path, capsys):
    from pali_kit import cli

    (tmp_path / "model.npz").write_bytes(b"")
    train = str(SAMPLE / "train.jsonl")
    for argv, message in [
        ([train, "--out", str(tmp_path)], "already holds model.npz: pass --resume"),
        ([str(tmp_path / "no.jsonl"), "--out", str(tmp_path / "o")], "no.jsonl does not exist"),
        ([train, "--out", str(tmp_path / "o"), "--val", "v.jsonl"], "v.jsonl does not exist"),
    ]:
        assert cli.main(["finetune", *argv, "--model", "demo"]) == USAGE
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    (tmp_path / "run.json").write_text(json.dumps({"steps": 3, "lr": None}))
    assert (
        cli.main(["finetune", train, "--out", str(tmp_path), "--model", "demo", "--resume"])
        == USAGE
    )
    assert "used --steps 3, not 64; give the same value to continue it, or start a new run" in (
        capsys.readouterr().err
    )
    assert cli.main(["eval", "demo", str(SAMPLE / "val.jsonl"), "--metric", "f1"]) == USAGE


def test_cpu_collectives_are_chosen_without_starting_jax(monkeypatch):
    from pali_kit.train import distributed

    if distributed.jax.config.jax_platforms:  # set when JAX started: it decides alone
        pytest.skip("JAX_PLATFORMS was set when JAX started")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not distributed.devices_are_cpus()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert distributed.devices_are_cpus()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(distributed, "_module_present", lambda name: name == "libtpu")
    assert not distributed.devices_are_cpus()  # a TPU runtime is installed
    monkeypatch.setattr(distributed, "_module_present", lambda name: False)
    assert distributed.devices_are_cpus()
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize_distributed("127.0.0.1:1", None, None)
    with pytest.raises(ValueError, match="process_id=2 must be in 0..1"):
        distributed.initialize_distributed("127.0.0.1:1", 2, 2)


def test_a_resumed_history_keeps_the_lines_up_to_its_checkpoint(tmp_path):
    from pali_kit import cli_train

    path = tmp_path / "history.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed while writing step 4
    cli_train._start_history(path, 2)  # the checkpoint is at step 2
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    cli_train._start_history(path, 0)  # a new run
    assert path.read_text() == ""
