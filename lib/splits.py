"""Select, de-duplicate, sample, split and fingerprint Lenta articles.

Reading and cleaning are in `lib/corpus.py`; this module only sees Articles.

De-duplication and sampling happen in one streaming pass so that memory is
O(max_articles), not O(corpus):
  * Two articles are duplicates when their dedupe-normalised texts are equal
    (lowercase, ё->е, punctuation and whitespace removed; see
    `corpus.normalise_for_dedupe`) or when they share an `article_key`
    (the same URL scraped twice).
  * Of each duplicate group the article with the smallest rank is kept, rank =
    (hash(seed, key), key, then the other fields as tie-breakers). Sampling
    keeps the `max_articles` kept articles with the smallest hash(seed, key).
    Because the survivor of a group is its minimum under the same order that
    sampling uses, a bounded max-heap gives exactly the same subset as "dedupe
    everything, then sample", whatever order the rows arrive in. (A chain of
    duplicates linked partly by text and partly by URL can make the result
    depend on order; the corpus has no such chains worth the extra memory.)
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from pathlib import PurePath

from lib.corpus import Article, CorpusError, article_key, clean_line, join_title_and_text, parse_date, text_digest

_RATIO_TOLERANCE = 1e-6


@dataclass
class _Candidate:
    rank: tuple
    key: str
    digest: bytes
    article: Article
    alive: bool = field(default=True)


class _Pool:
    """Kept articles, at most `capacity` of them, unique by key and by text digest."""

    def __init__(self, capacity: int | None, stats: Counter):
        self.capacity = capacity
        self.stats = stats
        self.by_key: dict[str, _Candidate] = {}
        self.by_digest: dict[bytes, _Candidate] = {}
        self.heap: list[tuple[int, int, _Candidate]] = []  # (-priority, tie, candidate): max-heap
        self.counter = 0

    def offer(self, article: Article, key: str, rank: tuple) -> None:
        if self._is_full() and rank >= self._largest().rank:
            # Every kept article, hence any duplicate of this one, ranks lower:
            # it can never get in, so skip the costly text digest.
            return
        candidate = _Candidate(rank, key, text_digest(article.text), article)
        rivals = {id(c): c for c in (self.by_digest.get(candidate.digest), self.by_key.get(key)) if c}
        if any(rival.rank <= rank for rival in rivals.values()):
            self.stats["duplicates"] += 1
            return
        for rival in rivals.values():
            self.stats["duplicates"] += 1
            self._remove(rival)
        if self._is_full():
            self._remove(self._largest())
        self._insert(candidate)

    def _is_full(self) -> bool:
        return self.capacity is not None and len(self.by_key) >= self.capacity

    def articles(self) -> list[Article]:
        return [c.article for c in self.by_key.values()]

    def _insert(self, candidate: _Candidate) -> None:
        self.by_key[candidate.key] = candidate
        self.by_digest[candidate.digest] = candidate
        if self.capacity is not None:
            self.counter += 1
            heapq.heappush(self.heap, (-candidate.rank[0], self.counter, candidate))

    def _remove(self, candidate: _Candidate) -> None:
        # Lazy deletion: the heap entry stays until it reaches the top.
        candidate.alive = False
        if self.by_key.get(candidate.key) is candidate:
            del self.by_key[candidate.key]
        if self.by_digest.get(candidate.digest) is candidate:
            del self.by_digest[candidate.digest]
        if len(self.heap) > 2 * len(self.by_key) + 1024:
            self.heap = [entry for entry in self.heap if entry[2].alive]
            heapq.heapify(self.heap)

    def _largest(self) -> _Candidate:
        while not self.heap[0][2].alive:
            heapq.heappop(self.heap)
        return self.heap[0][2]


def sample_priority(seed: int, key: str) -> int:
    """128-bit hash(seed, key): the sampling order (smaller is kept first)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=16, person=b"lenta-sample")
    return int.from_bytes(digest.digest(), "big")


def select_articles(
    articles: Iterable[Article],
    *,
    topics: Sequence[str] = (),
    date_from: date | str | None = None,
    date_to: date | str | None = None,
    min_text_chars: int = 1,
    max_articles: int | None = None,
    seed: int = 42,
    source: str | PurePath = "articles",
    stats: Counter | None = None,
) -> list[Article]:
    """Filter, de-duplicate and (if max_articles) sample; return articles sorted by key.

    Filters: `topics` (case-insensitive, empty = all), inclusive date range
    (undated articles are dropped once either bound is set), `min_text_chars`
    on the cleaned text; empty text is always dropped. Raises CorpusError,
    naming `source`, when the settings are invalid or nothing is left.
    `stats`, if given, gets counts: input, dropped_empty, dropped_topic,
    dropped_date, dropped_short, duplicates, selected. `duplicates` is exact
    without max_articles and a lower bound with it (a duplicate of an article
    already sampled out is never seen as one).
    """
    stats = stats if stats is not None else Counter()
    low, high = _date_bound(date_from, "date_from", source), _date_bound(date_to, "date_to", source)
    if low and high and low > high:
        raise CorpusError(f"{source}: date_from {low} is after date_to {high}; swap or fix them")
    if max_articles is not None and (not isinstance(max_articles, int) or max_articles < 1):
        raise CorpusError(f"{source}: max_articles must be a positive integer or None, got {max_articles!r}")
    wanted_topics = {clean_line(topic).casefold() for topic in topics}
    pool = _Pool(max_articles, stats)
    for article in articles:
        stats["input"] += 1
        if not article.text:
            stats["dropped_empty"] += 1
        elif wanted_topics and article.topic.casefold() not in wanted_topics:
            stats["dropped_topic"] += 1
        elif (low or high) and not (
            article.date and (not low or article.date >= low) and (not high or article.date <= high)
        ):
            stats["dropped_date"] += 1
        elif len(article.text) < min_text_chars:
            stats["dropped_short"] += 1
        else:
            key = article_key(article)
            rank = (
                sample_priority(seed, key),
                key,
                article.title,
                article.text,
                article.topic,
                article.tags,
                article.date,
                article.url,
            )
            pool.offer(article, key, rank)
    selected = sorted(pool.articles(), key=article_key)
    stats["selected"] = len(selected)
    if not selected:
        counts = ", ".join(
            f"{name} {stats[name]}"
            for name in ("input", "dropped_empty", "dropped_topic", "dropped_date", "dropped_short")
        )
        raise CorpusError(
            f"{source}: no articles left after selection ({counts}); loosen topics, date_from/date_to or min_text_chars"
        )
    return selected


