"""`lenta-lora export`: a registered version as files other tools load, with no MLflow or project code.

Two forms, each with a README.md saying what it is (version, run, base and its identity, precision,
LoRA settings, the metrics recorded on the version) and how to load it:
  adapter  the plain PEFT adapter folder the version holds (adapter_config.json,
           adapter_model.safetensors, tokenizer): `PeftModel.from_pretrained(base, DIR)`; the base
           is not needed to export it, only to use it
  merged   the base with the adapter merged in (`merge_and_unload`) as safetensors + tokenizer, in
           `dtype`: `AutoModelForCausalLM.from_pretrained(DIR)`, no peft needed

The merge is done in fp32 whatever the export dtype (the base is loaded in fp32, then the merged
weights are cast once), so a bf16 export is the bf16 rounding of the exact sum, not a sum of
rounded parts. It needs the base and about 4 bytes of memory per parameter (5.3 GB for 1.3B).
A version trained on an int8/nf4 base is merged into the base's original, unquantized weights: a
quantized base cannot hold the sum without rounding it away, so its default dtype is fp32.

Nothing half-written: the files go to a hidden sibling `.DIR.partial-*` renamed to DIR at the end; a
failure removes it (a SIGKILL can leave only that sibling, never a partial DIR). DIR must not exist
or be empty.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from lib import faults
from lib.checkpoint import StorageError

log = logging.getLogger("lenta_lora.export")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype -> torch dtype name
QUANTIZED = ("int8", "nf4")
# Metrics a version carries as tags (tasks/register.py KEY_METRICS and the benchmark scores).
METRIC_TAGS = ("benchmark_", "test_", "base_test_", "chrf", "rouge", "bleu")


class ExportError(ValueError):
    """An export that cannot be done as asked (occupied output folder, wrong dtype): nothing written."""


def default_dtype(precision: str) -> str:
    """The version's own precision; fp32 for a quantized (int8/nf4) or unresolved (`auto`) one."""
    return precision if precision in DTYPES else "fp32"


def export_version(
    uri: str, registered_uri: str, out: str | Path, merged: bool = False, dtype: str | None = None
) -> dict:
    """Write `registered_uri` (models:/NAME/VERSION or models:/NAME@ALIAS) to the new folder `out`.

    `dtype` (bf16/fp16/fp32, merged only; default `default_dtype` of the version's precision).
    Returns `out`, `uri` (models:/NAME/VERSION), `mode`, `dtype` (None for an adapter), `precision`
    (trained in), `files` ({relative path: bytes}) and `seconds`. Errors, each naming what to fix:
    ExportError (occupied `out`, bad dtype), LookupError (no such version), FileNotFoundError (files
    or, for a merge, the base missing), ArtifactIntegrityError (changed files), StorageError (disk).
    """
    from lib.adapter_pyfunc import quiet_loading
    from lib.loading import download_registered

    if dtype is not None and not merged:
        raise ExportError(f"--dtype {dtype}: an adapter is exported as it was saved; --dtype applies to --merged")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().absolute()
    _refuse_occupied(out)  # before any download or load: a mistyped DIR costs nothing
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lenta-lora-export-") as download, quiet_loading():
        log.info("downloading %s", registered_uri)
        version = download_registered(uri, registered_uri, download)
        artifacts = version["artifacts"]
        base = json.loads(Path(artifacts["base_model"]).read_text(encoding="utf-8"))
        precision = base.get("precision", "fp32")
        dtype = (dtype or default_dtype(precision)) if merged else None
        # Everything that can refuse (checksums, a missing base) runs before the first byte is written.
        if merged:
            model, tokenizer = _merged_model(version, dtype)
        else:
            _check_adapter(version, base)
        lora = json.loads((Path(artifacts["adapter"]) / "adapter_config.json").read_text(encoding="utf-8"))
        text = readme(version, base, lora, dtype)
        staging = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # same disk: atomic rename
            staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become DIR's: give it a plain mkdir's mode
            if merged:
                _save_merged(model, tokenizer, staging, dtype)
            else:
                _copy_adapter(artifacts["adapter"], staging)
            (staging / "README.md").write_text(text, encoding="utf-8")
            faults.reach("export.before-rename")
            _publish(staging, out)
        except BaseException as error:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            # A write that failed (disk full, permissions; safetensors reports its own I/O errors)
            if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":
                raise _storage_error(out, error) from error
            raise
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    seconds = time.monotonic() - started
    log.info(
        "exported %s to %s: %d files, %.1f MB in %.0f s",
        version["where"],
        out,
        len(files),
        sum(files.values()) / 1e6,
        seconds,
    )
    return {
        "out": str(out),
        "uri": f"models:/{version['name']}/{version['version']}",
        "mode": "merged" if merged else "adapter",
        "dtype": dtype,
        "precision": precision,
        "files": files,
        "seconds": seconds,
    }


