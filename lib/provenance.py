"""What a trained adapter was made from, as one key: a run whose key a registered version already
holds would train the same thing again, so the scheduled flow skips it ("up to date").

    training_key = sha256 of
        dataset fingerprint (which articles, split how: lib/splits.py) and the prepared folder's name
            (base, block length, packing),
        the resolved `model`, `lora` and `train` config sections, less bookkeeping keys that
            change what is logged, not what is learned (lib/checkpoint.BOOKKEEPING),
        the code version: sha256 of the lib modules that decide the trained weights,
        the base's identity: sha256 of its weights files (a local folder or the tiny build) or the
            hub commit its revision resolved to,
        the Kaggle dataset version when the corpus came from Kaggle.

Tracking, registry and evaluation settings are not in it: re-scoring or renaming changes no weight.

Also `requirements`: the packages, at the versions that trained it, that a registered version needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from lib.base_identity import base_identity
from lib.checkpoint import checkpoint_key
from lib.config import PipelineConfig

log = logging.getLogger("lenta_lora.provenance")

# The modules whose code decides the trained weights: an edit to any of them trains again.
TRAINING_MODULES = (
    "training.py",
    "steps.py",
    "lora.py",
    "base_model.py",
    "dataset.py",
    "corpus.py",
    "splits.py",
    "distributed.py",
    "checkpoint.py",
)


def code_version() -> str:
    """sha256 over the source of TRAINING_MODULES (not the git commit: a dirty tree counts too)."""
    digest = hashlib.sha256()
    for name in TRAINING_MODULES:
        digest.update(name.encode() + b"\x00" + (Path(__file__).with_name(name)).read_bytes())
    return digest.hexdigest()


def training_key(
    config: PipelineConfig, dataset_fingerprint: str, dataset_path: str, base: str, kaggle_version: int | None
) -> tuple[str, dict]:
    """The key (64 hex digits) and what it hashes (logged as the run's `training_key.json`)."""
    _, payload = checkpoint_key(config, dataset_fingerprint, dataset_path)
    payload = {
        **payload,
        "code": code_version(),
        "base": base_identity(base, config.model.revision),
        "kaggle_version": kaggle_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest(), payload


def requirements(precision: str) -> list[str]:
    """The version's pip requirements: what loading it needs, at the versions that trained it.

    A local build tag is dropped (`torch==2.13.0+cpu` is no version PyPI serves; `torch==2.13.0` is
    the same code for any platform's wheel), and bitsandbytes is added for an int8/nf4 base."""
    from importlib.metadata import version

    packages = ["mlflow", "torch", "transformers", "peft", "safetensors"]
    if precision in ("int8", "nf4"):
        packages.append("bitsandbytes")
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in packages]
