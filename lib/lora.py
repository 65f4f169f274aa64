"""The LoRA side of training: which layers get an adapter, PEFT's config, the optimizer, saving.

Target modules: `lora.target_modules: auto` takes PEFT's default for the base's architecture (its
config.json `model_type`: gpt_neo and llama -> q_proj, v_proj; gpt2 -> c_attn), and every linear
layer but the output head ("all-linear") where PEFT has no default. The list is resolved from the
config alone (a weightless skeleton on the meta device for "all-linear"), so the registration step
can record exactly what training targeted without loading a model.

Variants (`lora.*`): DoRA, rsLoRA, PEFT's init schemes and LoRA+ (B matrices learn `plus_lr_ratio`
times faster). PiSSA and OLoRA move the principal part of each targeted base weight into the
adapter at init, so the trained adapter only reproduces the model on that *modified* base. Saving
converts it (PEFT's `path_initial_model_for_weight_conversion`) into a plain LoRA of rank 2r,
[A | A0] x [B | -B0], which applies to the untouched base: evaluation, registration and loading
never see the residual base. Checkpoints keep the unconverted adapter: a resumed run redoes the
(deterministic) init on the same base and loads the trained A and B on top.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lib.checkpoint import ADAPTER_SAVE_OPTIONS, storage_error
from lib.config import BASE_MUTATING_INITS, ConfigError, LoraConfig, ModelConfig, PipelineConfig

log = logging.getLogger("lenta_lora.lora")

INITIAL_ADAPTER = "lenta_lora_initial_adapter"  # PeftModel attribute: the adapter state right after a PiSSA/OLoRA init


def _linear_layer_names(model) -> list[str]:
    """Last name component of every linear / Conv1D layer but the output head (PEFT's own "all-linear" rule)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    found = _maybe_include_all_linear_layers(PeftLoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"), model)
    return sorted({name.rsplit(".", 1)[-1] for name in found.target_modules})


def resolve_target_modules(lora: LoraConfig, hf_config, model=None) -> list[str]:
    """The module names PEFT is given, sorted; `hf_config` is the base's transformers config.

    `model` (the loaded base) saves building a meta-device skeleton for "all-linear".
    """
    if isinstance(lora.target_modules, list):
        return sorted(set(lora.target_modules))
    if lora.target_modules == "auto":
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        default = DEFAULTS.get(hf_config.model_type)
        if isinstance(default, list):  # a few multimodal entries are regexes: those fall back to all-linear
            return sorted(default)
        log.info("PEFT has no default LoRA targets for model_type %r: using every linear layer", hf_config.model_type)
    if model is None:  # layer names only: the meta device allocates no weights
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    return _linear_layer_names(model)


def targets_for_base(lora: LoraConfig, base: str, model_cfg: ModelConfig) -> list[str]:
    """`resolve_target_modules` for a base given by name or folder (reads its config.json, no weights)."""
    if isinstance(lora.target_modules, list):
        return sorted(set(lora.target_modules))
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(
        base, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    return resolve_target_modules(lora, hf_config)


def describe(lora: LoraConfig, targets: list[str]) -> str:
    """One line for a version's `lora` tag: every setting that changes what an adapter is."""
    init = "true" if lora.init_weights is True else lora.init_weights
    saved = f" (saved as plain LoRA r={2 * lora.r})" if lora.init_weights in BASE_MUTATING_INITS else ""
    return (
        f"r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} targets={','.join(targets)} "
        f"dora={str(lora.use_dora).lower()} rslora={str(lora.use_rslora).lower()} init={init}{saved} "
        f"plus_lr_ratio={'none' if lora.plus_lr_ratio is None else f'{lora.plus_lr_ratio:g}'}"
    )


def peft_config(lora: LoraConfig, targets: list[str]):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        bias="none",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=lora.init_weights,
    )


def wrap_with_lora(model, config: PipelineConfig):
    """The base wrapped in a PEFT LoRA model as `config.lora` says (kbit / gradient-checkpointing prep first)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from peft.utils import get_peft_model_state_dict

    if config.model.precision in ("int8", "nf4"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.model.gradient_checkpointing)
        keep_4bit_weights_trainable(model)
    elif config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets = resolve_target_modules(config.lora, model.config, model)
    log.info(
        "LoRA targets (lora.target_modules=%s, model_type %s): %s",
        config.lora.target_modules,
        model.config.model_type,
        ",".join(targets),
    )
    if config.lora.init_weights in BASE_MUTATING_INITS:
        refuse_tied_targets(model, targets, config.lora.init_weights)
    wrapped = get_peft_model(model, peft_config(config.lora, targets))
    if config.lora.init_weights in BASE_MUTATING_INITS:
        # A0, B0 as initialised: `save_pretrained` subtracts them to get an adapter for the untouched base.
        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(wrapped).items()}
        setattr(wrapped, INITIAL_ADAPTER, initial)
    return wrapped


def keep_4bit_weights_trainable(model) -> None:
    """bitsandbytes 0.50 repacks an nf4 layer's weights for fast CPU inference the first time it runs in eval
    mode without gradients (on CPUs with AVX512-BF16), and never unpacks them for training: after the first
    validation pass, every training step through such a layer took the inference path and failed ("a view
    of a leaf Variable that requires grad is being used in an in-place operation"; any target below the
    head, measured). The model being trained keeps the trainable layout; evaluation loads its own copy."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False


def refuse_tied_targets(model, targets: list[str], init: str) -> None:
    """PiSSA/OLoRA move part of each targeted weight into the adapter at init. A target that shares its
    weight with the input embeddings (GPT-Neo's lm_head) would move the embeddings too, which no adapter
    carries: the version would not reload to the trained model (measured on the demo: logits off by 0.03,
    against exactly 0 for other targets). Raised before any training step."""
    embeddings = model.get_input_embeddings().weight
    tied = sorted(
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and getattr(module, "weight", None) is embeddings
    )
    if tied:
        raise ConfigError(
            f"lora.init_weights={init} rewrites the weights it targets, and {', '.join(tied)} shares its weights "
            "with the input embeddings (tie_word_embeddings), so the saved adapter could not reproduce the trained "
            "model: target other modules (lora.target_modules: [q_proj, v_proj], say) or use lora.init_weights: true"
        )


def make_optimizer(model, config: PipelineConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with `lora.plus_lr_ratio`, PEFT's LoRA+ parameter groups
    (A at train.learning_rate, B and DoRA magnitudes at that x ratio)."""
    train = config.train
    if config.lora.plus_lr_ratio is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=train.learning_rate,
        loraplus_lr_ratio=config.lora.plus_lr_ratio,
        loraplus_weight_decay=train.weight_decay,
    )


def save_pretrained(model, folder: Path) -> None:
    """PEFT's safetensors save of the adapter's own weights; a PiSSA/OLoRA adapter is saved converted for
    the untouched base (module doc)."""
    initial = getattr(model, INITIAL_ADAPTER, None)
    if initial is None:
        model.save_pretrained(folder, **ADAPTER_SAVE_OPTIONS)
        return
    from safetensors.torch import save_file

    # PEFT reads the initial adapter from a folder (it writes the config there itself); a sibling of
    # `folder`, so nothing of it ends up in the saved adapter.
    scratch = Path(tempfile.mkdtemp(dir=Path(folder).parent, prefix=".initial-adapter-"))
    try:
        (scratch / "initial").mkdir()
        save_file(
            {k: v.contiguous() for k, v in initial.items()}, str(scratch / "initial" / "adapter_model.safetensors")
        )
        model.save_pretrained(
            folder, **ADAPTER_SAVE_OPTIONS, path_initial_model_for_weight_conversion=str(scratch / "initial")
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_adapter(model, tokenizer, output_dir: Path) -> Path:
    """Write PEFT's own format (adapter_config.json + adapter_model.safetensors) atomically."""
    final = output_dir / "adapter"
    tmp = output_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp)  # PiSSA/OLoRA: converted to a plain LoRA on the untouched base
        tokenizer.save_pretrained(tmp)
    except Exception as error:  # disk full: OSError, or safetensors' own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error("the trained adapter", output_dir, error) from error
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
