"""The training loop on the tiny GPT-Neo: it learns, grad accumulation does not change the update,
a checkpointed run resumes bit-identically, and a diverging run stops without saving an adapter."""

from __future__ import annotations

import shutil

import pytest
import torch

from lib import checkpoint, dataset, steps, training
from tests.support.training import tiny  # and the `prepared` fixture (tests/conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_loss_decreases_on_the_tiny_model(prepared, shared_cache):
    config = tiny(shared_cache, **{"train.max_steps": 40, "train.learning_rate": 0.01})
    model, _, result = training.train_model(prepared, config)
    assert [h["step"] for h in result.history] == list(range(1, 41))
    blocks = dataset.load_prepared(prepared)["validation_blocks"]
    with model.disable_adapter():  # the same model without its adapter is the base
        base = steps.validation_loss(model, blocks, 8)
    # Held-out loss, same blocks both sides, so the gap is not batch-to-batch noise. LoRA moves this
    # barely pre-trained tiny base little: 5.690 -> 5.680 nats measured.
    assert result.validation_loss < base - 0.004, (base, result.validation_loss)


def test_grad_accumulation_does_not_change_the_update(prepared, shared_cache):
    """4 sequences in one micro-batch vs 4 micro-batches of 1: same step loss, same updated weights."""
    runs = {}
    for batch, accum in ((4, 1), (1, 4)):
        config = tiny(shared_cache, **{"train.max_steps": 2, "train.batch_size": batch, "train.grad_accum": accum})
        model, _, result = training.train_model(prepared, config)
        runs[batch] = (result.history, lora_weights(model))
    (history4, weights4), (history1, weights1) = runs[4], runs[1]
    assert history4[0]["train_loss"] == pytest.approx(history1[0]["train_loss"], abs=1e-5)
    assert history4[1]["train_loss"] == pytest.approx(history1[1]["train_loss"], abs=1e-5)
    assert max_difference(weights4, weights1) < 1e-5


def test_learning_rate_warms_up_from_zero_then_decays_linearly_to_zero(prepared, shared_cache):
    """transformers' get_linear_schedule_with_warmup: step s (0-based) updates at lr x s / warmup during
    the warm-up, then at lr x (steps - s) / (steps - warmup)."""
    config = tiny(shared_cache, **{"train.max_steps": 5, "train.warmup_steps": 2, "train.learning_rate": 0.01})
    _, _, result = training.train_model(prepared, config)
    assert [h["learning_rate"] for h in result.history] == pytest.approx([0.0, 0.005, 0.01, 0.01 * 2 / 3, 0.01 / 3])


class Crash(Exception):
    """Stands in for the process dying between two checkpoints."""


def crash_at(step_to_crash: int):
    def on_log(step, record, progress):
        if step == step_to_crash:
            raise Crash(step)

    return on_log


@pytest.mark.parametrize(
    "dropout, variant",
    [
        (0.0, {}),
        (0.1, {}),
        # PiSSA rewrites the base at init (a resumed run redoes it) and LoRA+ has two learning rates in its optimizer
        # state; warm-up to step 8 puts the resume (after step 7) inside the warm-up.
        (
            0.0,
            {
                "lora.init_weights": "pissa",
                "lora.target_modules": "[q_proj, v_proj]",  # not the demo's lm_head: tied, refused for PiSSA
                "lora.plus_lr_ratio": 4,
                "lora.use_rslora": True,
                "train.warmup_steps": 8,
            },
        ),
        (0.0, {"lora.use_dora": True}),  # a trained magnitude vector per layer
    ],
    ids=["plain", "dropout", "pissa-loraplus-rslora", "dora"],
)
def test_resume_from_checkpoint_is_bit_identical(prepared, shared_cache, tmp_path, dropout, variant):
    """10 steps straight vs 7 steps (checkpoints at 2, 4, 6), a crash while logging step 7 (which
    saves step 7 first: logging failed, training did not), resume from 7 to 10. With dropout the
    RNG states in the checkpoint must put the same masks on steps 8-10."""
    config = tiny(
        shared_cache, **{"train.max_steps": 10, "train.checkpoint_every": 2, "lora.dropout": dropout, **variant}
    )
    straight, _, expected = training.train_model(prepared, config)  # no checkpoint_dir: no checkpoints

    folder = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        training.train_model(prepared, config, on_log=crash_at(7), checkpoint_dir=folder, run_id="run-a")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) == ["step-00000006", "step-00000007"]
    assert not list(folder.glob(".tmp-*"))
    # What a kill in the middle of writing checkpoint 8 leaves: a temp folder, never a step-* folder.
    (folder / ".tmp-killed" / "adapter").mkdir(parents=True)
    (folder / ".tmp-killed" / "state.json").write_text('{"step": 8, "tot')

    resumed_from, logged = [], []
    resumed, _, result = training.train_model(
        prepared,
        config,
        checkpoint_dir=folder,
        run_id="run-b",
        on_log=lambda step, record, progress: logged.append((step, progress and progress.total)),
        on_resume=resumed_from.append,
    )
    assert [(c.step, c.run_id) for c in resumed_from] == [(7, "run-a")]
    assert not (folder / ".tmp-killed").exists()  # cleared under the lock
    assert result.resumed_from_step == 7 and result.steps == 10
    assert [s for s, total in logged if total] == [8, 9, 10] and {t for _, t in logged if t} == {10}
    assert [h["step"] for h in result.history] == list(range(1, 11))  # earlier steps come from the checkpoint
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in expected.history]
    assert result.tokens == expected.tokens
    difference = max_difference(lora_weights(straight), lora_weights(resumed))
    assert difference <= 1e-6, difference
    # The last checkpoint is the finished run's: a re-run (say after evaluation failed) trains nothing.
    assert (checkpoint.latest(folder).step, checkpoint.latest(folder).run_id) == (10, "run-b")
    logged.clear()
    again, _, rerun = training.train_model(
        prepared,
        config,
        checkpoint_dir=folder,
        run_id="run-c",
        on_log=lambda step, record, progress: logged.append(step),
    )
    assert rerun.resumed_from_step == 10 and logged == [10]  # only the final validation loss
    assert rerun.history == result.history and max_difference(lora_weights(again), lora_weights(resumed)) == 0


