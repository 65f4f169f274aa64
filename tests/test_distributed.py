"""Data-parallel training (train.num_processes > 1): two CPU processes over gloo on the tiny GPT-Neo.

The slow tests spawn a second Python process that imports torch/transformers/peft (seconds), hence slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib import checkpoint, dataset, training

# The same tiny settings and prepared dataset as the single-process training tests.
from tests.conftest import tiny_overrides
from tests.support.training import tiny  # and the `prepared` fixture (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_with_twice_the_batch(prepared, shared_cache):
    # Same global micro-batches, loss divided by the same token count, gradients summed: the first
    # update (and the second, after an optimizer state built from all-reduced gradients) must match.
    single, _, one = training.train_model(
        prepared, tiny(shared_cache, **{"train.max_steps": 2, "train.batch_size": 4, "train.grad_accum": 2})
    )
    double, _, two = training.train_model(
        prepared,
        tiny(
            shared_cache,
            **{"train.max_steps": 2, "train.batch_size": 2, "train.grad_accum": 2, "train.num_processes": 2},
        ),
    )
    a, b = lora_weights(single), lora_weights(double)
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert [h["train_loss"] for h in one.history] == pytest.approx([h["train_loss"] for h in two.history], abs=1e-5)
    assert one.tokens == two.tokens  # both count the whole global batch


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
    base_path = json.loads((Path(prepared) / "lenta_lora_dataset.json").read_text())["base"]
    model = PeftModel.from_pretrained(load_base_model(base_path, config.model), result.adapter_dir)
    blocks = dataset.load_prepared(prepared)["validation_blocks"]
    tuned = training.validation_loss(model, blocks, 8)
    with model.disable_adapter():
        base = training.validation_loss(model, blocks, 8)
    assert tuned == pytest.approx(result.validation_loss, abs=1e-5)  # the saved adapter is the trained one
    assert tuned < base - 0.004, (base, tuned)


def test_an_epoch_is_shared_by_the_processes(shared_cache):
    config = tiny(
        shared_cache, **{"train.max_steps": "null", "train.epochs": 1, "train.batch_size": 4, "train.grad_accum": 2}
    )
    # 100 blocks: 25 micro-batches of 4 -> 13 steps alone; 13 global micro-batches of 2 x 4 -> 7 steps with 2 ranks
    assert training.count_steps(100, config.train) == 13
    assert training.count_steps(100, config.train, world=2) == 7


class Crash(Exception):
    pass


def crash_at(step_to_fail: int):
    def on_log(step, record, progress):
        if step == step_to_fail:
            raise Crash(step)

    return on_log


@pytest.mark.slow
def test_two_processes_resume_from_a_checkpoint_as_if_never_stopped(prepared, shared_cache, tmp_path):
    """2 ranks, 6 steps straight vs a crash while logging step 4 (rank 0 checkpoints step 4, the
    other rank is terminated), then a resume with 2 ranks: every rank restores rank 0's checkpoint."""
    config = tiny(
        shared_cache,
        **{"train.max_steps": 6, "train.batch_size": 2, "train.num_processes": 2, "train.checkpoint_every": 3},
    )
    straight, _, expected = training.train_model(prepared, config)
    folder = tmp_path / "ckpt"
    with pytest.raises(Crash):
        training.train_model(prepared, config, on_log=crash_at(4), checkpoint_dir=folder, run_id="a")
    assert checkpoint.latest(folder).step == 4
    resumed, _, result = training.train_model(prepared, config, checkpoint_dir=folder, run_id="b")
    assert result.resumed_from_step == 4 and result.steps == 6
    assert [h["train_loss"] for h in result.history] == pytest.approx(
        [h["train_loss"] for h in expected.history], abs=1e-6
    )
    a, b = lora_weights(straight), lora_weights(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


@pytest.mark.slow
def test_accelerate_launch_trains_with_the_launchers_process_group(prepared, shared_cache, tmp_path):
    """`accelerate launch` starts 2 CPU processes of lib.train_entry; they make the same update as
    train.num_processes=2 does, and only rank 0 saves the adapter and prints the result."""
    settings = {"train.max_steps": 3, "train.batch_size": 2}
    expected, _, _ = training.train_model(prepared, tiny(shared_cache, **settings, **{"train.num_processes": 2}))
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