def _date_bound(value: date | str | None, name: str, source: str | PurePath) -> str:
    """Bound as "YYYY-MM-DD" ("" = none); ISO strings compare like dates."""
    if value is None or value == "":
        return ""
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    parsed = parse_date(str(value))
    if not parsed:
        raise CorpusError(f"{source}: {name} {value!r} is not a date; use YYYY-MM-DD")
    return parsed


def assign_split(article: Article, ratios: Mapping[str, float]) -> str:
    """Split name for an article, from a hash of its key alone.

    The position and the seed play no part, so adding articles never moves an
    old one. Splits are laid out in sorted name order, so the order of the
    ratios mapping does not matter either."""
    bounds = _split_bounds(tuple(ratios.items()))
    digest = hashlib.blake2b(article_key(article).encode(), digest_size=8, person=b"lenta-split-v1")
    point = int.from_bytes(digest.digest(), "big") / 2**64
    for name, upper in bounds:
        if point < upper:
            return name
    return bounds[-1][0]  # float round-off just below 1.0


@lru_cache(maxsize=64)
def _split_bounds(items: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    """Validate ratios; return (name, cumulative upper bound) for splits with ratio > 0."""
    shown = dict(items)
    if not items:
        raise CorpusError("split ratios are empty; give e.g. {'train': 0.9, 'validation': 0.05, 'test': 0.05}")
    for name, ratio in items:
        if not isinstance(name, str) or not name:
            raise CorpusError(f"split ratios {shown}: split name {name!r} must be a non-empty string")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
            raise CorpusError(f"split ratios {shown}: ratio for {name!r} must be a number >= 0, got {ratio!r}")
    total = math.fsum(ratio for _, ratio in items)
    if abs(total - 1.0) > _RATIO_TOLERANCE:
        raise CorpusError(f"split ratios {shown} sum to {total:.6g}, not 1; fix the ratios in the config")
    bounds, upper = [], 0.0
    for name, ratio in sorted(items):
        upper += ratio
        if ratio > 0:
            bounds.append((name, upper))
    return tuple(bounds)


def split_articles(articles: Sequence[Article], ratios: Mapping[str, float]) -> dict[str, list[Article]]:
    """Assign every article to a split; every split in `ratios` is present (maybe empty),
    and each list keeps the input order (sorted by key if it came from select_articles)."""
    _split_bounds(tuple(ratios.items()))  # validate even when there are no articles
    splits: dict[str, list[Article]] = {name: [] for name in ratios}
    for article in articles:
        splits[assign_split(article, ratios)].append(article)
    return splits


def fingerprint_articles(splits: Mapping[str, Sequence[Article]], settings: Mapping[str, object]) -> str:
    """sha256 hex of the canonical settings JSON and, split by split in sorted name
    order, each article's key, title and text in list order.

    Fields are length-prefixed so that moving text between title and body, or
    between two articles, changes the digest."""
    digest = hashlib.sha256(b"lenta-lora corpus fingerprint v1\n")
    _update(digest, canonical_json(settings))
    for name in sorted(splits):
        rows = splits[name]
        _update(digest, name)
        _update(digest, str(len(rows)))
        for article in rows:
            for value in (article_key(article), article.title, article.text):
                _update(digest, value)
    return digest.hexdigest()


def _update(digest, value: str) -> None:
    data = value.encode()
    digest.update(len(data).to_bytes(8, "big"))
    digest.update(data)


def canonical_json(settings: Mapping[str, object]) -> str:
    """Key-sorted compact JSON; dates and paths as strings, sets as sorted lists."""
    try:
        return json.dumps(
            settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_value
        )
    except (TypeError, ValueError) as exc:
        raise CorpusError(
            f"corpus settings cannot be fingerprinted ({exc}); "
            f"use str, number, bool, date, list or dict values with str keys"
        ) from exc


def _json_value(value: object) -> object:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def describe_splits(splits: Mapping[str, Sequence[Article]], *, top_topics: int = 10) -> dict:
    """JSON-ready statistics: per split and in total the article count, characters of
    training text (join_title_and_text), date range and undated count; plus the
    most common topics over all splits ("(no topic)" for empty)."""
    topics: Counter = Counter()
    per_split = {}
    for name, rows in splits.items():
        per_split[name] = _summarise(rows)
        topics.update(article.topic or "(no topic)" for article in rows)
    total = _summarise([article for rows in splits.values() for article in rows])
    common = sorted(topics.items(), key=lambda item: (-item[1], item[0]))[:top_topics]
    return {"splits": per_split, "total": total, "top_topics": dict(common)}


def _summarise(rows: Sequence[Article]) -> dict:
    dates = [article.date for article in rows if article.date]
    return {
        "articles": len(rows),
        "characters": sum(len(join_title_and_text(article)) for article in rows),
        "date_from": min(dates) if dates else None,
        "date_to": max(dates) if dates else None,
        "undated": len(rows) - len(dates),
    }