def test_checkpoint_folder_is_keyed_by_what_determines_the_weights(tmp_path):
    config = tiny(str(tmp_path), **{"train.checkpoint_every": 5})
    where = checkpoint.checkpoint_dir(config, "f" * 64, "/data/abc-L64-packed")
    assert where.startswith(f"{tmp_path}/checkpoints/") and not (tmp_path / "checkpoints").exists()
    again = tiny(str(tmp_path), **{"train.checkpoint_every": 50, "train.log_every": 3})
    assert checkpoint.checkpoint_dir(again, "f" * 64, "/data/abc-L64-packed") == where
    for change in ({"lora.r": 4}, {"train.max_steps": 5}, {"model.tiny.seed": 1}):
        assert (
            checkpoint.checkpoint_dir(
                tiny(str(tmp_path), **{"train.checkpoint_every": 5, **change}), "f" * 64, "/data/abc-L64-packed"
            )
            != where
        ), change
    assert checkpoint.checkpoint_dir(config, "e" * 64, "/data/abc-L64-packed") != where
    assert checkpoint.checkpoint_dir(tiny(str(tmp_path)), "f" * 64, "/data/abc-L64-packed") is None


def test_second_trainer_on_the_same_checkpoints_fails_fast(tmp_path):
    with checkpoint.exclusive(tmp_path / "ck"):
        with pytest.raises(checkpoint.CheckpointError, match="another process is training"):
            with checkpoint.exclusive(tmp_path / "ck"):
                pass
        assert not checkpoint.discard(tmp_path / "ck")  # busy: kept
    assert checkpoint.discard(tmp_path / "ck") and not (tmp_path / "ck").exists()


def test_a_twin_trainer_goes_on_without_checkpoints(prepared, shared_cache, tmp_path, caplog):
    """Same dataset and config while another process trains with these checkpoints (its lock held
    here): train, but neither resume from nor write into the other's folder."""
    config = tiny(shared_cache, **{"train.max_steps": 4, "train.checkpoint_every": 2})
    folder = tmp_path / "ck"
    with checkpoint.exclusive(folder):
        _, _, result = training.train_model(prepared, config, checkpoint_dir=folder, run_id="twin")
    assert result.steps == 4 and result.resumed_from_step is None
    assert checkpoint.latest(folder) is None
    assert "trains without checkpoints" in caplog.text


def test_diverging_loss_stops_early_and_saves_no_adapter(prepared, shared_cache, tmp_path):
    # lr 1e6 on every linear layer: finite loss on steps 1-2, NaN on step 3 (measured; the demo's
    # head-only adapter does not diverge within 20 steps).
    config = tiny(
        shared_cache,
        **{
            "train.max_steps": 20,
            "train.learning_rate": 1e6,
            "train.checkpoint_every": 1,
            "lora.target_modules": "all-linear",
        },
    )
    logged = []
    with pytest.raises(steps.TrainingDiverged) as error:
        training.train_adapter(
            prepared,
            config,
            tmp_path / "out",
            checkpoint_dir=tmp_path / "ck",
            on_log=lambda step, record, progress: logged.append(step),
        )
    message = str(error.value)
    assert "at optimizer step 3 of 20" in message and "train.learning_rate=1e+06" in message
    assert "lower train.learning_rate" in message and "no adapter was saved" in message and "\n" not in message
    assert logged == [1, 2]  # stopped at once: step 3 was neither taken nor logged
    assert not (tmp_path / "out").exists()  # no adapter, not even an output folder
    assert checkpoint.latest(tmp_path / "ck").step == 2  # nothing written from the diverged step


