"""Data-parallel training (train.num_processes > 1): two CPU processes over gloo on the tiny GPT-Neo.

The slow tests spawn a second Python process that imports torch/transformers/peft (seconds), hence slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib import checkpoint, dataset, training
# The same tiny settings and prepared dataset as the single-process training tests.
from tests.test_training import prepared, tiny  # noqa: F401  (pytest fixture + helper)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_with_twice_the_batch(prepared, shared_cache):
    # Same global micro-batches, loss divided by the same token count, gradients summed: the first
    # update (and the second, after an optimizer state built from all-reduced gradients) must match.
    single, _, one = training.train_model(prepared, tiny(shared_cache, **{
        "train.max_steps": 2, "train.batch_size": 4, "train.grad_accum": 2}))
    double, _, two = training.train_model(prepared, tiny(shared_cache, **{
        "train.max_steps": 2, "train.batch_size": 2, "train.grad_accum": 2, "train.num_processes": 2}))
    a, b = lora_weights(single), lora_weights(double)
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert [h["train_loss"] for h in one.history] == pytest.approx([h["train_loss"] for h in two.history], abs=1e-5)
    assert one.tokens == two.tokens  # both count the whole global batch


@pytest.mark.slow
def test_two_processes_train_an_adapter_that_loads(prepared, shared_cache, tmp_path):
    from peft import PeftModel

    from lib.base_model import load_base_model

    config = tiny(shared_cache, **{"train.max_steps": 30, "train.learning_rate": 0.01, "train.batch_size": 4,
                                   "train.num_processes": 2, "train.checkpoint_every": 10})
    logged: list[int] = []
    result = training.train_adapter(prepared, config, tmp_path / "out", on_log=lambda step, record, progress: logged.append(step),
                                    checkpoint_dir=tmp_path / "ckpt", run_id="r")
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
    config = tiny(shared_cache, **{"train.max_steps": "null", "train.epochs": 1, "train.batch_size": 4, "train.grad_accum": 2})
    # 100 blocks: 25 micro-batches of 4 -> 13 steps alone; 13 global micro-batches of 2 x 4 -> 7 steps with 2 ranks
    assert training.count_steps(100, config) == 13
    assert training.count_steps(100, config, world=2) == 7
