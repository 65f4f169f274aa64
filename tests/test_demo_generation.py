"""Generation tests that need a model which writes words: a small base pretrained on the bundled
corpus without its sport articles, and a LoRA adapter fine-tuned on sport (the demo's recipe at a
size that trains in seconds). A model that writes only commas, as the old demo's did, passes any
generation test; this one fails them when prompts, padding or seeding go wrong."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import DEFAULT_PROFILE
from lib import training
from lib.config import SAMPLE_CSV, load_config
from lib.dataset import load_prepared, prepare_dataset
from lib.generation import generate_continuations
from tests.conftest import tiny_overrides
from tests.support import warm
from tests.support.env import run_script

ROOT = Path(__file__).resolve().parent.parent
CYRILLIC_WORD = re.compile(r"\b[а-яё]{3,}\b", re.IGNORECASE)
# Small enough for ~15 s on one core, trained long enough to write Cyrillic words (measured: at 150
# steps greedy and sampled outputs were byte fragments).
TALKING = {
    "model.tiny.vocab_size": 1024,
    "model.tiny.hidden_size": 96,
    "model.tiny.num_heads": 4,
    "model.tiny.pretrain_steps": 400,
    "model.tiny.pretrain_learning_rate": 0.006,
    "model.tiny.pretrain_batch_size": 8,
    "model.tiny.pretrain_length": 64,
    "train.max_steps": 10,
    "train.learning_rate": 0.003,
}


def config_for(cache: str):
    return load_config(DEFAULT_PROFILE, tiny_overrides(cache, **TALKING))


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    torch.set_num_threads(1)
    cache = str(tmp_path_factory.mktemp("talking"))
    config = config_for(cache)
    info = prepare_dataset(SAMPLE_CSV, config.data, config.model, config.train.max_length, f"{cache}/datasets")
    model, tokenizer, _ = training.train_model(info.path, config)
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "info": info, "config": config, "cache": cache}


def titles(info, count=4) -> list[str]:
    return [f"{t}\n\n" for t in load_prepared(info.path)["test"]["title"][:count]]


def greedy(model, tokenizer, prompts, **extra):
    return generate_continuations(model, tokenizer, prompts, max_new_tokens=24, do_sample=False, batch_size=4, **extra)


def sampled(model, tokenizer, prompts):
    """The demo's evaluation settings: seeded sampling (greedy decoding of a model this small
    repeats a newline or a byte fragment)."""
    return generate_continuations(
        model, tokenizer, prompts, max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9, seed=0, batch_size=4
    )


def test_the_demo_base_never_saw_the_held_out_topic(demo_model):
    info, config = demo_model["info"], demo_model["config"]
    assert config.data.topics == ["Спорт"] and config.model.tiny.pretrain_exclude_topics == ["Спорт"]
    data = load_prepared(info.path)
    assert {t for name in ("train", "test") for t in data[name]["topic"]} == {"Спорт"}
    recipe = json.loads((Path(info.base) / "lenta_lora_recipe.json").read_text())
    assert recipe["tiny"]["pretrain_corpus"] == "corpus"


@pytest.mark.parametrize("adapter", ["base", "tuned"])
def test_samples_are_cyrillic_words_not_punctuation(demo_model, adapter):
    model, tokenizer = demo_model["model"], demo_model["tokenizer"]
    prompts = titles(demo_model["info"])
    if adapter == "base":
        with model.disable_adapter():
            outputs = sampled(model, tokenizer, prompts)
    else:
        outputs = sampled(model, tokenizer, prompts)
    words = [CYRILLIC_WORD.findall(text) for text in outputs]
    assert all(len(w) >= 2 for w in words), outputs  # every sample has Russian words
    letters = sum(ch.isalpha() for text in outputs for ch in text)
    assert letters > 0.5 * sum(len(text) for text in outputs), outputs  # mostly letters, not commas


def test_different_prompts_give_different_continuations(demo_model):
    outputs = greedy(demo_model["model"], demo_model["tokenizer"], titles(demo_model["info"]))
    assert len(set(outputs)) > 1, outputs


def test_a_broken_prompt_format_changes_the_output(demo_model):
    """The evaluation's prompt is `title + "\\n\\n"` (as in training documents). Dropping the
    separator, or feeding the title's words backwards, must change what the model writes."""
    model, tokenizer = demo_model["model"], demo_model["tokenizer"]
    good = titles(demo_model["info"])
    no_separator = [p.rstrip("\n") for p in good]
    backwards = [" ".join(reversed(p.split())) + "\n\n" for p in good]
    outputs = greedy(model, tokenizer, good)
    assert greedy(model, tokenizer, no_separator) != outputs
    assert greedy(model, tokenizer, backwards) != outputs


