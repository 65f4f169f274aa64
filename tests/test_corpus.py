"""Tests for lib/corpus.py (reading, cleaning) and lib/splits.py (selection, splits, fingerprints)."""

from __future__ import annotations

import csv
import random
from collections import Counter
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from lib.corpus import Article, CorpusError, article_key, iter_articles, join_title_and_text, text_digest
from lib.splits import (
    assign_split,
    describe_splits,
    fingerprint_articles,
    sample_priority,
    select_articles,
    split_articles,
)

HEADER = ["url", "title", "text", "topic", "tags", "date"]
RATIOS = {"train": 0.9, "validation": 0.05, "test": 0.05}


def write_csv(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = False, line_end: str = "\n") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if bom:
            handle.write("\ufeff")
        writer = csv.writer(handle, lineterminator=line_end)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# Every quirk the real Kaggle file has, one per row, behind a pandas-style index column.
QUIRKY_ROWS = [
    [
        "https://lenta.ru/news/2018/12/14/a/",
        "Обычный  заголовок",
        "Обычный текст новости.",
        "Россия",
        "Общество",
        "2018/12/14",
    ],
    [
        "https://lenta.ru/news/2018/12/15/b/",
        "Заголовок\nв две строки",
        'Он сказал: "Да".\r\n\r\n\r\nВторой абзац.',
        "Мир",
        "Политика",
        "2018-12-15",
    ],
    ["https://lenta.ru/news/2018/12/16/c/", "", "Текст без заголовка.", "Спорт", "", "2018/12/16"],
    ["https://lenta.ru/news/2018/12/17/d/", "Пустой текст", "   \u00a0  ", "Россия", "", "2018/12/17"],
    ["https://lenta.ru/news/2018/12/18/e/", "NaN-текст", "nan", "Россия", "", "2018/12/18"],
    [
        "https://lenta.ru/news/2018/12/19/f/",
        "nan",
        "Пробелы\u00a0\u00a0и\u202fузкие\t\tпробелы  тут ",
        " Экономика ",
        "Рынки",
        "2018/13/40",
    ],
    ["https://lenta.ru/news/2018/12/20/g/", "Плохая дата", "Текст с плохой датой.", "Россия", "", "вчера"],
    ["", "Без адреса", "Текст без адреса.", "Культура", "Кино", ""],
    ["https://lenta.ru/news/2018/12/21/h/", "Дубль", "Обычный текст новости.", "Россия", "Общество", "2018/12/21"],
    ["https://lenta.ru/news/2018/12/22/i/", "Почти дубль", "обычный   ТЕКСТ новости!!", "Россия", "", "2018/12/22"],
]


@pytest.fixture
def quirky_csv(tmp_path: Path) -> Path:
    rows = [[str(i), *row] for i, row in enumerate(QUIRKY_ROWS)]
    return write_csv(tmp_path / "lenta-ru-news.csv", ["", *HEADER], rows, bom=True, line_end="\r\n")


def test_reader_cleans_every_quirk(quirky_csv: Path):
    stats = Counter()
    articles = list(iter_articles(quirky_csv, stats=stats))
    by_url = {a.url: a for a in articles}
    assert len(articles) == 8  # two rows with empty / "nan" text dropped
    assert stats["rows"] == 10 and stats["empty_text"] == 2 and stats["bad_date"] == 2
    first = by_url["https://lenta.ru/news/2018/12/14/a/"]
    assert first == Article(
        "https://lenta.ru/news/2018/12/14/a/",
        "Обычный заголовок",
        "Обычный текст новости.",
        "Россия",
        "Общество",
        "2018-12-14",
    )
    quoted = by_url["https://lenta.ru/news/2018/12/15/b/"]
    assert quoted.title == "Заголовок в две строки"
    assert quoted.text == 'Он сказал: "Да".\nВторой абзац.'
    assert quoted.date == "2018-12-15"
    assert join_title_and_text(quoted) == 'Заголовок в две строки\n\nОн сказал: "Да".\nВторой абзац.'
    untitled = by_url["https://lenta.ru/news/2018/12/16/c/"]
    assert untitled.title == "" and join_title_and_text(untitled) == "Текст без заголовка."
    spaces = by_url["https://lenta.ru/news/2018/12/19/f/"]
    assert spaces.title == "" and spaces.text == "Пробелы и узкие пробелы тут"
    assert spaces.topic == "Экономика" and spaces.date == ""
    assert by_url["https://lenta.ru/news/2018/12/20/g/"].date == ""
    assert by_url[""].title == "Без адреса" and by_url[""].date == ""


