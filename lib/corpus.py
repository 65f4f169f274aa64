"""Read and clean the Lenta.ru news CSV (Kaggle `lenta-ru-news.csv`).

The file is ~2 GB, so `iter_articles` streams it row by row with the `csv`
module and never holds more than one row. Selection, de-duplication, splits
and fingerprints live in `lib/splits.py`.

Cleaning decisions (applied to every row):
  * Encoding must be UTF-8; a leading BOM is dropped. Text is NFC-normalised
    so that composed and decomposed "й"/"ё" compare equal.
  * Non-breaking and other Unicode spaces (\\u00a0, \\u202f, \\u2007, ...) and
    tabs become a plain space; zero-width spaces, soft hyphens and control
    characters are removed.
  * `text`: \\r\\n, \\r, \\u2028 and \\u2029 become \\n; runs of spaces collapse
    to one; any run of line breaks (blank lines included) collapses to a single
    "\\n" that separates paragraphs. A single "\\n" keeps paragraph structure
    for the language model while leaving "\\n\\n" free as the unambiguous
    title/body separator in `join_title_and_text`.
  * `title`, `topic`, `tags`, `url`: all whitespace, newlines included,
    collapses to one space (they are one-line fields).
  * A field that is exactly "nan", "NaN", "None", "null", "NULL" or "<NA>"
    counts as missing: that is how NaN leaks in when someone round-trips the
    file through pandas with `astype(str)`.
  * `date` accepts YYYY/MM/DD (Kaggle) and YYYY-MM-DD, optionally followed by a
    time, and becomes "YYYY-MM-DD"; anything else (or an impossible date such
    as 2019/02/30) becomes "" and the row is kept.
  * Rows whose text is empty after cleaning are dropped.
  * Extra columns (a pandas index column with an empty or "Unnamed: 0"
    header) are ignored; a header one field shorter than the rows (R-style
    index without a header cell) is read the way pandas reads it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REQUIRED_COLUMNS = ("url", "title", "text", "topic", "tags", "date")

# Lenta articles are a few KB, but the csv module's default 128 KiB field
# limit would abort the whole read on one oversized (usually broken) field.
_FIELD_SIZE_LIMIT = 256 * 1024 * 1024

_ARCHIVE_MAGIC = {b"PK\x03\x04": "zip", b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}

_MISSING_MARKERS = frozenset({"nan", "NaN", "None", "null", "NULL", "<NA>"})

_SPACE_CHARS = "\t\v\f\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
_DROP_CHARS = "\u200b\u2060\ufeff\u00ad" + "".join(chr(c) for c in [*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
_ODD_REPLACEMENTS = {
    **{c: " " for c in _SPACE_CHARS},
    **{c: "" for c in _DROP_CHARS},
    "\r": "\n",
    "\x85": "\n",
    "\u2028": "\n",
    "\u2029": "\n",
}
_ODD_CHAR = re.compile("[" + re.escape("".join(_ODD_REPLACEMENTS)) + "]")
_SPACE_RUN = re.compile(r" {2,}")
_DATE = re.compile(r"(\d{4})([/-])(\d{1,2})\2(\d{1,2})(?:[ T]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?")
# Punctuation for dedupe: every ASCII byte that is not a letter or digit, plus
# U+0080-U+00BF (« » NBSP ©), U+2000-U+206F (— – … “ ” „ and odd spaces) and
# U+2116 (№), matched on UTF-8 bytes. An explicit set instead of \W because a
# \W regex on Cyrillic str ran at ~10 MB/s, the byte patterns at ~80 MB/s.
_ASCII_NOT_ALNUM = bytes(b for b in range(128) if not chr(b).isalnum())
_UNICODE_PUNCT = re.compile(rb"\xc2[\x80-\xbf]|\xe2\x80[\x80-\xbf]|\xe2\x81[\x80-\xaf]|\xe2\x84\x96")
_URL_SCHEME = re.compile(r"^(?:https?://)?(?:www\.)?", re.IGNORECASE)


class CorpusError(ValueError):
    """Bad corpus input; the message is one line naming the file, the problem and the fix."""


@dataclass(frozen=True)
class Article:
    url: str
    title: str
    text: str
    topic: str
    tags: str
    date: str  # "YYYY-MM-DD", or "" when missing or unparseable


def iter_articles(path: str | Path, *, stats: Counter | None = None, on_bad_row: str = "error") -> Iterator[Article]:
    """Stream cleaned articles from a Kaggle-format Lenta CSV.

    Path problems raise CorpusError at call time; content problems (encoding,
    header, malformed rows, no data, no usable text) raise while iterating.
    `stats`, if given, is filled with counts: rows, yielded, empty_text,
    bad_date, bad_rows. `on_bad_row="skip"` skips rows with more fields than
    the header instead of raising.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusError(f"{path}: file does not exist; download lenta-ru-news.csv from Kaggle or fix the path")
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, not a CSV file; point to lenta-ru-news.csv inside it")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: file is empty (0 bytes); re-download or re-extract lenta-ru-news.csv")
    archive = _sniff_archive(path)
    if archive:
        raise CorpusError(f"{path}: is a {archive} archive, not a CSV; extract lenta-ru-news.csv from it first")
    if on_bad_row not in ("error", "skip"):
        raise CorpusError(f"{path}: on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    return _read_articles(path, stats if stats is not None else Counter(), on_bad_row)


def _sniff_archive(path: Path) -> str:
    # Otherwise a compressed download fails later as "not valid UTF-8 at byte 0".
    with open(path, "rb") as raw:
        head = raw.read(6)
    return next((name for magic, name in _ARCHIVE_MAGIC.items() if head.startswith(magic)), "")


def _read_articles(path: Path, stats: Counter, on_bad_row: str) -> Iterator[Article]:
    if csv.field_size_limit() < _FIELD_SIZE_LIMIT:
        csv.field_size_limit(_FIELD_SIZE_LIMIT)
    with open(path, "rb") as raw:
        # newline="" lets the csv module see the raw line ends, which it needs
        # to keep newlines that sit inside quoted fields.
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.reader(stream)
        try:
            yield from _parse_rows(path, reader, stats, on_bad_row)
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"{path}: not valid UTF-8 ({_locate_bad_utf8(path)}); "
                f"re-save it as UTF-8, e.g. iconv -f cp1251 -t utf-8"
            ) from exc
        except csv.Error as exc:
            raise CorpusError(
                f"{path}: malformed CSV near line {reader.line_num} ({exc}); check the quoting there"
            ) from exc