def _umask() -> int:
    """The process umask (only readable by setting it; restored at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _refuse_occupied(out: Path) -> None:
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder is replaced by the rename
    if out.exists() or out.is_symlink():
        what = "a link" if out.is_symlink() else "a non-empty folder" if out.is_dir() else "a file"
        raise ExportError(f"--out {out} is {what}: refusing to overwrite it; name a new (or empty) folder")


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place: atomic, and refused (not merged into) if `out` was
    filled since the check."""
    try:
        os.rename(staging, out)
    except OSError:
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise ExportError(
                f"--out {out} appeared while exporting: refusing to overwrite it; name a new (or empty) folder"
            ) from None
        raise


def _storage_error(out: Path, error: BaseException) -> StorageError:
    free = f"{shutil.disk_usage(out.parent).free / 1e6:.1f} MB" if out.parent.is_dir() else "unknown"
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return StorageError(
        f"could not write the export to {out}: {reason} ({free} free there); nothing was left "
        "there: free disk space or choose another --out"
    )


def _check_adapter(version: dict, base: dict) -> None:
    """The adapter files are the registered ones (ArtifactIntegrityError otherwise). A local base that
    is gone or changed is only a warning: exporting the adapter does not need it, using it does."""
    from lib.adapter_pyfunc import ArtifactIntegrityError, verify_artifacts, verify_local_base

    verify_artifacts(version["artifacts"], base)
    if base.get("kind") == "local":
        try:
            verify_local_base(base["name"], base.get("identity") or {})
        except (FileNotFoundError, ArtifactIntegrityError) as error:
            log.warning("%s: exporting the adapter anyway (using it needs that base): %s", version["where"], error)


def _copy_adapter(adapter: str, folder: Path) -> None:
    """The adapter folder as registered, without PEFT's model-card template (our README replaces it)."""
    for source in sorted(Path(adapter).rglob("*")):
        target = folder / source.relative_to(adapter)
        if source.is_dir():
            target.mkdir(exist_ok=True)
        elif source.name != "README.md":
            shutil.copyfile(source, target)