def test_the_adapter_changes_the_samples(demo_model):
    model, tokenizer = demo_model["model"], demo_model["tokenizer"]
    prompts = titles(demo_model["info"])
    with model.disable_adapter():
        base = sampled(model, tokenizer, prompts)
    assert sampled(model, tokenizer, prompts) != base


GREEDY_IN_A_NEW_PROCESS = """
import json, sys
import torch
torch.set_num_threads(1)
from peft import PeftModel
from lib.base_model import load_base_model, load_tokenizer
from lib.config import load_config
from lib.generation import generate_continuations
args = json.loads(sys.argv[1])
config = load_config(args["profile"], args["overrides"])
tokenizer = load_tokenizer(args["tokenizer"], config.model)
model = PeftModel.from_pretrained(load_base_model(args["base"], config.model), args["adapter"]).eval()
greedy = generate_continuations(model, tokenizer, args["prompts"], max_new_tokens=24, do_sample=False, batch_size=4)
sampled = generate_continuations(model, tokenizer, args["prompts"], max_new_tokens=24, do_sample=True,
                                 temperature=0.7, top_p=0.9, seed=0, batch_size=4)
print(json.dumps([greedy, sampled]))
"""


@pytest.mark.slow
def test_greedy_and_seeded_decoding_are_reproducible_across_processes(demo_model, tmp_path):
    model, tokenizer, info = demo_model["model"], demo_model["tokenizer"], demo_model["info"]
    adapter = training.save_adapter(model, tokenizer, tmp_path)
    args = {
        "profile": str(DEFAULT_PROFILE),
        "overrides": tiny_overrides(demo_model["cache"], **TALKING),
        "tokenizer": str(Path(info.path) / "tokenizer"),
        "base": info.base,
        "adapter": str(adapter),
        "prompts": titles(info),
    }
    runs = [
        subprocess.run(
            [sys.executable, "-c", GREEDY_IN_A_NEW_PROCESS, json.dumps(args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        for _ in range(2)
    ]
    outputs = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    here = [greedy(model, tokenizer, args["prompts"]), sampled(model, tokenizer, args["prompts"])]
    assert outputs[0] == outputs[1] == here
    assert all(CYRILLIC_WORD.search(text) for text in outputs[0][1])


def test_the_pretraining_corpus_leaves_out_the_topic_and_every_evaluation_article():
    from lib.corpus import iter_articles, join_title_and_text
    from lib.dataset import pretraining_documents
    from lib.splits import select_articles, split_articles

    config = load_config(DEFAULT_PROFILE)
    splits = split_articles(
        select_articles(iter_articles(SAMPLE_CSV), topics=config.data.topics), config.data.splits.model_dump()
    )
    docs = pretraining_documents(SAMPLE_CSV, config.data, config.model.tiny, splits, [])
    everything = {join_title_and_text(a): a.topic for a in iter_articles(SAMPLE_CSV)}
    assert docs and all(everything[d] != "Спорт" for d in docs)
    assert len(docs) == sum(topic != "Спорт" for topic in everything.values())  # all the rest: 100 articles
    held_out = {join_title_and_text(a) for name in ("validation", "test") for a in splits[name]}
    assert held_out and not held_out & set(docs)
    # With the topic allowed, the train split may be pretrained on, evaluation articles still never.
    open_tiny = config.model.tiny.model_copy(update={"pretrain_exclude_topics": []})
    docs = pretraining_documents(SAMPLE_CSV, config.data, open_tiny, splits, [])
    assert not held_out & set(docs) and {join_title_and_text(a) for a in splits["train"]} <= set(docs)


EVERY_PATH_IN_A_NEW_PROCESS = """
import json, sys
import mlflow, torch
torch.set_num_threads(1)
from lib.generation import generate_continuations
from lib.loading import load_registered
args = json.loads(sys.argv[1])
uri, name, prompts, settings = args["uri"], args["name"], args["prompts"], args["settings"]
model, tokenizer, _ = load_registered(uri, f"models:/{name}/1")
out = {"load_registered": generate_continuations(model, tokenizer, prompts, **settings)}
del model
mlflow.set_tracking_uri(uri)
pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
out["pyfunc"] = pyfunc.predict(prompts, params=settings)
out["pyfunc_defaults"] = pyfunc.predict(prompts)
out["signature"] = [str(pyfunc.metadata.signature.inputs), str(pyfunc.metadata.signature.outputs)]
print("RESULT " + json.dumps(out, ensure_ascii=False))
"""


def parse_generate_output(stdout: str, prompts: list[str]) -> list[str]:
    """`lenta-lora generate` with several prompts prints `PROMPT\nTEXT\n` for each, a blank line apart."""
    texts, rest = [], stdout
    for prompt, following in zip(prompts, [*prompts[1:], None]):
        assert rest.startswith(prompt + "\n"), (rest[:200], prompt)
        rest = rest[len(prompt) + 1 :]
        end = rest.index("\n\n" + following) if following else len(rest.rstrip("\n"))
        texts.append(rest[:end].rstrip("\n"))
        rest = rest[end + 2 :]
    return texts


@pytest.mark.slow
def test_every_path_gives_the_same_text_for_a_version(demo_model, tmp_path, new_store):
    """The evaluation's samples, `lenta-lora generate`, `load_registered` + generate_continuations
    and the registered pyfunc (with its default params and with explicit ones) run one generation
    function: the same version, prompts and seeded settings give the same text, in fresh processes.
    (The pyfunc once prepended <|endoftext|> to every prompt and answered differently.) Seeded
    sampling, not greedy: greedy decoding of a model this small writes newlines, which would hide
    a difference; the three prompts fit one batch on every path, so the RNG draws are the same."""
    from lib import registry, tracking
    from lib.base_identity import describe_base
    from lib.evaluation import generate_both

    model, tokenizer, info = demo_model["model"], demo_model["tokenizer"], demo_model["info"]
    settings = {"max_new_tokens": 24, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 0}
    config = demo_model["config"].model_copy(deep=True)
    for key, value in settings.items():
        setattr(config.eval, key, value)
    config.eval.batch_size = 8
    prompts = titles(info, 3)
    base_out, evaluated = generate_both(model, tokenizer, prompts, config.eval)  # the evaluation stage's samples
    assert all(CYRILLIC_WORD.search(text) for text in evaluated) and evaluated != base_out, evaluated

    uri, name = new_store(tmp_path / "mlflow.db"), "one-path"
    adapter = training.save_adapter(model, tokenizer, tmp_path / "trained")
    run_id = tracking.start_run(uri, "one-path", "one-path", {}, {}, "{}\n")
    registry.register_adapter(
        uri,
        run_id,
        adapter,
        describe_base(info.base, config.model),
        settings,
        name,
        {},
        {"benchmark_bits_per_byte": 3.0},
        champion_metric="benchmark_bits_per_byte",
        benchmark_fingerprint="f" * 64,
        min_improvement=0.002,
        example={"prompt": prompts[0], "output": evaluated[0]},
    )
    tracking.finish_run(uri, run_id)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""}
    paths = run_script(
        EVERY_PATH_IN_A_NEW_PROCESS,
        json.dumps({"uri": uri, "name": name, "prompts": prompts, "settings": settings}),
        cwd=tmp_path,
        env=env,
    )
    signature = paths.pop("signature")
    cli = warm.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "generate",
            "--model",
            name,
            "--version",
            "1",
            "--tracking-uri",
            uri,
            "--max-new-tokens",
            "24",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--seed",
            "0",
            *prompts,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    paths["cli"] = parse_generate_output(cli.stdout, prompts)
    print("\n", json.dumps({"evaluation": evaluated, **paths}, ensure_ascii=False, indent=1))
    for label in ("load_registered", "pyfunc", "pyfunc_defaults", "cli"):
        assert paths[label] == evaluated, label
    assert "string" in signature[0] and "string" in signature[1]  # given at registration, not inferred by predict