def _parse_rows(path: Path, reader, stats: Counter, on_bad_row: str) -> Iterator[Article]:
    header = next((row for row in reader if row), None)
    if header is None:
        raise CorpusError(f"{path}: file has no header or rows (only blank lines); re-download lenta-ru-news.csv")
    names = [name.replace("\ufeff", "").strip().lower() for name in header]
    columns = _locate_columns(path, names)
    shift: int | None = None  # decided on the first data row, see below
    last_line = reader.line_num
    for row in reader:
        # A record spans several physical lines when a quoted field has newlines.
        first_line, last_line = last_line + 1, reader.line_num
        if not row:
            continue  # blank line between records, as pandas skips them
        if shift is None:
            # pandas' rule: a header one cell shorter than the rows means the
            # first column is an unnamed index.
            shift = 1 if len(row) == len(names) + 1 else 0
        stats["rows"] += 1
        if len(row) > len(names) + shift:
            if on_bad_row == "skip":
                stats["bad_rows"] += 1
                continue
            lines = f"{first_line}-{last_line}" if last_line > first_line else f"{first_line}"
            raise CorpusError(
                f"{path}: the row at line {lines} has {len(row)} fields but the header has "
                f"{len(names)}; fix the quoting of that row or pass on_bad_row='skip'"
            )
        # Short rows are padded with "" the way pandas pads them with NaN.
        fields = [row[i + shift] if i + shift < len(row) else "" for i in columns]
        article = clean_row(*fields)
        if not article.text:
            stats["empty_text"] += 1
            continue
        if not article.date and fields[5].strip():
            stats["bad_date"] += 1
        stats["yielded"] += 1
        yield article
    if stats["rows"] == 0:
        raise CorpusError(f"{path}: file has a header but no data rows; re-download lenta-ru-news.csv")
    if stats["yielded"] == 0:
        raise CorpusError(
            f"{path}: none of the {stats['rows']} rows has text after cleaning; "
            f"check that the 'text' column holds the article bodies"
        )


def _locate_columns(path: Path, names: list[str]) -> list[int]:
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        found = ", ".join(repr(name) for name in names)
        raise CorpusError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {found}; "
            f"expected the Kaggle header url,title,text,topic,tags,date"
        )
    doubled = [column for column in REQUIRED_COLUMNS if names.count(column) > 1]
    if doubled:
        raise CorpusError(
            f"{path}: column(s) {', '.join(doubled)} appear more than once in the header; keep one of each"
        )
    return [names.index(column) for column in REQUIRED_COLUMNS]


