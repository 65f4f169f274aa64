"""`lenta-lora export` (lib/export.py): a registered version as a plain PEFT adapter folder or merged
into its base, loadable without this project; occupied output folders, a missing base and failed
writes leave nothing behind.

Tests marked slow use the shared tiny adapter (tests/support/adapter_fixtures.py: trained once per session).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib import registry, tracking
from lib.adapter_pyfunc import sha256_file
from lib.export import ExportError, export_version
from tests.support.adapter_fixtures import CHAMPION_POLICY, NAME
from tests.support.env import run_script
from tests.support.toy_lm import tiny_gpt_neo

ROOT = Path(__file__).resolve().parent.parent
FP32_TOLERANCE = 1e-4  # max |logit difference|, merged fp32 vs the adapter on its base
BF16_TOLERANCE = 0.02  # measured 0.0067 on the tiny model: bf16 keeps 8 bits of mantissa

# A fresh interpreter where peft and this project cannot be imported: plain transformers only.
PLAIN_LOAD = r"""
import json, sys
sys.modules["peft"] = None  # `import peft` raises; transformers sees peft as not installed
sys.modules["lib"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ref = load_file(sys.argv[1])
report = {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    report[folder] = {"dtype": str(next(model.parameters()).dtype), "class": type(model).__name__,
                      "max_abs_diff": float((logits.float() - ref["logits"]).abs().max())}
print("RESULT " + json.dumps(report))
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "export", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit 2 and one error line, last, after the progress lines (INFO, as `run` logs) and no traceback."""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("lenta-lora: error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr[-3000:]
    for text in expected:
        assert text in errors[0], (text, errors[0])


def register(uri: str, name: str, adapter: Path, base: dict) -> None:
    run_id = tracking.start_run(uri, name, name, {}, {}, "{}\n")
    registry.register_adapter(
        uri, run_id, adapter, base, {"max_new_tokens": 4}, name, {}, {"benchmark_bits_per_byte": 3.0}, **CHAMPION_POLICY
    )
    tracking.finish_run(uri, run_id)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def python_block(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


@pytest.mark.slow
def test_adapter_export_is_the_registered_peft_folder_with_a_readme_that_loads_it(trained, registered, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "exports" / "adapter"
    done = cli("--model", NAME, "--alias", "champion", "--out", str(out), "--tracking-uri", registered["tracking_uri"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"exported models:/{NAME}/1 (LoRA adapter) to {out}" in done.stdout, done.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no partial sibling left

    stored = registered["model_dir"] / "artifacts" / "adapter"
    expected = {k: v for k, v in snapshot(stored).items() if k != "README.md"}  # PEFT's template card
    got = snapshot(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(got)
    assert {k: v for k, v in got.items() if k != "README.md"} == expected
    assert sha256_file(out / "adapter_model.safetensors") == registered["sha256"]["adapter_sha256"]

    readme = (out / "README.md").read_text()
    base, lora = registered["base"], trained["config"].lora
    for fact in (
        NAME,
        f"models:/{NAME}/1",
        registered["run_id"],
        base["path"],
        base["identity"]["sha256"]["model.safetensors"],
        "trained in: fp32",
        f"r={lora.r}",
        "PeftModel.from_pretrained",
        "`benchmark_bits_per_byte`: 3.25 (benchmark ffffffffffff)",
    ):
        assert fact in readme, (fact, readme)
    # The README's own snippet loads it and gives the trained model's logits.
    code = python_block(readme)
    assert len(code.strip().splitlines()) <= 6, code
    namespace: dict = {}
    exec(code.replace("<this folder>", str(out)), namespace)  # noqa: S102 - our README's snippet
    ref = load_file(str(trained["reference"]))
    with torch.no_grad():
        logits = namespace["model"](input_ids=ref["input_ids"]).logits
    assert float((logits - ref["logits"]).abs().max()) < FP32_TOLERANCE


@pytest.mark.slow
def test_merged_export_loads_with_plain_transformers_and_matches_the_adapter(trained, registered, tmp_path):
    uri = registered["tracking_uri"]
    fp32, bf16 = tmp_path / "merged-fp32", tmp_path / "merged-bf16"
    fp32.mkdir()  # an empty folder is fine: replaced
    done = {
        "fp32": export_version(uri, f"models:/{NAME}/1", fp32, merged=True),
        "bf16": export_version(uri, f"models:/{NAME}@champion", bf16, merged=True, dtype="bf16"),
    }
    assert done["fp32"]["dtype"] == "fp32" and done["fp32"]["precision"] == "fp32"  # default: the version's
    assert done["bf16"]["dtype"] == "bf16"
    for label, folder in (("fp32", fp32), ("bf16", bf16)):
        names = set(done[label]["files"])
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names, names
        # adapter_config.json would make transformers load it as an adapter (and need peft)
        assert not [n for n in names if n.startswith("adapter_") or n.endswith((".bin", ".pt", ".pth"))], names
        readme = (folder / "README.md").read_text()
        for fact in (f"merged ({label})", registered["run_id"], "no peft needed", "benchmark_bits_per_byte"):
            assert fact in readme, (fact, readme)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    report = run_script(
        PLAIN_LOAD, str(trained["reference"]), str(fp32), str(bf16), cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"}
    )
    print("\nmerged vs adapter, max |logit difference|:", {Path(k).name: v["max_abs_diff"] for k, v in report.items()})
    assert report[str(fp32)]["dtype"] == "torch.float32" and report[str(bf16)]["dtype"] == "torch.bfloat16", report
    assert report[str(fp32)]["class"] == "GPTNeoForCausalLM", report
    assert report[str(fp32)]["max_abs_diff"] < FP32_TOLERANCE, report
    assert report[str(bf16)]["max_abs_diff"] < BF16_TOLERANCE, report


@pytest.mark.slow
def test_a_quantized_version_merges_into_the_unquantized_base_in_fp32(trained, registered, tmp_path, new_store):
    """A version trained on an nf4 base (labelled so here; the adapter itself was trained in fp32):
    the merge uses the base's original weights in fp32, so it reproduces the fp32 logits, which an
    nf4-loaded base would not, and the README says so."""
    uri, name = new_store(tmp_path / "mlflow.db"), "nf4-version"
    register(uri, name, trained["adapter"], {**registered["base"], "precision": "nf4", "precision_requested": "nf4"})
    out = tmp_path / "merged"
    done = export_version(uri, f"models:/{name}/1", out, merged=True)
    assert done["precision"] == "nf4" and done["dtype"] == "fp32", done
    assert "trained on an nf4-quantized base" in (out / "README.md").read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    report = run_script(
        PLAIN_LOAD, str(trained["reference"]), str(out), cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}
    )[str(out)]
    assert report["dtype"] == "torch.float32" and report["max_abs_diff"] < FP32_TOLERANCE, report


def test_an_occupied_out_folder_is_refused_and_left_as_it_was(tmp_path):
    """Checked before the store is even opened: the store here does not exist."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "sub" / "model.safetensors").write_bytes(b"\0" * 16)
    before, listing = snapshot(out), sorted(p.name for p in tmp_path.iterdir())
    uri = f"sqlite:///{tmp_path / 'no-store.db'}"
    for extra in ((), ("--merged", "--dtype", "bf16")):
        done = cli("--model", NAME, "--version", "1", "--out", str(out), "--tracking-uri", uri, *extra)
        assert_one_line_error(done, f"--out {out} is a non-empty folder", "refusing to overwrite")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_version(uri, f"models:/{NAME}/1", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_a_bad_dtype_is_refused_before_anything_is_written(tmp_path):
    uri = f"sqlite:///{tmp_path / 'no-store.db'}"
    with pytest.raises(ExportError, match="use one of bf16, fp16, fp32"):
        export_version(uri, f"models:/{NAME}/1", tmp_path / "out", merged=True, dtype="int4")
    with pytest.raises(ExportError, match="applies to --merged"):
        export_version(uri, f"models:/{NAME}/1", tmp_path / "out", dtype="bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    done = cli("--model", NAME, "--version", "1", "--out", str(tmp_path / "out"), "--merged", "--dtype", "int8")
    assert done.returncode == 2 and "invalid choice: 'int8'" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_missing_local_base_is_one_line_for_a_merge_and_a_warning_for_an_adapter(
    trained, tmp_path, new_store, caplog
):
    from lib.base_identity import describe_base

    base = tmp_path / "my-base"
    shutil.copytree(trained["info"].base, base, ignore=shutil.ignore_patterns("lenta_lora_recipe.json"))
    uri, name = new_store(tmp_path / "mlflow.db"), "local-base"
    register(uri, name, trained["adapter"], describe_base(str(base), trained["config"].model))
    base.rename(tmp_path / "moved-away")
    exports = tmp_path / "exports"
    exports.mkdir()
    done = cli("--model", name, "--version", "1", "--out", str(exports / "merged"), "--merged", "--tracking-uri", uri)
    assert_one_line_error(done, f"models:/{name}/1", str(base), "is missing")
    assert sorted(exports.iterdir()) == []  # neither DIR nor a partial sibling

    # The adapter does not need its base to be exported (only to be used): it is, with a warning.
    with caplog.at_level(logging.WARNING, logger="lenta_lora.export"):
        export_version(uri, f"models:/{name}/1", exports / "adapter")
    assert "exporting the adapter anyway" in caplog.text and str(base) in caplog.text
    assert (exports / "adapter" / "adapter_model.safetensors").is_file()
    readme = (exports / "adapter" / "README.md").read_text()
    assert f"local folder `{base}`" in readme and sha256_file(tmp_path / "moved-away" / "model.safetensors") in readme


@pytest.mark.slow
def test_a_failed_write_leaves_no_out_folder_and_no_partial_one(registered, tmp_path, monkeypatch):
    import errno

    from lib import export, faults
    from lib.checkpoint import StorageError

    uri, exports = registered["tracking_uri"], tmp_path / "exports"
    exports.mkdir()
    monkeypatch.setenv(faults.VARIABLE, "export.before-rename:raise")  # everything written, not yet renamed
    with pytest.raises(faults.InjectedFault):
        export_version(uri, f"models:/{NAME}/1", exports / "adapter")
    assert sorted(exports.iterdir()) == []
    monkeypatch.delenv(faults.VARIABLE)

    def disk_full(adapter, folder):  # one file half-written, then the disk is full
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "adapter_model.safetensors"))

    monkeypatch.setattr(export, "_copy_adapter", disk_full)
    with pytest.raises(StorageError, match=f"could not write the export to {exports / 'adapter'}: .*No space left"):
        export_version(uri, f"models:/{NAME}/1", exports / "adapter")
    assert sorted(exports.iterdir()) == []


def test_readme_of_a_hub_version_pins_the_commit_and_its_snippet_is_python():
    import ast

    from lib.export import readme

    commit = "a" * 40
    base = {
        "kind": "hub",
        "name": "EleutherAI/gpt-neo-1.3B",
        "revision": "main",
        "precision": "nf4",
        "dtype": "bfloat16",
        "identity": {"kind": "hub", "commit": commit, "resolved": True},
    }
    version = {
        "name": "lenta",
        "version": 7,
        "run_id": "r" * 32,
        "tags": {"test_perplexity": "41.2", "benchmark_fingerprint": "b" * 64, "git_commit": "c" * 40},
    }
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["v_proj", "q_proj"], "bias": "none"}
    text = readme(version, base, lora, None)
    code = python_block(text)
    ast.parse(code)
    assert f'from_pretrained("EleutherAI/gpt-neo-1.3B", revision="{commit}", dtype=torch.bfloat16)' in code, code
    for fact in (
        f"commit `{commit}`",
        "trained in: nf4",
        "targets: q_proj, v_proj",
        "BitsAndBytesConfig",
        "`test_perplexity`: 41.2",
    ):
        assert fact in text, (fact, text)
    assert "git_commit" not in text and "benchmark_fingerprint" not in text  # tags that are not metrics
    merged = readme(version, base, lora, "fp32")
    ast.parse(python_block(merged))
    assert "an nf4-quantized base" in merged and "peft" not in python_block(merged).replace("no peft needed", "")


def test_an_adapted_tied_output_head_is_merged_into_an_untied_copy(tmp_path):
    """GPT-Neo ties lm_head to the input embeddings (the demo adapts lm_head): merging into the shared
    weight would change the embeddings too (measured: max |logit difference| ~30). The merged model
    reproduces the adapter's logits, also after a save and a plain transformers load."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lib.export import _untie_adapted_head

    base = tiny_gpt_neo(vocab_size=100, max_position_embeddings=64, window_size=16, bos_token_id=0, eos_token_id=0)
    model = get_peft_model(
        base,
        LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights="gaussian"),
    )
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)  # B = 0 at init would make the adapter a no-op
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        _untie_adapted_head(model)
        merged = model.merge_and_unload()
        assert float((merged(input_ids=ids).logits - adapted).abs().max()) < FP32_TOLERANCE
        merged.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert float((reloaded(input_ids=ids).logits - adapted).abs().max()) < FP32_TOLERANCE