def _merged_model(version: dict, dtype: str):
    """Base (fp32) + adapter loaded as the version loads (checksums, base identity), merged, cast to
    `dtype`: (model, tokenizer). FileNotFoundError naming the version when its base is gone."""
    import torch

    from lib.adapter_pyfunc import ArtifactIntegrityError, load_adapter_from_artifacts

    began = time.monotonic()
    log.info("loading %s: its base in fp32 and the adapter (verifying checksums)", version["where"])
    try:
        model, tokenizer, base = load_adapter_from_artifacts(version["artifacts"], precision="fp32")
    except (FileNotFoundError, ArtifactIntegrityError) as error:  # base gone or changed: name the version too
        raise type(error)(f"{version['where']}: {error}") from None
    if base.get("precision") in QUANTIZED:
        log.warning(
            "%s was trained on an %s-quantized base: merging into the base's original unquantized weights "
            "(the merged model differs from the version by the quantization error)",
            version["where"],
            base["precision"],
        )
    log.info(
        "loaded in %.0f s (%.1fM parameters); merging the LoRA weights into the base",
        time.monotonic() - began,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    _untie_adapted_head(model)
    merged = model.merge_and_unload()
    return merged.to(getattr(torch, DTYPES[dtype])), tokenizer


def _untie_adapted_head(model) -> None:
    """An adapter on an output head that shares its weight with the input embeddings (GPT-Neo ties
    them) would be merged into both: the head gets its own copy first (PEFT's advice, issue 2777),
    and the merged model is saved untied."""
    import torch

    inner = model.get_base_model()
    head, embeddings = inner.get_output_embeddings(), inner.get_input_embeddings()
    layer = getattr(head, "base_layer", None)  # a LoRA wrapper's original layer: only an adapted head has one
    if layer is not None and embeddings is not None and layer.weight is embeddings.weight:
        layer.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
        inner.config.tie_word_embeddings = False


def _save_merged(model, tokenizer, folder: Path, dtype: str) -> None:
    began, size = time.monotonic(), sum(p.numel() * p.element_size() for p in model.parameters())
    log.info("writing the merged model in %s (%.1f MB) to %s", dtype, size / 1e6, folder)
    model.save_pretrained(folder)  # safetensors (transformers 5 writes no pickles)
    tokenizer.save_pretrained(folder)
    log.info("written in %.0f s", time.monotonic() - began)


def _base_lines(base: dict) -> tuple[list[str], str, str]:
    """README lines on the base; the argument and extra keywords that load it in the snippet."""
    identity, kind = base.get("identity") or {}, base.get("kind")
    digests = [f"  - `{name}`: sha256 `{digest}`" for name, digest in sorted((identity.get("sha256") or {}).items())]
    if kind == "hub":
        commit = identity.get("commit") or base.get("revision")
        pinned = "" if identity.get("resolved") else " (not resolved at training: the revision's name)"
        lines = [
            f"- base: `{base['name']}` on the Hugging Face hub, revision `{base.get('revision')}`, "
            f"commit `{commit}`{pinned}"
        ]
        return lines, base["name"], f', revision="{commit}"'
    if kind == "tiny":
        lines = [
            f"- base: lenta-lora's offline tiny GPT-Neo, built at `{base.get('path')}`; its weights are "
            "stored with the registered version (artifacts/base_weights), or export `--merged`"
        ]
        return lines + ["- base identity (weights as recorded):", *digests], str(base.get("path")), ""
    lines = [f"- base: local folder `{base.get('name')}`", "- base identity (weights as recorded):", *digests]
    return lines, str(base.get("name")), ""


def _metric_lines(tags: dict) -> list[str]:
    shown = {k: v for k, v in sorted(tags.items()) if k.startswith(METRIC_TAGS) and k != "benchmark_fingerprint"}
    bench = tags.get("benchmark_fingerprint")
    lines = [
        f"- `{k}`: {v}" + (f" (benchmark {bench[:12]})" if bench and k.startswith("benchmark_") else "")
        for k, v in shown.items()
    ]
    return lines or ["- none recorded on this version"]


def readme(version: dict, base: dict, lora: dict, dtype: str | None) -> str:
    """README.md of an export: what it is, where it came from, how to load it, what it scored."""
    name, number, precision = version["name"], version["version"], base.get("precision", "fp32")
    base_lines, base_arg, base_kwargs = _base_lines(base)
    targets = lora.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    merged = dtype is not None
    what = (
        f"`{name}` version {number} merged into its base (`merge_and_unload`), {dtype} safetensors + tokenizer"
        if merged
        else f"The LoRA adapter of `{name}` version {number} (a PEFT adapter folder + tokenizer)"
    )
    quantized = (
        f"\nThe version was trained on an {precision}-quantized base. The merge used the base's original "
        "unquantized weights, so this model differs from the version's by that quantization error.\n"
        if merged and precision in QUANTIZED
        else ""
    )
    if merged:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("<this folder>")  # no peft needed',
            'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        ]
        note = [
            "",
            "The sum was made in fp32 and cast once to the export's dtype; in fp32 the logits equal the "
            "adapter's on its base to < 1e-4 (tests/test_export.py in lenta-lora).",
        ]
    else:
        load = [
            "import torch",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{base_arg}"{base_kwargs}, '
            f"dtype=torch.{base.get('dtype', 'float32')})",
            'model = PeftModel.from_pretrained(base, "<this folder>").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        ]
        note = (
            [
                "",
                f"Trained on an {precision} base: load it with quantization_config=BitsAndBytesConfig(...) "
                "to reproduce the version's numerics exactly.",
            ]
            if precision in QUANTIZED
            else []
        )
    exported = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"# {name} v{number}" + (f" merged ({dtype})" if merged else " LoRA adapter"),
            "",
            f"{what}, exported by `lenta-lora export` on {exported}.",
            quantized,
            f"- registered model: `models:/{name}/{number}` (MLflow run `{version['run_id']}`)",
            *base_lines,
            f"- trained in: {precision} (compute dtype {base.get('dtype', 'float32')})",
            f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, dropout={lora.get('lora_dropout')}, "
            f"targets: {targets}, bias: {lora.get('bias')}",
            "",
            "## Load it",
            "",
            "```python",
            *load,
            "```",
            *note,
            "",
            "## Metrics recorded on the version",
            "",
            *_metric_lines(version["tags"]),
            "",
        ]
    )
