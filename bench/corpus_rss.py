"""Peak memory and speed of streaming the corpus versus pandas.read_csv of the whole file.

    python -m bench.corpus_rss [--mb 200] [--max-articles 10000] [--keep DIR]

Generates a Kaggle-format Lenta CSV of at least --mb MiB (Russian-looking text
with the real file's quirks), then reads it twice, each time in a fresh
subprocess so that neither generation nor the other reader inflates the peak:
  * stream: iter_articles + select_articles(max_articles=...)
  * pandas: pandas.read_csv(path), the whole file at once
and prints one JSON line. peak_rss_mb is ru_maxrss of the reading process;
base_rss_mb is the same just before reading (interpreter + imports), so
peak - base is what reading itself cost.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = ["", "url", "title", "text", "topic", "tags", "date"]  # pandas-style index column
TOPICS = ["Россия", "Мир", "Экономика", "Спорт", "Культура", "Наука и техника", "Интернет и СМИ", ""]
SYLLABLES = [
    "ра",
    "но",
    "ве",
    "ст",
    "ко",
    "ли",
    "пре",
    "зи",
    "дент",
    "мо",
    "сква",
    "ми",
    "нис",
    "тр",
    "го",
    "су",
    "дар",
    "ство",
    "эко",
    "но",
    "ми",
    "ка",
    "вы",
    "бо",
    "ры",
    "па",
    "ла",
    "та",
    "де",
    "пу",
    "тат",
]


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def make_sentences(rng: random.Random, count: int) -> list[str]:
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    sentences = []
    for _ in range(count):
        body = " ".join(rng.choices(words, k=rng.randint(6, 18)))
        sentences.append(body[0].upper() + body[1:] + rng.choice([".", ".", ".", "!", "?"]))
    return sentences


def make_text(rng: random.Random, sentences: list[str]) -> str:
    paragraphs = [" ".join(rng.choices(sentences, k=rng.randint(2, 6))) for _ in range(rng.randint(1, 5))]
    text = "\n".join(paragraphs)
    quirk = rng.random()
    if quirk < 0.05:
        text = text.replace(" ", "\u00a0", 3).replace(" ", "\u202f", 2)
    elif quirk < 0.08:
        text = f'  По словам источника, «это {text}»  и "цитата",  \r\n\r\n  конец.  '
    return text


def generate_csv(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Write rows until the file reaches target_bytes; return the number of rows."""
    rng = random.Random(seed)
    sentences = make_sentences(rng, 20_000)
    recent: list[str] = []
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\ufeff")
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        while handle.tell() < target_bytes:
            day = f"{rng.randint(1999, 2019)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
            quirk = rng.random()
            if quirk < 0.02 and recent:
                text = rng.choice(recent).upper() + "!"  # near-duplicate of a recent article
            elif quirk < 0.03:
                text = rng.choice(["", "nan", "  \u00a0 "])  # no usable text
            else:
                text = make_text(rng, sentences)
                recent = (recent + [text])[-100:]
            title = "" if rng.random() < 0.02 else rng.choice(sentences)[:-1]
            if rng.random() < 0.01:
                day = rng.choice(["", "2019/02/30", "вчера"])
            writer.writerow(
                [rows, f"https://lenta.ru/news/{day}/n{rows}/", title, text, rng.choice(TOPICS), "Все", day]
            )
            rows += 1
    return rows


def read_streaming(path: Path, max_articles: int) -> dict:
    from collections import Counter

    from lib.corpus import iter_articles
    from lib.splits import select_articles

    base = peak_rss_mb()
    stats: Counter = Counter()
    start = time.perf_counter()
    selected = select_articles(iter_articles(path, stats=stats), max_articles=max_articles, stats=stats)
    seconds = time.perf_counter() - start
    return {
        "rows": stats["rows"],
        "selected": len(selected),
        "duplicates": stats["duplicates"],
        "seconds": seconds,
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
    }


def read_pandas(path: Path) -> dict:
    import pandas

    base = peak_rss_mb()
    start = time.perf_counter()
    frame = pandas.read_csv(path)
    seconds = time.perf_counter() - start
    return {
        "rows": len(frame),
        "seconds": seconds,
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "pandas": pandas.__version__,
    }


def measure_in_subprocess(mode: str, path: Path, max_articles: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.corpus_rss",
        "--read",
        str(path),
        "--mode",
        mode,
        "--max-articles",
        str(max_articles),
    ]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench/corpus_rss.py: {mode} reader failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rows_per_s"] = result["rows"] / result["seconds"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="minimum size of the generated CSV in MiB")
    parser.add_argument("--max-articles", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="write the CSV into this folder and keep it")
    parser.add_argument("--read", type=Path, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--mode", choices=["stream", "pandas"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        result = read_streaming(args.read, args.max_articles) if args.mode == "stream" else read_pandas(args.read)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="corpus_rss_") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "lenta-ru-news.csv"
        start = time.perf_counter()
        rows = generate_csv(path, args.mb * 2**20)
        generated_s = time.perf_counter() - start
        stream = measure_in_subprocess("stream", path, args.max_articles)
        whole = measure_in_subprocess("pandas", path, args.max_articles)
        print(
            json.dumps(
                {
                    "file_mb": round(path.stat().st_size / 2**20, 1),
                    "rows_written": rows,
                    "generate_s": round(generated_s, 1),
                    "stream": stream,
                    "pandas_read_csv": whole,
                    "peak_rss_ratio": round(whole["peak_rss_mb"] / stream["peak_rss_mb"], 2),
                    "read_cost_ratio": round(
                        (whole["peak_rss_mb"] - whole["base_rss_mb"])
                        / max(stream["peak_rss_mb"] - stream["base_rss_mb"], 1e-9),
                        2,
                    ),
                },
                ensure_ascii=False,
            )
        )


if __name__ == "__main__":
    main()
