"""LoRA training: one plain loop you can read in one sitting.

Loss convention: every optimizer step minimises the mean NLL over all *real* tokens of its
`grad_accum` micro-batches (each micro-batch's summed loss is divided by the step's total token
count), so the step's gradient does not depend on how the tokens were split into micro-batches.
Padding (attention_mask == 0) is never scored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.base_model import load_base_model, load_tokenizer
from lib.config import PipelineConfig
from lib.dataset import load_prepared

log = logging.getLogger("lenta_lora.train")

LogFn = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the adapter is not saved."""


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    tokens: int  # real (non-padding) tokens trained on
    seconds: float
    final_loss: float
    validation_loss: float | None
    history: list[dict] = field(default_factory=list)


def wrap_with_lora(model, config: PipelineConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.model.precision in ("int8", "nf4"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.model.gradient_checkpointing)
    elif config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, lora)


def batch_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL (nats) over real tokens, and how many tokens were scored."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    scored = attention_mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (nll * scored.reshape(-1)).sum(), int(scored.sum())


@torch.no_grad()
def validation_loss(model, blocks, batch_size: int) -> float | None:
    if not len(blocks):
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        rows = blocks[start : start + batch_size]
        device = model.device
        nll, n = batch_nll(model, torch.tensor(rows["input_ids"], device=device), torch.tensor(rows["attention_mask"], device=device))
        total, count = total + float(nll), count + n
    model.train()
    return total / max(count, 1)


def count_steps(num_blocks: int, config: PipelineConfig) -> int:
    """Optimizer steps: `train.max_steps` if set, else epochs over the micro-batches."""
    if config.train.max_steps:
        return config.train.max_steps
    micro_batches = math.ceil(num_blocks / config.train.batch_size)
    return max(1, math.ceil(config.train.epochs * micro_batches / config.train.grad_accum))


def micro_batch_order(num_blocks: int, batch_size: int, seed: int, needed: int) -> list[list[int]]:
    """Block indices of each micro-batch, reshuffled every epoch from a seeded generator."""
    order: list[list[int]] = []
    generator = torch.Generator().manual_seed(seed)
    while len(order) < needed:
        perm = torch.randperm(num_blocks, generator=generator).tolist()
        order += [perm[i : i + batch_size] for i in range(0, num_blocks, batch_size)]
    return order[:needed]


def save_adapter(model, tokenizer, output_dir: Path) -> Path:
    """Write PEFT's own format (adapter_config.json + adapter_model.safetensors) atomically."""
    final = output_dir / "adapter"
    tmp = output_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def train_adapter(dataset_path: str, config: PipelineConfig, output_dir: str | Path, on_log: LogFn | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on the prepared dataset; save it under `output_dir/adapter`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, result = train_model(dataset_path, config, on_log)
    result.adapter_dir = str(save_adapter(model, tokenizer, output_dir))
    return result


def train_model(dataset_path: str, config: PipelineConfig, on_log: LogFn | None = None):
    """The training loop; returns (peft model, tokenizer, TrainResult without adapter_dir)."""
    from tqdm.auto import tqdm

    info = json.loads((Path(dataset_path) / "lenta_lora_dataset.json").read_text())
    data = load_prepared(dataset_path)
    blocks, val_blocks = data["train_blocks"], data["validation_blocks"]
    tokenizer = load_tokenizer(str(Path(dataset_path) / "tokenizer"), config.model)

    torch.manual_seed(config.train.seed)
    model = wrap_with_lora(load_base_model(info["base"], config.model), config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info("trainable parameters: %d of %d", sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    steps = count_steps(len(blocks), config)
    # Linear warmup then linear decay to zero: the usual schedule for short LoRA runs.
    warmup = config.train.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    order = micro_batch_order(len(blocks), config.train.batch_size, config.train.seed, steps * config.train.grad_accum)

    # Whole training set as two tensors: indexing a `datasets` table per step costs more than a tiny model's step.
    all_ids, all_masks = torch.tensor(blocks["input_ids"]), torch.tensor(blocks["attention_mask"])
    history: list[dict] = []
    tokens_seen, started, loss_value = 0, time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc="train", unit="step", disable=None)
    for step in bar:
        chunk = order[step * config.train.grad_accum : (step + 1) * config.train.grad_accum]
        step_tokens = sum(int(all_masks[idx, 1:].sum()) for idx in chunk)  # targets scored this step
        step_nll = 0.0
        for idx in chunk:
            nll, _ = batch_nll(model, all_ids[idx].to(model.device), all_masks[idx].to(model.device))
            (nll / step_tokens).backward()
            step_nll += float(nll.detach())
        loss_value = step_nll / step_tokens
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"training loss is {loss_value} at step {step + 1}: lower train.learning_rate "
                f"(now {config.train.learning_rate}) or check the data; nothing was saved"
            )
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += sum(int(all_masks[idx].sum()) for idx in chunk)
        elapsed = time.perf_counter() - started
        record = {"train_loss": loss_value, "learning_rate": schedule.get_last_lr()[0],
                  "tokens_per_second": tokens_seen / elapsed, "epoch": (step + 1) * config.train.grad_accum * config.train.batch_size / len(blocks)}
        if config.train.eval_every and (step + 1) % config.train.eval_every == 0 and step + 1 < steps:
            record["validation_loss"] = validation_loss(model, val_blocks, config.eval.batch_size)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
        history.append({"step": step + 1, **record})
        if on_log and ((step + 1) % config.train.log_every == 0 or step + 1 == steps):
            on_log(step + 1, record)
    bar.close()

    val = validation_loss(model, val_blocks, config.eval.batch_size)
    if on_log and val is not None:
        on_log(steps, {"validation_loss": val})
    model.eval()
    return model, tokenizer, TrainResult("", steps, tokens_seen, time.perf_counter() - started, loss_value, val, history)