def test_an_empty_validation_split_trains_without_validation_loss(shared_cache, tmp_path):
    """`data.splits.validation: 0`: datasets cannot save a split without rows; it loads back empty."""
    config = tiny(
        shared_cache,
        **{
            "data.splits.train": 0.95,
            "data.splits.validation": 0.0,
            "data.splits.test": 0.05,
            "train.max_steps": 2,
            "train.eval_every": 1,
        },
    )
    info = dataset.prepare_dataset(
        dataset.SAMPLE_CSV, config.data, config.model, config.train.max_length, tmp_path / "datasets"
    )
    data = dataset.load_prepared(info.path)
    assert len(data["validation"]) == len(data["validation_blocks"]) == 0 and len(data["test"]) > 0
    result = training.train_adapter(info.path, config, tmp_path / "out")
    assert result.steps == 2 and result.validation_loss is None
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_head_only_adapter_holds_its_lora_weights_alone_and_reloads_to_the_same_logits(
    prepared, shared_cache, tmp_path
):
    """The demo's LoRA is on lm_head, which GPT-Neo ties to the input embeddings. PEFT would save that
    frozen matrix beside the adapter (3.1 of the demo's 3.3 MB; 412 MB at 1.3B): the adapter and the
    checkpoints hold the LoRA weights alone, and the adapter on the base gives the trained logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from lib.base_model import load_base_model
    from lib.lora import save_adapter

    config = tiny(shared_cache, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    assert config.lora.target_modules == ["lm_head"]
    model, tokenizer, _ = training.train_model(prepared, config, checkpoint_dir=tmp_path / "checkpoints")
    adapter = save_adapter(model, tokenizer, tmp_path)
    last = checkpoint.latest(tmp_path / "checkpoints").path / checkpoint.ADAPTER
    for folder in (adapter, last):
        keys = sorted(load_file(folder / "adapter_model.safetensors"))
        assert keys == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"], keys
    base = load_base_model(dataset.read_prepared(prepared).base, config.model)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    ids = tokenizer("Учёные нашли новый вид бабочек", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_or_olora_on_the_tied_head_is_refused_before_training(prepared, shared_cache, tmp_path, init):
    """The demo's lm_head shares its weight with the input embeddings: PiSSA/OLoRA would rewrite both."""
    from lib.config import ConfigError

    config = tiny(shared_cache, **{"lora.init_weights": init})
    assert config.lora.target_modules == ["lm_head"]
    logged = []
    with pytest.raises(ConfigError, match=rf"init_weights={init} rewrites .* lm_head shares its weights"):
        training.train_model(prepared, config, on_log=lambda *a: logged.append(a), checkpoint_dir=tmp_path / "ck")
    assert logged == [] and not list((tmp_path / "ck").glob("step-*"))


def test_a_grad_scaler_changes_no_update_and_resumes_exactly(prepared, shared_cache, tmp_path, monkeypatch):
    """fp16's loss scaling (a GPU's path, lib/steps.mixed_precision) run with a CPU GradScaler: a power-of-two
    scale is exact in fp32, so the weights equal an unscaled run's; checkpoints carry the scale, so a run
    resumed from step 2 ends with the uninterrupted run's scaler state and weights."""
    config = tiny(shared_cache, **{"train.max_steps": 3, "train.checkpoint_every": 1})
    plain, _, _ = training.train_model(prepared, config)
    scalers: list = []

    def cpu_scaler(precision, device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2))
        return None, scalers[-1]

    monkeypatch.setattr(training, "mixed_precision", cpu_scaler)
    scaled, _, _ = training.train_model(prepared, config, checkpoint_dir=tmp_path / "a")
    assert max_difference(lora_weights(plain), lora_weights(scaled)) == 0
    assert scalers[0].get_scale() == 2.0**11  # grew once, after 2 steps without an overflow
    step3 = checkpoint.latest(tmp_path / "a").path
    assert torch.load(step3 / "trainer.pt", weights_only=True)["scaler"] == scalers[0].state_dict()

    shutil.rmtree(step3)  # back to step 2's checkpoint
    resumed, _, result = training.train_model(prepared, config, checkpoint_dir=tmp_path / "a")
    assert result.resumed_from_step == 2
    assert scalers[1].state_dict() == scalers[0].state_dict()
    assert max_difference(lora_weights(plain), lora_weights(resumed)) == 0
