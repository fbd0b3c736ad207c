"""Reading a text-classification file, mapping labels, splitting it across simulated clients, tokenizing.

Files are parsed with Python's ``csv`` module (quoted fields, CRLF line endings as in BANKING77) or ``json`` for
JSONL. Tab-separated files are read with literal quotes unless they are consistently CSV-quoted (``data.quoting``).
Every way a data owner's file can be wrong ends in :class:`veil.errors.DataFileError` naming the file, the problem
and the fix. Splits across simulated clients live in :mod:`veil.task.partition`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from veil.conf.schema import DataConfig
from veil.errors import DataFileError

log = logging.getLogger("veil.task")

_MAX_FIELD = 1 << 20  # 1 MiB per field: a runaway single-line file is an error, not a hang


@dataclass(frozen=True)
class TextExamples:
    """Texts and their label names, in file order."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> TextExamples:
        return TextExamples([self.texts[i] for i in idx], [self.labels[i] for i in idx])


def read_examples(path: str | Path, cfg: DataConfig) -> TextExamples:
    """Read ``path`` as CSV, TSV or JSONL with the text and label columns named in ``cfg``."""
    p = Path(path)
    texts, labels = _select_columns(p, read_rows(p, cfg), cfg)
    if not texts:
        raise DataFileError(f"data file {p} has no examples; give a file with at least one row of data")
    return TextExamples(texts=texts, labels=labels)


