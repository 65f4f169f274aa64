"""Throughput of the evaluate stage's batched code paths versus naive one-at-a-time loops.

    python -m bench.eval_throughput [--config configs/demo.yaml] [--set key=value ...] [--repeats 3] [--threads 1]

In one process, on the model and test texts the evaluate stage of `make run` uses (the demo
profile's tiny GPT-Neo wrapped in a LoRA adapter, the bundled sample's test split):
  * perplexity: `score_corpus` with `eval.batch_size` windows per forward pass (right padding)
    versus one window per forward pass (batch_size=1), same windows, same stride;
  * generation: `generate_continuations` (batched, left padding, KV cache) versus a naive greedy
    loop, one prompt at a time, re-running the whole sequence for every new token (no cache);
    and, to separate the two effects, `generate_continuations` with batch_size=1 (cache, no batch).
Each path runs once to warm up, then `--repeats` times; the median time is reported. Prints one
JSON line: texts/s and tokens/s per path, ratios, whether the outputs agree, and the load average
before and after (the machine may be shared: numbers are only comparable at similar load).

`--threads` defaults to 1: on a shared 2-core machine, torch's default of one thread per core
makes every small op wait for a busy core, and the timings then measure the other jobs, not
this code (a forward pass of the demo model took 60x longer with 2 threads than with 1 under load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def load_model_and_texts(config):
    """The evaluate stage's inputs: prepared test split, its tokenizer, the base wrapped in LoRA."""
    from lib.base_model import load_base_model, load_tokenizer
    from lib.dataset import corpus_path, load_prepared, prepare_dataset
    from lib.lora import wrap_with_lora

    info = prepare_dataset(
        corpus_path(config.data),
        config.data,
        config.model,
        config.train.max_length,
        f"{config.data.cache_dir}/datasets",
    )
    tokenizer = load_tokenizer(str(Path(info.path) / "tokenizer"), config.model)
    model = wrap_with_lora(load_base_model(info.base, config.model), config).eval()
    test = load_prepared(info.path)["test"]
    return model, tokenizer, list(test["document"]), list(test["title"])[: config.eval.num_samples]


def naive_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One prompt at a time, the full sequence re-run for each new token: no batching, no KV cache."""
    import torch

    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(tokenizer(prompt)["input_ids"]) or [tokenizer.eos_token_id]
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1]
                new.append(int(logits.argmax()))
                if new[-1] == tokenizer.eos_token_id:
                    break
            outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return outputs


def timed(fn, repeats: int):
    """(result of the last call, median seconds over `repeats` calls after one warm-up call)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)

    from lib.config import load_config
    from lib.generation import generate_continuations
    from lib.metrics import score_corpus

    config = load_config(args.config, args.set)
    model, tokenizer, texts, prompts = load_model_and_texts(config)
    load_before = os.getloadavg()
    window = {"max_length": config.train.max_length, "stride": config.eval.stride}
    batch, new_tokens = config.eval.batch_size, config.eval.max_new_tokens

    ppl_batched, t_ppl_batched = timed(
        lambda: score_corpus(model, tokenizer, texts, batch_size=batch, **window), args.repeats
    )
    ppl_single, t_ppl_single = timed(
        lambda: score_corpus(model, tokenizer, texts, batch_size=1, **window), args.repeats
    )
    gen = {"max_new_tokens": new_tokens}
    out_batched, t_gen_batched = timed(
        lambda: generate_continuations(model, tokenizer, prompts, batch_size=batch, **gen), args.repeats
    )
    out_single, t_gen_single = timed(
        lambda: generate_continuations(model, tokenizer, prompts, batch_size=1, **gen), args.repeats
    )
    out_naive, t_gen_naive = timed(lambda: naive_greedy(model, tokenizer, prompts, new_tokens), args.repeats)

    # Greedy outputs of all three paths should agree, so they share one token count.
    generated = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in out_naive)
    scored = ppl_batched["tokens"]
    report = {
        "bench": "eval_throughput",
        "config": Path(args.config).name,
        "overrides": args.set,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "texts": len(texts),
        "scored_tokens": int(scored),
        "max_length": config.train.max_length,
        "stride": config.eval.stride,
        "batch_size": batch,
        "prompts": len(prompts),
        "max_new_tokens": new_tokens,
        "generated_tokens": generated,
        "repeats": args.repeats,
        "perplexity_batched": {"texts_per_s": len(texts) / t_ppl_batched, "tokens_per_s": scored / t_ppl_batched},
        "perplexity_one_window": {"texts_per_s": len(texts) / t_ppl_single, "tokens_per_s": scored / t_ppl_single},
        "generation_batched_cache": {
            "texts_per_s": len(prompts) / t_gen_batched,
            "tokens_per_s": generated / t_gen_batched,
        },
        "generation_one_prompt_cache": {
            "texts_per_s": len(prompts) / t_gen_single,
            "tokens_per_s": generated / t_gen_single,
        },
        "generation_naive": {"texts_per_s": len(prompts) / t_gen_naive, "tokens_per_s": generated / t_gen_naive},
        "ratio_perplexity_batched_vs_one_window": t_ppl_single / t_ppl_batched,
        "ratio_generation_batched_vs_naive": t_gen_naive / t_gen_batched,
        "ratio_generation_batched_vs_one_prompt_cache": t_gen_single / t_gen_batched,
        "ratio_generation_one_prompt_cache_vs_naive": t_gen_naive / t_gen_single,
        "perplexity_equal": abs(ppl_batched["nll_sum"] - ppl_single["nll_sum"]) <= 1e-4 * ppl_single["nll_sum"],
        "generations_equal": out_batched == out_single == out_naive,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