def test_reader_accepts_unnamed_index_header_and_r_style_index(tmp_path: Path):
    rows = [["0", *QUIRKY_ROWS[0]], ["1", *QUIRKY_ROWS[1]]]
    named = write_csv(tmp_path / "named.csv", ["Unnamed: 0", *HEADER], rows)
    headless = write_csv(tmp_path / "r_style.csv", HEADER, rows)  # header one cell short
    assert list(iter_articles(named)) == list(iter_articles(headless))
    assert [a.title for a in iter_articles(named)] == ["Обычный заголовок", "Заголовок в две строки"]


def test_reader_matches_pandas_written_file(tmp_path: Path):
    frame = pd.DataFrame(QUIRKY_ROWS, columns=HEADER)
    frame.loc[2, "title"] = None  # a real NaN, as pandas writes it
    path = tmp_path / "pandas.csv"
    frame.to_csv(path, encoding="utf-8-sig")
    articles = list(iter_articles(path))
    assert len(articles) == 8
    assert articles[1].text == 'Он сказал: "Да".\nВторой абзац.'
    assert articles[2].title == ""


def test_selection_dedupes_near_duplicates_and_filters(quirky_csv: Path):
    stats = Counter()
    selected = select_articles(iter_articles(quirky_csv), stats=stats)
    texts = [a.text for a in selected]
    assert sum(t.lower().startswith("обычный") for t in texts) == 1  # exact + near duplicate collapsed
    assert stats["duplicates"] == 2 and stats["selected"] == 6
    assert [article_key(a) for a in selected] == sorted(article_key(a) for a in selected)
    russia = select_articles(iter_articles(quirky_csv), topics=["россия"])
    assert {a.topic for a in russia} == {"Россия"}
    dated = select_articles(iter_articles(quirky_csv), date_from=date(2018, 12, 15), date_to="2018-12-16")
    assert sorted(a.date for a in dated) == ["2018-12-15", "2018-12-16"]
    long_only = select_articles(iter_articles(quirky_csv), min_text_chars=25)
    assert all(len(a.text) >= 25 for a in long_only)


# ---------------------------------------------------------------- bad input


def assert_error(call, path: Path | str, *fragments: str) -> None:
    with pytest.raises(CorpusError) as info:
        result = call()
        if not isinstance(result, list):
            list(result)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_path_and_directory(tmp_path: Path):
    missing = tmp_path / "nope.csv"
    assert_error(lambda: iter_articles(missing), missing, "does not exist")  # raised at call time
    assert_error(lambda: iter_articles(tmp_path), tmp_path, "is a directory")


