"""MLflow model-from-code: a registered LoRA adapter as a pyfunc that generates text.

MLflow copies this file into every logged model and runs it at load time, so it imports nothing
from this project: a version loads in any process with torch, transformers and peft installed,
without the training code or its config. Artifacts:
  adapter      PEFT adapter folder (adapter_config.json, adapter_model.safetensors) + tokenizer
  base_model   JSON: where the base comes from (hub id + revision, local path, or tiny build),
               the precision it was trained in, and default generation settings
  base_weights (tiny base only) the base model folder, since no hub holds it
"""

from __future__ import annotations

import json

import mlflow.pyfunc
from mlflow.models import set_model


def load_adapter_from_artifacts(artifacts: dict):
    """Return (model, tokenizer, base_info) from an MLflow model's artifact paths."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(artifacts["base_model"], encoding="utf-8") as handle:
        base = json.load(handle)
    source = artifacts.get("base_weights") or base["name"]
    kwargs = {"trust_remote_code": False, "use_safetensors": True}
    if base.get("kind") == "hub":
        kwargs["revision"] = base.get("revision")
    precision = base.get("precision", "fp32")
    if precision in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if precision == "int8" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    elif precision in ("bf16", "fp16"):
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16
    elif precision == "auto" and torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model = PeftModel.from_pretrained(model, artifacts["adapter"], is_trainable=False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(artifacts["adapter"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, base


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.tokenizer, self.base = load_adapter_from_artifacts(context.artifacts)
        self.defaults = self.base.get("generation", {})

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        """model_input: a list of prompts (or a DataFrame whose first column holds them)."""
        import torch

        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        settings = {**self.defaults, **(params or {})}
        max_new = int(settings.get("max_new_tokens", 64))
        temperature = float(settings.get("temperature", 1.0))
        do_sample = bool(settings.get("do_sample", False))
        torch.manual_seed(int(settings.get("seed", 0)))
        tok = self.tokenizer
        # Batched decoding needs prompts aligned right; over-long prompts keep their end.
        sides = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"
        try:
            context_len = getattr(self.model.config, "max_position_embeddings", 2048)
            limit = max(1, context_len - max_new)
            texts = [tok.eos_token + str(p) for p in prompts]  # EOS start: empty prompts work too
            batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit,
                        add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=max_new, do_sample=do_sample,
                                          temperature=temperature if do_sample else None,
                                          pad_token_id=tok.pad_token_id)
        finally:
            tok.padding_side, tok.truncation_side = sides
        return [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


set_model(LoraAdapterModel())
