"""Training faults at flow level: a diverging loss, and running out of memory.

- NaN/inf loss (learning rate 1e6): the flow stops at the bad step, the MLflow run is FAILED,
  nothing is registered, no adapter is written.
- Out of memory on CPU, for real: a child process whose address space is capped (RLIMIT_AS) just
  above what it has mapped trains with a micro-batch far too big for that; the allocator's failure
  becomes one actionable error (what to lower), not a 40-line traceback.
- Out of memory on a GPU: none here, so the step's forward raises the exception CUDA raises
  (`torch.OutOfMemoryError`) from a hook on the real model; the same advice must come out.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib import steps, training
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.harness import ROOT, all_runs


def tiny(cache: str, **extra):
    return load_config(DEFAULT_PROFILE, tiny_overrides(cache, **{"train.eval_every": "null", **extra}))


def test_diverging_flow_is_failed_and_registers_nothing(prefect_server, shared_cache, tracking_uri):
    from flows.finetune import finetune

    # all-linear, not the demo's head-only LoRA: at this rate a head-only adapter's loss grows huge but
    # stays finite (its evaluation then reports an infinite perplexity).
    overrides = {"train.max_steps": 20, "train.learning_rate": 1e6, "lora.target_modules": "all-linear"}
    config = tiny(shared_cache, **overrides, **{"registry.model_name": "nan"})
    # demo.yaml warms up over 10 steps from lr 0: steps 2-3 run at 1e5 and 2e5, step 4's 3e5 gives a NaN loss.
    with pytest.raises(steps.TrainingDiverged, match="at optimizer step 4 of 20.*no adapter was saved"):
        finetune(config=config)
    client = MlflowClient(tracking_uri)
    [run] = all_runs(client)
    assert run.info.status == "FAILED"
    assert client.search_model_versions("name='nan'") == []
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert not list(
        client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    )


# The child maps everything it needs first (one training step at a small batch), then caps its
# address space 200 MB above that and asks for a micro-batch whose logits alone need ~0.5 GB.
OOM_CHILD = r"""
import resource, sys
from flows.cli import DEFAULT_PROFILE
from lib import steps, training
from lib.config import load_config
from tests.conftest import tiny_overrides

cache, prepared = sys.argv[1:3]
# all-linear, as a real run: the demo's head-only LoRA keeps no activations of the layers below for backward
linear = {"train.max_steps": 1, "lora.target_modules": "all-linear"}
small = load_config(DEFAULT_PROFILE, tiny_overrides(cache, **linear, **{"train.batch_size": 2}))
training.train_model(prepared, small)
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 200 * 2**20, resource.RLIM_INFINITY))
big = load_config(DEFAULT_PROFILE, tiny_overrides(cache, **linear, **{"train.batch_size": 1000}))
try:
    training.train_model(prepared, big)
except steps.OutOfMemory as error:
    print("OOM " + str(error))
"""


def test_cpu_out_of_memory_is_one_actionable_error(prepared, shared_cache):
    done = subprocess.run(
        [sys.executable, "-c", OOM_CHILD, shared_cache, prepared],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("OOM ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    message = lines[0]
    print(f"\n{message}")
    assert "out of CPU (RAM) memory in training step 1 (micro-batch 1000 x 64 tokens" in message
    assert "lower train.batch_size (now 1000)" in message and "model.gradient_checkpointing: true" in message


def test_gpu_out_of_memory_gets_the_same_advice(prepared, shared_cache, monkeypatch):
    config = tiny(shared_cache, **{"train.max_steps": 2, "train.batch_size": 4, "train.grad_accum": 2})
    real_loader = training.load_base_model

    def load_and_fail(path, model_cfg):  # the real model, whose forward then fails the way CUDA does
        model = real_loader(path, model_cfg)
        model.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(
                torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB"
                )
            )
        )
        return model

    monkeypatch.setattr(training, "load_base_model", load_and_fail)
    with pytest.raises(steps.OutOfMemory) as error:
        training.train_model(prepared, config)
    message = str(error.value)
    print(f"\n{message}")
    assert message.startswith("out of GPU memory in training step 1 (micro-batch 4 x 64 tokens, precision fp32)")
    assert "raise train.grad_accum to keep the effective batch of 8" in message
    assert "model.gradient_checkpointing: true" in message and "model.precision: int8 or nf4" in message
    assert "CUDA out of memory" in message