def _locate_bad_utf8(path: Path) -> str:
    """Describe where the first invalid UTF-8 byte is (only runs on the error path)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    line = 1
    with open(path, "rb") as raw:
        while block := raw.read(1 << 20):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                # exc.start indexes the decoder's pending bytes + this block;
                # pending bytes are never newlines, so no line is counted twice.
                data = pending + block
                line += data[: exc.start].count(b"\n")
                bad = offset - len(pending) + exc.start
                return f"byte 0x{data[exc.start]:02x} at byte offset {bad}, line {line}"
            line += block.count(b"\n")
            offset += len(block)
    return "a multi-byte character is cut off at the end of the file"


def clean_row(url: str, title: str, text: str, topic: str, tags: str, raw_date: str) -> Article:
    """Build an Article from raw CSV fields (see the module docstring for the rules)."""
    return Article(
        url=clean_line(url),
        title=clean_line(title),
        text=clean_text(text),
        topic=clean_line(topic),
        tags=clean_line(tags),
        date=parse_date(raw_date),
    )


def clean_text(value: str) -> str:
    """Normalise a multi-paragraph body: one space between words, one "\\n" between paragraphs."""
    value = _normalise_unicode(value)
    # Each step is guarded by a cheap test: most rows need none of them, and
    # this runs on ~2 GB of text.
    if not value.isprintable():  # False for newlines, odd spaces, controls
        value = _replace_odd_chars(value.replace("\r\n", "\n"))
    if "  " in value:
        value = _SPACE_RUN.sub(" ", value)
    if "\n" in value:  # strip each paragraph, drop empty ones: runs of breaks become one
        value = "\n".join(line for line in (part.strip(" ") for part in value.split("\n")) if line)
    value = value.strip()
    return "" if value in _MISSING_MARKERS else value


def clean_line(value: str) -> str:
    """Normalise a one-line field: every whitespace run, newlines included, becomes one space."""
    value = _normalise_unicode(value)
    if not value.isprintable():
        value = _replace_odd_chars(value)
    value = " ".join(value.split())
    return "" if value in _MISSING_MARKERS else value


def _replace_odd_chars(value: str) -> str:
    # One str.replace per distinct odd character: str.translate with a dict
    # table crawls at ~10 MB/s on Cyrillic text.
    for char in set(_ODD_CHAR.findall(value)):
        value = value.replace(char, _ODD_REPLACEMENTS[char])
    return value


def _normalise_unicode(value: str) -> str:
    # is_normalized is a fast scan; most rows are already NFC.
    return value if unicodedata.is_normalized("NFC", value) else unicodedata.normalize("NFC", value)


def parse_date(value: str) -> str:
    """Return "YYYY-MM-DD" for YYYY/MM/DD or YYYY-MM-DD (time part ignored), else ""."""
    match = _DATE.fullmatch(value.strip())
    if match is None:
        return ""
    try:
        return date(int(match[1]), int(match[3]), int(match[4])).isoformat()
    except ValueError:  # e.g. 2019/02/30
        return ""


def normalise_for_dedupe(text: str) -> bytes:
    """Lowercase, fold ё to е, drop punctuation and whitespace (UTF-8 bytes):
    near-exact duplicates become equal."""
    # ASCII bytes never occur inside a multi-byte UTF-8 sequence, so deleting
    # them from the bytes is safe and far faster than a regex on the str.
    folded = text.lower().replace("ё", "е").encode().translate(None, _ASCII_NOT_ALNUM)
    return _UNICODE_PUNCT.sub(b"", folded)


def text_digest(text: str) -> bytes:
    """16-byte digest of the dedupe-normalised text; equal for near-exact duplicates."""
    return hashlib.blake2b(normalise_for_dedupe(text), digest_size=16).digest()


def article_key(article: Article) -> str:
    """Stable identity of an article: its URL without scheme, "www." and trailing slash,
    or "text:<digest>" of the normalised text when the URL is missing.

    The URL is canonicalised so that http:// and https:// copies of one page
    share a key (and therefore a split)."""
    url = _URL_SCHEME.sub("", article.url).rstrip("/")
    if url:
        host, sep, rest = url.partition("/")
        return host.lower() + sep + rest
    return "text:" + text_digest(article.text).hex()


def join_title_and_text(article: Article) -> str:
    """The training text: "title\\n\\ntext", or just the text when there is no title."""
    return f"{article.title}\n\n{article.text}" if article.title else article.text
