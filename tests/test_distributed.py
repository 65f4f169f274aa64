"""Data-parallel training (train.num_processes > 1): torchrun starts two CPU processes (gloo, DDP) on the tiny GPT-Neo.

The slow tests start torchrun and two Python processes that import torch/transformers/peft (seconds each).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib import checkpoint, dataset, steps, training

# The same tiny settings and prepared dataset as the single-process training tests.
from tests.conftest import tiny_overrides
from tests.support.training import tiny  # and the `prepared` fixture (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def saved_weights(result: training.TrainResult) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(result.adapter_dir) / "adapter_model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_no_child_processes(groups: list[int] = ()) -> None:
    """torchrun and its ranks are gone once train_adapter returns or raises: no child of this process
    runs them, and no live process is left in the process groups `launched` recorded (orphans too)."""
    import psutil

    children = [c.cmdline() for c in psutil.Process().children(recursive=True)]  # the Prefect server's too
    assert not [c for c in children if "lib.train_entry" in c or "torch.distributed.run" in c], children
    left = []
    for process in psutil.process_iter(["pid", "status", "cmdline"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(process.info)
    assert not left, left


@pytest.fixture
def launched(monkeypatch) -> list[int]:
    """The process groups (torchrun's pid) lib/launch.py starts during the test."""
    from lib import launch

    groups: list[int] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        child = real(*args, **kwargs)
        groups.append(child.pid)
        return child

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    return groups


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_with_twice_the_batch(prepared, shared_cache, tmp_path):
    # Same global micro-batches, loss divided by the same token count, DDP's all-reduce: the first update
    # (and the second, after an optimizer state built from all-reduced gradients) must match.
    one = training.train_adapter(
        prepared,
        tiny(shared_cache, **{"train.max_steps": 2, "train.batch_size": 4, "train.grad_accum": 2}),
        tmp_path / "one",
    )
    logged: list = []
    two = training.train_adapter(
        prepared,
        tiny(
            shared_cache,
            **{"train.max_steps": 2, "train.batch_size": 2, "train.grad_accum": 2, "train.num_processes": 2},
        ),
        tmp_path / "two",
        on_log=lambda step, record, progress: logged.append((step, record, progress)),
    )
    assert_no_child_processes()
    assert max_difference(saved_weights(one), saved_weights(two)) < 1e-5
    assert [h["train_loss"] for h in one.history] == pytest.approx([h["train_loss"] for h in two.history], abs=1e-5)
    assert one.tokens == two.tokens  # both count the whole global batch
    assert two.adapter_dir == str(tmp_path / "two" / "adapter") and two.steps == 2
    # rank 0's on_log calls reach this process: each step with its Progress, then the final validation.
    assert [(step, type(progress).__name__) for step, _, progress in logged] == [
        (1, "Progress"),
        (2, "Progress"),
        (2, "NoneType"),
    ]
    assert logged[0][1]["train_loss"] == pytest.approx(two.history[0]["train_loss"])


@pytest.mark.slow
def test_two_processes_train_an_adapter_that_loads(prepared, shared_cache, tmp_path):
    from peft import PeftModel

    from lib.base_model import load_base_model

    config = tiny(
        shared_cache,
        **{
            "train.max_steps": 30,
            "train.learning_rate": 0.01,
            "train.batch_size": 4,
            "train.num_processes": 2,
            "train.checkpoint_every": 10,
        },
    )
    logged: list[int] = []
    result = training.train_adapter(
        prepared,
        config,
        tmp_path / "out",
        on_log=lambda step, record, progress: logged.append(step),
        checkpoint_dir=tmp_path / "ckpt",
        run_id="r",
    )
    # on_log and checkpoints come from rank 0 only: one call per step (+ the final validation), one writer.
    assert logged == list(range(1, 31)) + [30]
    assert checkpoint.latest(tmp_path / "ckpt").step == 30
    assert checkpoint.latest(tmp_path / "ckpt").run_id == "r"
    base_path = json.loads((Path(prepared) / "lenta_lora_dataset.json").read_text())["base"]
    model = PeftModel.from_pretrained(load_base_model(base_path, config.model), result.adapter_dir)
    blocks = dataset.load_prepared(prepared)["validation_blocks"]
    tuned = steps.validation_loss(model, blocks, 8)
    with model.disable_adapter():
        base = steps.validation_loss(model, blocks, 8)
    assert tuned == pytest.approx(result.validation_loss, abs=1e-5)  # the saved adapter is the trained one
    assert tuned < base - 0.004, (base, tuned)


def test_an_epoch_is_shared_by_the_processes(shared_cache):
    config = tiny(
        shared_cache, **{"train.max_steps": "null", "train.epochs": 1, "train.batch_size": 4, "train.grad_accum": 2}
    )
    # 100 blocks: 25 micro-batches of 4 -> 13 steps alone; 13 global micro-batches of 2 x 4 -> 7 steps with 2 ranks
    assert steps.count_steps(100, config.train) == 13
    assert steps.count_steps(100, config.train, world=2) == 7


@pytest.mark.slow
def test_a_rank_with_an_empty_shard_still_joins_the_steps_all_reduce(prepared, shared_cache, tmp_path):
    """One epoch whose short last micro-batch holds at most `batch_size` blocks: all rank 0's, none for
    rank 1, which must still take part in that step's all-reduce (else DDP waits for it forever)."""
    blocks = len(dataset.load_prepared(prepared)["train_blocks"])
    batch = next(b for b in range(2, blocks) if 0 < blocks % (2 * b) <= b)
    settings = {"train.max_steps": "null", "train.epochs": 1, "train.grad_accum": 1}
    one = training.train_adapter(
        prepared, tiny(shared_cache, **settings, **{"train.batch_size": 2 * batch}), tmp_path / "one"
    )
    two = training.train_adapter(
        prepared,
        tiny(shared_cache, **settings, **{"train.batch_size": batch, "train.num_processes": 2}),
        tmp_path / "two",
    )
    assert two.steps == one.steps == -(-blocks // (2 * batch))
    assert max_difference(saved_weights(one), saved_weights(two)) < 1e-5
    assert [h["train_loss"] for h in one.history] == pytest.approx([h["train_loss"] for h in two.history], abs=1e-5)


@pytest.mark.slow
def test_two_processes_resume_from_a_checkpoint_as_if_never_stopped(
    prepared, shared_cache, tmp_path, monkeypatch, launched
):
    """2 ranks, 6 steps straight vs rank 0 killed (SIGKILL) right after checkpointing step 4, then a
    resume with 2 ranks: every rank restores rank 0's checkpoint, and the task process hears of it."""
    from lib.launch import TrainingProcessesFailed

    config = tiny(
        shared_cache,
        **{"train.max_steps": 6, "train.batch_size": 2, "train.num_processes": 2, "train.checkpoint_every": 2},
    )
    expected = training.train_adapter(prepared, config, tmp_path / "straight")
    folder = tmp_path / "ckpt"
    monkeypatch.setenv("LENTA_LORA_FAULT", "train.step-4")  # inherited by torchrun's ranks
    with pytest.raises(
        TrainingProcessesFailed, match=r"the 2 training processes failed \(torchrun exit code"
    ) as failed:
        training.train_adapter(prepared, config, tmp_path / "a", checkpoint_dir=folder, run_id="a")
    assert "SIGKILL" in str(failed.value) and "\n" not in str(failed.value)  # the tail of torchrun's report
    assert len(launched) == 2 and launched[0] != launched[1]  # the straight run's torchrun and this one's
    assert_no_child_processes(launched)
    assert checkpoint.latest(folder).step == 4 and not (tmp_path / "a").exists()
    monkeypatch.delenv("LENTA_LORA_FAULT")
    resumed_from: list = []
    result = training.train_adapter(
        prepared, config, tmp_path / "b", checkpoint_dir=folder, run_id="b", on_resume=resumed_from.append
    )
    assert [(c.step, c.total_steps, c.run_id) for c in resumed_from] == [(4, 6, "a")]
    assert result.resumed_from_step == 4 and result.steps == 6
    assert [h["train_loss"] for h in result.history] == pytest.approx(
        [h["train_loss"] for h in expected.history], abs=1e-6
    )
    assert max_difference(saved_weights(expected), saved_weights(result)) < 1e-6


@pytest.mark.slow
def test_a_ranks_error_reaches_the_caller_with_its_type_and_message(prepared, shared_cache, tmp_path, launched):
    # The settings of tests/test_training.py's divergence test: NaN loss at step 3 (on every rank).
    config = tiny(
        shared_cache,
        **{
            "train.max_steps": 20,
            "train.learning_rate": 1e6,
            "lora.target_modules": "all-linear",
            "train.batch_size": 2,
            "train.num_processes": 2,
        },
    )
    logged: list[int] = []
    with pytest.raises(steps.TrainingDiverged, match=r"training loss is \S+ at optimizer step") as error:
        training.train_adapter(
            prepared, config, tmp_path / "out", on_log=lambda step, record, progress: logged.append(step)
        )
    assert "no adapter was saved" in str(error.value) and "\n" not in str(error.value)
    assert len(launched) == 1
    assert_no_child_processes(launched)
    assert logged and logged == list(range(1, len(logged) + 1))  # steps before the NaN were relayed
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_error_in_the_task_process_stops_the_ranks(prepared, shared_cache, tmp_path, launched):
    """on_log failing (say MLflow went away) or Ctrl-C while the ranks train: the error propagates
    and torchrun's whole process group is ended, long before its 200 steps could finish."""

    class Crash(Exception):
        pass

    def on_log(step, record, progress):
        raise Crash(step)

    config = tiny(shared_cache, **{"train.max_steps": 200, "train.batch_size": 2, "train.num_processes": 2})
    with pytest.raises(Crash):
        training.train_adapter(prepared, config, tmp_path / "out", on_log=on_log)
    assert len(launched) == 1
    assert_no_child_processes(launched)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accelerate_launch_trains_with_the_launchers_process_group(prepared, shared_cache, tmp_path):
    """`accelerate launch` starts 2 CPU processes of lib.train_entry; they make the same update as one
    process with twice the batch, and only rank 0 saves the adapter and prints the result."""
    settings = {"train.max_steps": 3, "train.batch_size": 2}
    expected, _, _ = training.train_model(prepared, tiny(shared_cache, **{**settings, "train.batch_size": 4}))
    overrides = [
        f"--set={o}"
        for o in tiny_overrides(
            shared_cache, **{"lora.dropout": 0.0, "train.eval_every": "null", "train.warmup_steps": 0, **settings}
        )
    ]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--multi_gpu",
        "-m",
        "lib.train_entry",
        "--config",
        "configs/demo.yaml",
        *overrides,
        "--dataset",
        prepared,
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1 and results[0]["world_size"] == 2 and results[0]["steps"] == 3

    from peft import PeftModel

    from lib.base_model import load_base_model

    base_path = json.loads((Path(prepared) / "lenta_lora_dataset.json").read_text())["base"]
    config = tiny(shared_cache, **settings)
    launched = PeftModel.from_pretrained(load_base_model(base_path, config.model), results[0]["adapter_dir"])
    a, b = lora_weights(expected), lora_weights(launched)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_the_flow_trains_with_two_processes_through_the_launcher(prefect_server, shared_cache, tracking_uri):
    """`train.num_processes=2` end to end: the train task starts torchrun, and what rank 0 reports
    (each step's loss, the progress artifact) still reaches MLflow and Prefect from the task process."""
    from mlflow import MlflowClient

    from flows.cli import DEFAULT_PROFILE
    from flows.finetune import finetune
    from lib.config import load_config
    from tests.support.artifacts import artifact_data

    config = load_config(DEFAULT_PROFILE, tiny_overrides(shared_cache, **{"train.num_processes": 2}))
    summary = finetune(config=config)
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(summary["run_id"], "train_loss")] == [1, 2, 3, 4]
    assert run.data.params["train.effective_batch"] == str(2 * config.train.batch_size * config.train.grad_accum)
    assert "test_perplexity" in run.data.metrics and summary["model"]["version"] == 1
    assert float(artifact_data("training-progress")) == 100.0
    assert_no_child_processes()


def test_a_failure_without_a_result_is_one_line_naming_the_rank_error(tmp_path):
    from lib import launch

    log = tmp_path / "output.log"
    log.write_text(
        "[rank1]: Traceback (most recent call last):\n"
        '[rank1]:   File "lib/steps.py", line 3, in batch_nll\n'
        "[rank1]: ValueError: shapes do not match\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "  exitcode  : 1 (pid: 12)\n"
        "=======\n"
    )
    tail = launch.output_tail(log)
    assert tail.startswith("[rank1]: ValueError: shapes do not match | ") and "exitcode  : 1" in tail
    assert "\n" not in tail and launch.output_tail(tmp_path / "missing.log") == "(no output)"
