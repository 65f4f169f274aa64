"""A trained adapter as an MLflow pyfunc model folder: the files a registered version holds.

Built without loading any model. Given only an input example, MLflow loads the model and runs
`predict` on it to infer the output schema: at 1.3B that loaded the base a second time during
registration (5-16 s in fp32, 40 s int8, 85 s nf4, plus another copy in memory) for 8 tokens. The
signature is given instead: prompts in, texts out, the generation params with the profile's
defaults; the example output is the tuned model's own continuation of the evaluation's first prompt
(measured in the evaluation stage with the same generation function and settings).

The folder holds (see lib/adapter_pyfunc.py, which MLflow runs at load time):
  artifacts/adapter       the PEFT adapter + tokenizer
  artifacts/base_weights  the tiny base's weights (no hub holds them); hub and local bases by reference
  artifacts/base_model    base_model.json: where the base comes from, its identity (weights sha256 or hub
                          commit), the precision it was trained in, generation defaults, file checksums
  code/lenta_lora_runtime/  lib/generation.py and lib/progress.py: the one generation function, stored
                            with the version (imported there as lenta_lora_runtime.generation)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from lib import provenance

PYFUNC_CODE = Path(__file__).with_name("adapter_pyfunc.py")
# The modules a version runs, copied into the package RUNTIME_PACKAGE (MLflow code_paths puts it on
# sys.path at load time). They import nothing of the project but each other, relatively.
RUNTIME_MODULES = ("generation.py", "progress.py")
RUNTIME_PACKAGE = "lenta_lora_runtime"
DEFAULT_PROMPT = "Учёные обнаружили новый вид бабочек\n\n"  # the example when the evaluation made no sample


def generation_params(generation: dict) -> dict:
    """Every param `predict` takes, with the profile's value (or the pyfunc default) as its type and default."""
    from lib.adapter_pyfunc import GENERATION_DEFAULTS

    return {key: type(default)(generation.get(key, default)) for key, default in GENERATION_DEFAULTS.items()}


def package_adapter(
    folder: str | Path, adapter_dir: str | Path, base: dict, generation: dict, example: dict | None = None
) -> dict:
    """Write the MLflow model for `adapter_dir` under `folder`; nothing is loaded or run.

    `example`: {"prompt", "output"} from the evaluation (None: a fixed prompt with an empty output,
    which still types the signature). Returns `model_dir`, `base_model_json` and `manifest` (the
    checksums of the weight folders; pickles are refused there).
    """
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from lib.adapter_pyfunc import checksum_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = {"adapter": str(adapter_dir)}
    if base.get("kind") == "tiny":
        artifacts["base_weights"] = base["path"]
    manifest = checksum_manifest(artifacts)  # refuses pickles and a missing adapter_model.safetensors
    meta = folder / "base_model.json"
    meta.write_text(json.dumps({**base, "generation": generation, "sha256": manifest}, indent=2, ensure_ascii=False))
    runtime = folder / "code" / RUNTIME_PACKAGE
    runtime.mkdir(parents=True, exist_ok=True)
    (runtime / "__init__.py").write_text('"""lenta-lora modules a registered version runs (copied from lib/)."""\n')
    for name in RUNTIME_MODULES:
        shutil.copyfile(Path(__file__).with_name(name), runtime / name)

    params = generation_params(generation)
    prompt = example["prompt"] if example else DEFAULT_PROMPT
    # (prompts, outputs, params): the params schema lets `predict(..., params=...)` through (MLflow
    # drops undeclared params); a signature given up front is what keeps MLflow from running predict.
    signature = infer_signature([prompt], [example["output"] if example else ""], params)
    model_dir = folder / "model"
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(PYFUNC_CODE),
        artifacts={**artifacts, "base_model": str(meta)},
        code_paths=[str(runtime)],
        signature=signature,
        input_example=([prompt], params),
        pip_requirements=provenance.requirements(base.get("precision", "fp32")),
    )
    return {"model_dir": model_dir, "base_model_json": meta, "manifest": manifest}


def describe_version(base: dict, tags: dict, metrics: dict, champion_metric: str, run_id: str) -> str:
    """The version's description: what it is and where it came from, readable in the MLflow UI."""
    origin = base.get("name") + (f"@{base['revision']}" if base.get("revision") else "")
    shown = [m for m in (champion_metric, "test_perplexity", "chrf") if _finite(metrics.get(m))]
    facts = [
        f"{label} {tags[key]}"
        for key, label in (
            ("dataset_fingerprint", "dataset"),
            ("git_commit", "git commit"),
            ("prefect.flow_run_id", "Prefect flow run"),
        )
        if tags.get(key)
    ]
    return "\n".join(
        [
            f"LoRA adapter on {origin} ({base.get('precision', '?')}), MLflow run {run_id}.",
            "Metrics: " + (", ".join(f"{m} {metrics[m]:.4g}" for m in shown) or "none") + ".",
            "; ".join(facts) + "." if facts else "",
        ]
    ).strip()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
