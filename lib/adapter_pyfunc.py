"""MLflow model-from-code: a registered LoRA adapter as a pyfunc that generates text.

MLflow copies this file into every logged model and runs it at load time, so it imports nothing
from this project: a version loads in any process with torch, transformers and peft installed,
without the training code or its config. Artifacts:
  adapter      PEFT adapter folder (adapter_config.json, adapter_model.safetensors) + tokenizer
  base_model   JSON: where the base comes from (hub id + revision, local path, or tiny build) and
               its `identity` (the hub commit resolved at training, or sha256 of a local folder's
               weights: checked before loading), the precision it was trained in (resolved, never
               `auto`) with its compute `dtype`, default generation settings, and `sha256`: the
               checksum of every file of the `adapter` and `base_weights` folders at registration
  base_weights (tiny base only) the base model folder, since no hub holds it

Loading refuses a folder whose files differ from those checksums (changed, missing or extra
files): weights are only read from safetensors, never from pickles, and no remote code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

log = logging.getLogger("lenta_lora.adapter")

CHECKED_ARTIFACTS = ("adapter", "base_weights")  # folders whose every file is checksummed
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The `params` predict() takes, with the values used when neither the call nor the profile sets them.
GENERATION_DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": 0}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # loading these can run code


class ArtifactIntegrityError(ValueError):
    """A registered model's files differ from the checksums recorded when it was registered."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its POSIX path relative to it."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def checksum_manifest(artifacts: dict[str, str]) -> dict[str, dict[str, str]]:
    """{artifact name: {relative file: sha256}} for the weight-carrying folders; refuses pickles.

    Called at registration, so a model that could only load through pickle never gets a version.
    """
    manifest = {}
    for name in CHECKED_ARTIFACTS:
        if name not in artifacts:
            continue
        manifest[name] = folder_checksums(artifacts[name])
        pickles = [f for f in manifest[name] if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ArtifactIntegrityError(
                f"{artifacts[name]}: pickle weight files {pickles} would be registered; "
                "save with safe_serialization=True (safetensors) and remove them"
            )
    if ADAPTER_WEIGHTS not in manifest.get("adapter", {}):
        raise FileNotFoundError(
            f"{artifacts.get('adapter')}: no {ADAPTER_WEIGHTS}; save the adapter with "
            "PeftModel.save_pretrained(..., safe_serialization=True)"
        )
    return manifest


def verify_artifacts(artifacts: dict, base: dict) -> None:
    """Compare the downloaded folders with the checksums recorded at registration.

    Every difference is an error, not a warning: a changed file could hold other weights, a
    missing one would make transformers fall back to something else, and an extra one (say an
    `adapter_model.bin` pickle) is a file nothing we registered asked to load.
    """
    recorded = base.get("sha256")
    if recorded is None:
        log.warning(
            "%s has no recorded checksums (registered before checksums were kept); files not verified",
            artifacts.get("base_model"),
        )
        return
    for name in CHECKED_ARTIFACTS:
        if name in artifacts and name not in recorded:
            raise ArtifactIntegrityError(
                f"artifact {name!r} at {artifacts[name]} has no recorded checksums; "
                "the model was modified after registration: register it again"
            )
    for name, expected in recorded.items():
        if name not in artifacts:
            raise FileNotFoundError(
                f"artifact {name!r} recorded at registration is missing from the model; "
                "its files were deleted from the artifact store: register the adapter again"
            )
        actual_files = {
            p.relative_to(artifacts[name]).as_posix() for p in Path(artifacts[name]).rglob("*") if p.is_file()
        }
        missing = sorted(set(expected) - actual_files)
        if missing:
            raise FileNotFoundError(
                f"{artifacts[name]}: files {missing} recorded at registration are missing; "
                "the artifact store lost them: register the adapter again"
            )
        extra = sorted(actual_files - set(expected))
        if extra:
            raise ArtifactIntegrityError(
                f"{artifacts[name]}: unexpected files {extra} that were not there at "
                "registration; refusing to load (remove them or register again)"
            )
        for rel, digest in expected.items():
            actual = sha256_file(Path(artifacts[name]) / rel)
            if actual != digest:
                raise ArtifactIntegrityError(
                    f"{Path(artifacts[name]) / rel}: sha256 {actual[:16]}... differs from "
                    f"{digest[:16]}... recorded at registration; the file was modified or "
                    "corrupted: refusing to load (restore it or register again)"
                )


def verify_local_base(folder: str, identity: dict) -> None:
    """The local base folder a version was trained on is still there and holds the same weights.

    A moved folder would otherwise end in transformers' "Repo id must be in the form..." (it takes
    a missing path for a hub id); different weights in the same folder would load silently."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"base model folder {folder} (recorded by this version) is missing: put the base "
            "back there, or register the adapter again on a base that exists"
        )
    recorded = identity.get("sha256")
    if recorded is None:
        log.warning(
            "base model folder %s: this version records no weights checksum (registered before they "
            "were kept); not verified",
            folder,
        )
        return
    for name, digest in recorded.items():
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"base model folder {folder}: {name}, which this version was trained on, is "
                "missing: restore it, or register the adapter again"
            )
        if sha256_file(path) != digest:
            raise ArtifactIntegrityError(
                f"base model folder {folder}: {name} differs from the weights this version "
                f"was trained on (sha256 {digest[:16]}...): refusing to load; restore "
                "that base, or register an adapter trained on this one"
            )


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars or third-party notices while a version loads (a `generate` prints its answer,
    not 19 "Downloading artifacts" bars). A logger level or variable the user set is left alone;
    `LENTA_LORA_VERBOSE=1` shows everything."""
    if os.environ.get("LENTA_LORA_VERBOSE") == "1":
        yield
        return
    from transformers.utils import logging as hf_logging

    saved = {name: os.environ.get(name) for name in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",)}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    notices = logging.getLogger("bitsandbytes")  # an optional-kernel notice on CPU, once per process
    level = notices.level
    if level == logging.NOTSET:
        notices.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            # An adapter on GPT-Neo's output head, which is tied to the input embeddings (the demo):
            # loading never merges into the shared weight (`lenta-lora export --merged` unties first).
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning)
            yield
    finally:
        notices.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def load_adapter_from_artifacts(artifacts: dict, precision: str | None = None):
    """Return (model, tokenizer, base_info) from an MLflow model's artifact paths (verified first).

    `precision` (bf16/fp16/fp32) loads the base in that instead of the precision it was trained in:
    an export merges into the base's full-precision weights (lib/export.py)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(artifacts["base_model"], encoding="utf-8") as handle:
        base = json.load(handle)
    verify_artifacts(artifacts, base)
    if not (Path(artifacts["adapter"]) / ADAPTER_WEIGHTS).is_file():  # PEFT would fall back to a pickle
        raise FileNotFoundError(f"{artifacts['adapter']}: no {ADAPTER_WEIGHTS}; only safetensors adapters load")
    source = artifacts.get("base_weights") or base["name"]
    kwargs = {"trust_remote_code": False, "use_safetensors": True}
    identity = base.get("identity") or {}
    if base.get("kind") == "local":
        verify_local_base(base["name"], identity)
    if base.get("kind") == "hub":  # the commit the revision resolved to at training, where it was known
        kwargs["revision"] = identity["commit"] if identity.get("resolved") else base.get("revision")
    precision = precision or base.get("precision", "fp32")
    if precision in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, base.get("dtype", "float32"))  # what training computed in
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if precision == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        )
    elif precision in ("bf16", "fp16"):
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16
    elif precision == "auto" and torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:  # transformers' 40-line "Repo id must be in the form..." and kin
        if base.get("kind") != "hub":
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:240]
        raise FileNotFoundError(
            f"base model {source} at revision {kwargs['revision']} (recorded by this version) "
            f"cannot be loaded: {first}. Make that revision reachable (network, or the "
            "Hugging Face cache) or register the adapter again on a base you have"
        ) from None
    model = PeftModel.from_pretrained(model, artifacts["adapter"], is_trainable=False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(artifacts["adapter"], trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, base


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with quiet_loading():
            self.model, self.tokenizer, self.base = load_adapter_from_artifacts(context.artifacts)
        self.defaults = self.base.get("generation", {})

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """model_input: a list of prompts (or a DataFrame whose first column holds them); params:
        max_new_tokens, do_sample, temperature, top_p, seed (defaults: the training profile's `eval`).

        Generation is the project's own `lib/generation.py`, stored with the version in the package
        `lenta_lora_runtime` (MLflow code_paths): `lenta-lora generate`, `load_registered` callers
        and the evaluation samples run the same function, so one prompt gives one text everywhere.
        The hint is DataFrame (what MLflow passes for the string-column signature), a type MLflow
        infers no schema from: a list[str] hint would make MLflow load the model and run predict at
        registration to check it, and no hint at all prints a warning wherever this file runs."""
        from lenta_lora_runtime.generation import generate_continuations

        prompts = [str(p) for p in (model_input.iloc[:, 0] if hasattr(model_input, "iloc") else model_input)]
        settings = {**GENERATION_DEFAULTS, **self.defaults, **(params or {})}
        return generate_continuations(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=int(settings["max_new_tokens"]),
            do_sample=bool(settings["do_sample"]),
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
            seed=int(settings["seed"]),
        )


set_model(LoraAdapterModel())