def test_empty_and_header_only(tmp_path: Path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert_error(lambda: iter_articles(empty), empty, "empty (0 bytes)")
    header_only = write_csv(tmp_path / "header.csv", HEADER, [])
    assert_error(lambda: iter_articles(header_only), header_only, "header but no data rows")
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    assert_error(lambda: iter_articles(blank), blank, "no header")


def test_compressed_file_is_named(tmp_path: Path):
    import gzip

    path = tmp_path / "lenta-ru-news.csv.gz"
    path.write_bytes(gzip.compress(b"url,title,text,topic,tags,date\n"))
    assert_error(lambda: iter_articles(path), path, "gzip archive", "extract")


def test_missing_columns_are_named(tmp_path: Path):
    path = write_csv(tmp_path / "cols.csv", ["url", "title", "body", "topic"], [["u", "t", "b", "x"]])
    assert_error(lambda: iter_articles(path), path, "text, tags, date", "found 'url', 'title', 'body', 'topic'")


def test_not_utf8_reports_offset_and_line(tmp_path: Path):
    path = tmp_path / "cp1251.csv"
    good = ",".join(HEADER) + "\nhttps://lenta.ru/1,Title,ok,Мир,,2018/12/14\n"
    path.write_bytes(good.encode() + "https://lenta.ru/2,Заголовок,Текст,Мир,,2018/12/14\n".encode("cp1251"))
    offset = len(good.encode()) + len(b"https://lenta.ru/2,")
    assert_error(lambda: iter_articles(path), path, "not valid UTF-8", f"byte offset {offset}", "line 3")


def test_no_usable_text(tmp_path: Path):
    path = write_csv(
        tmp_path / "blank_text.csv", HEADER, [["u1", "t", " \u00a0", "", "", ""], ["u2", "t", "nan", "", "", ""]]
    )
    assert_error(lambda: iter_articles(path), path, "none of the 2 rows has text")


def test_row_with_too_many_fields(tmp_path: Path):
    path = write_csv(tmp_path / "wide.csv", HEADER, [QUIRKY_ROWS[0], [*QUIRKY_ROWS[1], "extra"]])
    assert_error(lambda: iter_articles(path), path, "row at line 3-7 has 7 fields")
    stats = Counter()
    assert len(list(iter_articles(path, on_bad_row="skip", stats=stats))) == 1 and stats["bad_rows"] == 1


def test_selection_errors_name_the_source(quirky_csv: Path):
    assert_error(
        lambda: select_articles(iter_articles(quirky_csv), topics=["Нет такой"], source=quirky_csv),
        quirky_csv,
        "no articles left",
        "dropped_topic 8",
    )
    assert_error(lambda: select_articles([], max_articles=0, source=quirky_csv), quirky_csv, "max_articles")
    assert_error(
        lambda: select_articles([], date_from="2019-01-01", date_to="2018-01-01", source=quirky_csv),
        quirky_csv,
        "after date_to",
    )


@pytest.mark.parametrize(
    "ratios, problem",
    [
        ({"train": 0.9, "test": 0.05}, "sum to 0.95, not 1"),
        ({"train": 1.1, "test": -0.1}, "must be a number >= 0"),
        ({}, "empty"),
    ],
)
def test_bad_ratios(ratios, problem):
    with pytest.raises(CorpusError, match=problem):
        split_articles([], ratios)
    with pytest.raises(CorpusError, match=problem):
        assign_split(Article("u", "", "t", "", "", ""), ratios)


# ---------------------------------------------------------------- splits


def make_articles(count: int, start: int = 0) -> list[Article]:
    return [
        Article(
            f"https://lenta.ru/news/{i}/",
            f"Заголовок {i}",
            f"Текст номер {i} " + "слово " * (i % 7),
            random.Random(i).choice(["Россия", "Мир", "Спорт"]),
            "",
            f"2018-01-{i % 28 + 1:02d}",
        )
        for i in range(start, start + count)
    ]


def test_split_determinism_and_ratios():
    old = make_articles(2000)
    first = split_articles(old, RATIOS)
    share = {name: len(rows) / 2000 for name, rows in first.items()}
    assert share["train"] == pytest.approx(0.9, abs=0.02)
    assert share["validation"] == pytest.approx(0.05, abs=0.02) and share["test"] == pytest.approx(0.05, abs=0.02)
    keys = [article_key(a) for rows in first.values() for a in rows]
    assert len(keys) == len(set(keys)) == 2000  # no key in two splits
    grown = split_articles(make_articles(1000, start=2000) + old[::-1], dict(reversed(RATIOS.items())))
    where = {article_key(a): name for name, rows in grown.items() for a in rows}
    assert all(where[article_key(a)] == name for name, rows in first.items() for a in rows)


def test_split_ignores_zero_ratio_and_url_scheme():
    articles = make_articles(300)
    assert split_articles(articles, {"train": 1.0, "test": 0.0})["test"] == []
    http = Article("http://www.lenta.ru/news/5", "", "x", "", "", "")
    https = Article("https://lenta.ru/news/5/", "", "y", "", "", "")
    assert article_key(http) == article_key(https) and assign_split(http, RATIOS) == assign_split(https, RATIOS)


# ---------------------------------------------------------------- selection


def duplicated_corpus() -> list[Article]:
    """300 distinct stories, each re-published 1-4 times as near-duplicates under other URLs,
    plus URL duplicates with changed text."""
    rng = random.Random(7)
    rows = []
    for story in range(300):
        text = f"История {story}: в Москве прошло событие номер {story}."
        for copy in range(rng.randint(1, 4)):
            variant = text.upper() if copy % 2 else text.replace(":", " —")
            rows.append(Article(f"https://lenta.ru/news/{story}/{copy}/", f"Т{story}", variant, "Россия", "", ""))
    rows.append(Article("https://lenta.ru/news/5/0/", "Т5", "Совсем другой текст под тем же адресом.", "", "", ""))
    return rows


def reference_selection(articles: list[Article], max_articles: int, seed: int) -> list[Article]:
    """Dedupe everything first (group minimum by priority), then take the smallest priorities."""

    def rank(a):
        return (sample_priority(seed, article_key(a)), article_key(a), a.title, a.text, a.topic, a.tags, a.date, a.url)

    kept: dict[bytes, Article] = {}
    for article in sorted(articles, key=rank):
        if text_digest(article.text) not in kept and all(article_key(k) != article_key(article) for k in kept.values()):
            kept[text_digest(article.text)] = article
    return sorted(sorted(kept.values(), key=rank)[:max_articles], key=article_key)


def test_selection_is_order_independent_and_dedupes_before_sampling():
    corpus = duplicated_corpus()
    expected = reference_selection(corpus, 50, seed=3)
    for shuffle_seed in range(6):
        shuffled = corpus[:]
        random.Random(shuffle_seed).shuffle(shuffled)
        selected = select_articles(iter(shuffled), max_articles=50, seed=3)
        assert selected == expected
    assert len({text_digest(a.text) for a in expected}) == 50  # no near-duplicates among the 50
    assert len(select_articles(corpus)) == 300  # all stories, once each
    assert select_articles(corpus, max_articles=50, seed=4) != expected  # seed matters
    assert len(select_articles(corpus, max_articles=10_000)) == 300  # cap above corpus size


# ---------------------------------------------------------------- fingerprint and statistics


def test_fingerprint_changes_only_with_rows_or_settings():
    corpus = duplicated_corpus()
    settings = {"max_articles": 100, "seed": 3, "ratios": RATIOS, "date_from": date(2018, 1, 1)}

    def fingerprint(rows, config=settings):
        return fingerprint_articles(split_articles(select_articles(rows, max_articles=100, seed=3), RATIOS), config)

    base = fingerprint(corpus)
    assert base == fingerprint(corpus[::-1])  # file order does not matter
    assert base == fingerprint(corpus, dict(reversed(settings.items())))  # nor the order of settings keys
    assert base != fingerprint(corpus, {**settings, "seed": 4})
    assert base != fingerprint(corpus, {**settings, "date_from": date(2018, 1, 2)})
    selected = select_articles(corpus, max_articles=100, seed=3)
    splits = split_articles(selected, RATIOS)
    edited = {
        name: [
            Article(a.url, a.title, a.text + " Правка.", a.topic, a.tags, a.date) if i == 0 else a
            for i, a in enumerate(rows)
        ]
        for name, rows in splits.items()
    }
    assert fingerprint_articles(edited, settings) != fingerprint_articles(splits, settings)
    moved = {**splits, "test": splits["test"] + splits["train"][:1], "train": splits["train"][1:]}
    assert fingerprint_articles(moved, settings) != fingerprint_articles(splits, settings)
    with pytest.raises(CorpusError, match="cannot be fingerprinted"):
        fingerprint_articles(splits, {"bad": object()})


def test_describe_splits():
    articles = make_articles(40) + [Article("https://lenta.ru/x/", "", "abc", "", "", "")]
    summary = describe_splits(split_articles(articles, RATIOS), top_topics=2)
    assert summary["total"]["articles"] == 41 and summary["total"]["undated"] == 1
    assert sum(s["articles"] for s in summary["splits"].values()) == 41
    assert summary["total"]["characters"] == sum(len(join_title_and_text(a)) for a in articles)
    assert summary["total"]["date_from"] == "2018-01-01" and summary["total"]["date_to"] == "2018-01-28"
    assert len(summary["top_topics"]) == 2 and set(summary["splits"]) == set(RATIOS)
