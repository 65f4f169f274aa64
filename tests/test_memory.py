"""Each stage lets go of its model before the next one loads another copy of the base.

A k-bit (nf4/int8) PEFT model sits in a reference cycle, so dropping the last name of it frees
nothing until Python's cyclic collector happens to run: the flow held two mappings of the base's
`model.safetensors` during evaluation (bench/flow_rss.py: flow peak 1.26x training's on a 205M
base). Counted here the same way, on a base file only this test maps: mapped while a stage runs,
not mapped once it has returned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.cli import DEFAULT_PROFILE
from lib import evaluation, training
from lib.config import load_config
from tests.conftest import tiny_overrides
from tests.support.training import prepare_for


def mappings(path: Path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(str(path) in line for line in maps)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_training_and_evaluation_release_the_base(tmp_path, precision):
    # As the CLI sets it: bitsandbytes logs a failed optional-kernel import with the exception as an
    # argument; a kept log record (pytest keeps them all) holds that traceback, whose frames hold
    # the model being loaded. Silenced, no record exists.
    quiet = logging.getLogger("bitsandbytes")
    level, quiet.level = quiet.level, logging.ERROR
    # The seed recipe's q/v targets: bitsandbytes 0.50's CPU nf4 kernel fails the backward pass of a
    # layer with a bias (GPT-Neo's out_proj, c_fc, c_proj): "a view of a leaf Variable ... in-place".
    config = load_config(
        DEFAULT_PROFILE,
        tiny_overrides(
            str(tmp_path / "cache"), **{"model.precision": precision, "lora.target_modules": "[q_proj,v_proj]"}
        ),
    )
    info = prepare_for(config)
    weights = Path(info.base).resolve() / "model.safetensors"
    assert mappings(weights) == 0
    during: list[int] = []
    result = training.train_adapter(
        info.path, config, tmp_path / "run", on_log=lambda step, record, progress: during.append(mappings(weights))
    )
    assert during and min(during) >= 1  # the training model maps the base file while it trains
    assert mappings(weights) == 0, "the trained model outlived the training stage"
    evaluation.evaluate_adapter(info.path, result.adapter_dir, config, tmp_path / "evaluation")
    assert mappings(weights) == 0, "the evaluated model outlived the evaluation stage"
    quiet.setLevel(level)


@pytest.mark.slow
def test_evaluating_on_an_nf4_base_releases_it(tmp_path):
    """nf4 evaluation of an adapter trained in fp32 (bitsandbytes 0.50's CPU nf4 kernel cannot train
    this tiny model, see above): the quantized model is in a reference cycle, and is gone when the
    stage returns only because the stage collects it (this failed before)."""
    quiet = logging.getLogger("bitsandbytes")
    level, quiet.level = quiet.level, logging.ERROR
    overrides = tiny_overrides(str(tmp_path / "cache"), **{"lora.target_modules": "[q_proj,v_proj]"})
    config = load_config(DEFAULT_PROFILE, overrides)
    info = prepare_for(config)
    result = training.train_adapter(info.path, config, tmp_path / "run")
    weights = Path(info.base).resolve() / "model.safetensors"
    nf4 = load_config(DEFAULT_PROFILE, [*overrides, "model.precision=nf4"])
    evaluation.evaluate_adapter(info.path, result.adapter_dir, nf4, tmp_path / "evaluation")
    assert mappings(weights) == 0, "the evaluated nf4 model outlived the evaluation stage"
    quiet.setLevel(level)
