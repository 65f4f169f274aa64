"""What a base is, for the record: its identity (the weights a version was trained on) and the
description a registered version keeps of it.

A local folder (the tiny build included) is identified by the sha256 of its weights files; a hub id
by the commit its revision resolves to. `pin_revision` fixes that commit once per run, so every
stage loads the same weights even if the branch moves meanwhile.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from lib.base_model import resolve_dtype
from lib.config import TINY_MODEL, ModelConfig

log = logging.getLogger("lenta_lora.model")

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the files that identify a base's weights


@functools.lru_cache(maxsize=64)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime too: one flow hashes a 5.3 GB base once (training key, then registration)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_weights(folder: str | Path) -> dict[str, str]:
    """sha256 of each weights file (*.safetensors, *.bin) directly in `folder`, by file name."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {p.name: _sha256_file(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def base_identity(base: str, revision: str | None) -> dict:
    """`{"kind": "files", "sha256": {file: digest}}` for a local folder (the tiny build included),
    `{"kind": "hub", "commit": ...}` for a hub id (the commit `revision` resolves to, asked of the
    hub, else read from the local hub cache; `resolved: false` when neither knows)."""
    if Path(base).is_dir():
        return {"kind": "files", "sha256": sha256_weights(base)}
    wanted = revision or "main"
    try:
        from huggingface_hub import hf_hub_download

        # Every base has a config.json. Fetching it by `wanted` resolves a branch to its commit (asked of the
        # hub; offline, read from the cache's record of the branch) and keeps that record for an offline run.
        found = Path(hf_hub_download(base, "config.json", revision=wanted, etag_timeout=10))
        return {"kind": "hub", "name": base, "commit": found.parent.name, "resolved": True}  # snapshots/<commit>/
    except Exception as error:  # noqa: BLE001 - offline and not cached, or an unknown id
        log.info("%s@%s resolves nowhere (%s): recorded unresolved", base, wanted, type(error).__name__)
        return {"kind": "hub", "name": base, "commit": wanted, "resolved": False}


def pin_revision(model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with a hub base's `revision` (a branch such as `main`) replaced by the commit it
    names now. Every stage of a run then loads the same weights (the tokenizer, training, evaluation,
    the identity the version records) even if the branch moves during a run of hours, and a checkpoint
    resumes only onto the commit it was trained on. Unchanged for a local folder, the tiny build, or a
    revision that resolves nowhere (offline with no cached copy: loading fails later, saying so)."""
    if model_cfg.name == TINY_MODEL or Path(model_cfg.name).is_dir():
        return model_cfg
    identity = base_identity(model_cfg.name, model_cfg.revision)
    if not identity["resolved"] or identity["commit"] == model_cfg.revision:
        return model_cfg
    log.info(
        "base %s: revision %s is commit %s for this run",
        model_cfg.name,
        model_cfg.revision or "main",
        identity["commit"],
    )
    return model_cfg.model_copy(update={"revision": identity["commit"]})


def identity_label(identity: dict) -> str:
    """One string for a version tag: the hub commit, or sha256 over a folder's `file:digest` lines."""
    if identity.get("kind") == "hub":
        return str(identity["commit"]) + ("" if identity.get("resolved") else " (unresolved)")
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(identity["sha256"].items()))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def describe_base(base: str, model_cfg: ModelConfig) -> dict:
    """What a registered adapter records about its base: enough to load it again without our config.

    `identity` pins the weights (sha256 of a local folder's files, or the hub commit the revision
    resolved to); loading checks it. `precision` is the resolved one (`auto` becomes what this
    machine trained in, so a GPU does not load a CPU-trained version in bf16), `dtype` its compute
    dtype, `precision_requested` the configured value.
    """
    precision = model_cfg.precision
    resolved = (
        precision
        if precision != "auto"
        else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype("auto")]
    )
    facts = {
        "precision": resolved,
        "precision_requested": precision,
        "dtype": str(resolve_dtype("auto" if precision in ("int8", "nf4") else resolved)).removeprefix("torch."),
        "identity": base_identity(base, model_cfg.revision),
    }
    recipe = Path(base) / "lenta_lora_recipe.json"
    if recipe.is_file():
        return {
            **json.loads(recipe.read_text()),
            "kind": "tiny",
            "name": TINY_MODEL,
            "path": str(Path(base).resolve()),
            **facts,
        }
    if Path(base).is_dir():
        return {"kind": "local", "name": str(Path(base).resolve()), **facts}
    return {"kind": "hub", "name": base, "revision": model_cfg.revision or "main", **facts}