def read_rows(path: str | Path, cfg: DataConfig) -> list[dict[str, str]]:
    """The rows of ``path`` (CSV, TSV or JSONL) as column -> value, in file order."""
    p = Path(path)
    if str(path).startswith("package:"):  # a file shipped inside veil (veil/data/)
        from veil.data import resolve_data_path

        p = Path(resolve_data_path(str(path)))
    if p.is_dir():
        raise DataFileError(f"data file {p} is a directory; give the file's path (CSV, TSV or JSONL)")
    if not p.is_file():
        raise DataFileError(f"data file {p} does not exist; check data.train_path/data.test_path (or --data)")
    fmt = cfg.format if cfg.format != "auto" else _format_from_suffix(p)
    try:
        raw = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFileError(f"data file {p} is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from err
    except OSError as err:
        raise DataFileError(f"data file {p} cannot be read ({err.strerror}); check its permissions") from err
    return _parse_jsonl(p, raw) if fmt == "jsonl" else _parse_delimited(p, raw, fmt, cfg)


def _format_from_suffix(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "csv"


_DELIMITERS = (",", "\t", ";", "|")  # what data.format=auto recognises in a file that is not .tsv/.jsonl
_SNIFF_RECORDS = 50


def sniff_delimiter(raw: str) -> str:
    """The delimiter of a delimited text whose suffix does not say (``.csv``, ``.txt``, none): the first of
    :data:`_DELIMITERS` that splits the first records into the same number (>= 2) of fields; ``,`` if none does.

    Hand-written because ``csv.Sniffer`` guesses from character frequencies and picks a letter or a space in short
    texts; splitting a sample the way the file will be read is what decides here.
    """
    for delimiter in _DELIMITERS:
        for quoted in (True, False):  # CSV quoting, or quotes as plain text (a TSV export with a lone '"')
            try:
                widths = {len(row) for _line, row in _table(raw, delimiter, quoted=quoted, limit=_SNIFF_RECORDS)}
            except csv.Error:
                continue
            if len(widths) == 1 and widths.pop() >= 2:
                return delimiter
    return ","


def _parse_delimited(p: Path, raw: str, fmt: str, cfg: DataConfig) -> list[dict[str, str]]:
    if cfg.delimiter:
        delimiter = cfg.delimiter
    elif fmt == "tsv":
        delimiter = "\t"
    else:  # data.format=auto on a file that is not .tsv, or csv without data.delimiter: as the file is written
        delimiter = sniff_delimiter(raw) if cfg.format == "auto" else ","
    csv.field_size_limit(_MAX_FIELD)
    quoting = cfg.quoting if cfg.quoting != "auto" else ("auto" if delimiter == "\t" else "csv")
    if quoting == "auto":  # TSV as people export it: literal quotes, unless the file is consistently CSV-quoted
        return _rows(p, _pick_tsv_table(p, raw, delimiter), cfg, delimiter)
    try:
        table = _table(raw, delimiter, quoted=quoting == "csv")
    except csv.Error as err:
        hint = "fix the quoting or set data.quoting=none (quotes as plain text)" if quoting == "csv" else "fix the file"
        raise DataFileError(f"data file {p} is not valid {fmt.upper()} ({err}); {hint}") from err
    return _rows(p, table, cfg, delimiter)


def _table(raw: str, delimiter: str, *, quoted: bool, limit: int | None = None) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty record (the first ``limit`` of them when given); ``quoted=False``
    treats quotes as plain text."""
    # newline="": the csv module itself splits records, so CRLF and line breaks inside quotes survive, and
    # str.splitlines' extra separators (U+2028, U+0085, ...) inside a text do not cut a row in two.
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    try:
        return [(reader.line_num, row) for row in itertools.islice(filter(None, reader), limit)]
    except csv.Error as err:  # name the line: the csv module's message does not
        raise csv.Error(f"line {reader.line_num}: {err}") from err


def _mismatch(table: list[tuple[int, list[str]]]) -> tuple[int, int] | None:
    """(line, fields) of the first record whose field count differs from the first record's; None if none does."""
    width = len(table[0][1]) if table else 0
    return next(((line, len(row)) for line, row in table if len(row) != width), None)


def _pick_tsv_table(p: Path, raw: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """``data.quoting=auto`` for tab-separated text: CSV quoting only where the file consistently uses it (the quoted
    reading is valid and rectangular, and every field that starts with a quote ends with one); else literal quotes."""
    literal = _table(raw, delimiter, quoted=False)  # cannot fail: no quote or escape character is special
    try:
        quoted: list[tuple[int, list[str]]] | None = _table(raw, delimiter, quoted=True)
    except csv.Error:
        quoted = None
    if quoted is None or _mismatch(quoted) is not None:
        return literal
    if _mismatch(literal) is not None:
        return quoted  # quoted fields hold the delimiter: only the CSV reading is rectangular
    wrapped = all(len(field) >= 2 and field.endswith('"') for _line, row in literal for field in row
                  if field.startswith('"'))
    return quoted if wrapped and len(quoted) == len(literal) else literal


def _rows(p: Path, table: list[tuple[int, list[str]]], cfg: DataConfig, delimiter: str) -> list[dict[str, str]]:
    if not table:
        raise DataFileError(f"data file {p} is empty; give a file with a header and rows of data")
    if cfg.header:
        (first, header), body = table[0], table[1:]
    else:
        (first, first_row), body = table[0], table
        header = [str(i) for i in range(len(first_row))]
    against = "the header" if cfg.header else f"line {first}"
    for lineno, row in body:
        if len(row) != len(header):
            raise DataFileError(
                f"data file {p} line {lineno} has {_fields(len(row))} but {against} has {len(header)}; "
                f"quote fields that contain the delimiter {delimiter!r} (or set data.delimiter, data.quoting)"
            )
    return [dict(zip(header, row, strict=True)) for _lineno, row in body]


def _fields(n: int) -> str:
    return f"{n} field" if n == 1 else f"{n} fields"


def _parse_jsonl(p: Path, raw: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for lineno, line in enumerate(raw.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"data file {p} line {lineno} is not JSON ({err.msg}); one JSON object per line") from err
        if not isinstance(obj, dict):
            raise DataFileError(f"data file {p} line {lineno} is not a JSON object; one object per line")
        rows.append({str(k): "" if v is None else str(v) for k, v in obj.items()})
    return rows


def _select_columns(p: Path, rows: list[dict[str, str]], cfg: DataConfig) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    labels: list[str] = []
    for i, row in enumerate(rows, start=1):
        for column, option in ((cfg.text_column, "text"), (cfg.label_column, "label")):
            if column not in row:
                found = ", ".join(sorted(row)) or "none"
                raise DataFileError(
                    f"data file {p} has no {option} column {column!r} (columns: {found}); "
                    f"set data.{option}_column (or --{option}-column)"
                )
        text, label = row[cfg.text_column].strip(), row[cfg.label_column].strip()
        if not label:
            raise DataFileError(f"data file {p} row {i} has an empty label; fill it or drop the row")
        texts.append(text)
        labels.append(label)
    return texts, labels


def label_names(train: TextExamples, test: TextExamples, *, train_path: str, test_path: str) -> list[str]:
    """The sorted label set; every test label must occur in training, and training needs two classes."""
    train_set, test_set = set(train.labels), set(test.labels)
    if len(train_set) < 2:
        raise DataFileError(f"data file {train_path} has only one class ({next(iter(train_set))!r}); a classifier needs two or more")
    unseen = sorted(test_set - train_set)
    if unseen:
        raise DataFileError(
            f"data file {test_path} has {len(unseen)} label(s) never seen in {train_path} (e.g. {unseen[0]!r}); "
            "drop them from the test file or add training examples"
        )
    return sorted(train_set)


def encode_labels(examples: TextExamples, names: list[str], *, path: str) -> np.ndarray:
    """Label ids (int64) of ``examples`` in the order of ``names``."""
    index = {name: i for i, name in enumerate(names)}
    try:
        return np.array([index[label] for label in examples.labels], dtype=np.int64)
    except KeyError as err:
        raise DataFileError(
            f"data file {path} has label {err.args[0]!r} outside the run's label set; remove it or add it to data.labels"
        ) from err


def tokenize(tokenizer: object, texts: list[str], *, max_length: int,
             fixed_length: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and attention masks, padded to the longest text (at most ``max_length``), or with ``fixed_length``
    to ``max_length`` itself: a deployed node's tensors, whose shape (and each step's cost) then says nothing about
    its longest record (review 2026-12-07, N6)."""
    enc = tokenizer(  # type: ignore[operator]
        texts, padding="max_length" if fixed_length else "longest", truncation=True, max_length=max_length,
        return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (N, T) each
