"""One labelled file is enough (a seeded split stratified by label, its exact ids in the run directory), TSV
exports with literal quotes read as written (`data.quoting`), and defaults that follow the settings given."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from veil.preflight import follow_defaults, preflight
from veil.conf.schema import DataConfig, FederationConfig, VeilConfig
from veil.errors import ConfigError, DataFileError
from veil.task.data import read_examples
from veil.task.split import evaluation_examples, stratified_test_rows, training_examples, write_split

LABELS = ["a"] * 10 + ["b"] * 5 + ["c"] * 1 + ["d"] * 20


def test_split_is_stratified_seeded_and_keeps_every_label_in_training() -> None:
    rows = stratified_test_rows(LABELS, fraction=0.2, seed=3)
    held = Counter(LABELS[i] for i in rows)
    assert held == {"a": 2, "b": 1, "d": 4}  # round(0.2 * n) per label; the single "c" stays in training
    assert np.array_equal(rows, stratified_test_rows(LABELS, fraction=0.2, seed=3))
    assert not np.array_equal(rows, stratified_test_rows(LABELS, fraction=0.2, seed=4))
    assert list(rows) == sorted(set(rows.tolist()))


def _one_file(tmp_path: Path) -> Path:
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"text {i} {lab},{lab}\n" for i, lab in enumerate(LABELS)), encoding="utf-8")
    return path


def test_one_file_split_is_written_and_read_back(tmp_path: Path) -> None:
    data = DataConfig(train_path=str(_one_file(tmp_path)), test_path="", label_column="label",
                      split_path=str(tmp_path / "split.json"))
    run = VeilConfig(data=data)
    write_split(run, seed=7)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["test_rows"] == stratified_test_rows(LABELS, fraction=0.2, seed=7).tolist()
    train, test = training_examples(run), evaluation_examples(run)
    assert len(train) + len(test) == len(LABELS) and not set(train.texts) & set(test.texts)
    assert test.texts == [f"text {i} {LABELS[i]}" for i in saved["test_rows"]]
    write_split(run, seed=7)  # a resume keeps the split
    with pytest.raises(ConfigError, match="test_fraction=0.2 and federation.seed=7"):
        write_split(run, seed=8)
    _one_file(tmp_path).write_text("text,label\nx,a\ny,b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="changed since"):
        write_split(run, seed=7)


def test_without_test_path_preflight_passes_and_too_small_files_fail(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _one_file(tmp_path)
    cfg = preflight(["model=tiny_bert", "data=csv", "data.train_path=one.csv", "secagg=off"])
    assert cfg.data.test_path == "" and cfg.data.test_fraction == 0.2
    (tmp_path / "two.csv").write_text("text,label\nx,a\ny,b\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="too small to split"):
        preflight(["model=tiny_bert", "data=csv", "data.train_path=two.csv", "secagg=off"])


TSV = ('"Hello" she said\tgreet\nwhere is my "card\tcard\nplain text\tcard\n'
       'he said "no" twice\tgreet\n"unclosed at start\tcard\n')


def _read(path: Path, quoting: str) -> tuple[list[str], list[str]]:
    ex = read_examples(path, DataConfig(train_path=str(path), text_column="0", label_column="1", header=False,
                                        quoting=quoting))
    return ex.texts, ex.labels


def test_headerless_tsv_with_literal_quotes_is_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "export.tsv"
    path.write_text(TSV, encoding="utf-8")
    expected = [line.split("\t") for line in TSV.splitlines()]
    for quoting in ("auto", "none"):
        texts, labels = _read(path, quoting)
        assert texts == [t for t, _ in expected] and labels == [lab for _, lab in expected], quoting
    with pytest.raises(DataFileError, match=r"export.tsv is not valid TSV \(line 1: .*data.quoting=none"):
        _read(path, "csv")


def test_consistently_quoted_tsv_keeps_csv_quoting(tmp_path: Path) -> None:
    path = tmp_path / "quoted.tsv"
    path.write_text('"a\tb"\tx\n"c ""d"""\ty\n', encoding="utf-8")
    assert _read(path, "auto") == (["a\tb", 'c "d"'], ["x", "y"])
    with pytest.raises(DataFileError, match=r"quoted.tsv line 2 has 2 fields but line 1 has 3"):
        _read(path, "none")


def test_clients_per_round_follows_num_clients_and_given_settings_win() -> None:
    cfg = VeilConfig(data=DataConfig(train_path="a.csv"), federation=FederationConfig(num_clients=3)).validate()
    assert cfg.federation.clients_per_round == 3
    with pytest.raises(ConfigError, match=r"federation.num_clients=2 is invalid: expected >= secagg.num_shares=3"):
        VeilConfig(data=DataConfig(train_path="a.csv"), federation=FederationConfig(num_clients=2)).validate()
    assert follow_defaults(["privacy.noise_multiplier=0.6,1.0"])[-1] == "privacy.target_epsilon=0"
    assert follow_defaults(["federation.local_epochs=2"])[-1] == "federation.local_steps=0"
    given = ["federation.local_epochs=2", "federation.local_steps=3"]
    assert follow_defaults(given) == given


def test_num_clients_alone_passes_the_checks_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    import veil
    from veil.task.shards import absolute

    monkeypatch.chdir(tmp_path)  # the default data ships inside the package
    cfg = preflight(["model=tiny_bert", "federation.num_clients=3"])
    assert (cfg.federation.num_clients, cfg.federation.clients_per_round) == (3, 3)
    assert absolute(cfg.data.train_path) == str(Path(veil.__file__).parent / "data" / "banking77" / "train.csv")
    assert absolute("mine.csv") == str(tmp_path / "mine.csv")  # a user's relative path: the launch directory


@pytest.mark.parametrize(("group", "task"), [("banking77", "classification"),
                                             ("banking77_instructions", "causal_lm")])
def test_every_shipped_data_group_works_from_any_directory(tmp_path: Path, monkeypatch, group: str,
                                                           task: str) -> None:
    """A shipped data group names files inside the package, never a path relative to a checkout."""
    from veil.preflight import preflight

    monkeypatch.chdir(tmp_path)
    model = "tiny_bert" if task == "classification" else "tiny_llama"
    cfg = preflight([f"data={group}", f"task={task}", f"model={model}"])  # reads both files: raises if missing
    assert cfg.data.train_path.startswith("package:") and cfg.data.test_path.startswith("package:")


ROWS = [('my card, the blue one, was lost', "card"), ("the atm kept my cash; twice", "cash"), ('a "fee"?', "fee")]


@pytest.mark.parametrize(("name", "delimiter"), [("export.csv", ";"), ("export.txt", "\t"), ("export.dat", "|"),
                                                 ("export.csv", ",")])
def test_the_delimiter_of_a_file_is_found_from_the_file(tmp_path: Path, name: str, delimiter: str) -> None:
    import csv
    import io

    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter=delimiter, lineterminator="\r\n").writerows([("Text", "Intent"), *ROWS])
    path = tmp_path / name
    path.write_text(buf.getvalue(), encoding="utf-8-sig")  # a BOM and CRLF, as spreadsheets write them
    got = read_examples(path, DataConfig(name="csv", train_path=str(path), text_column="Text", label_column="Intent"))
    assert (got.texts, got.labels) == ([t for t, _ in ROWS], [lab for _, lab in ROWS])


def test_a_tab_separated_txt_with_a_lone_quote_and_no_header(tmp_path: Path) -> None:
    path = tmp_path / "intents.txt"
    path.write_text('card\tmy "card\ncash\tthe atm; kept it\n', encoding="utf-8")
    got = read_examples(path, DataConfig(name="csv", train_path=str(path), text_column="1", label_column="0",
                                         header=False))
    assert (got.texts, got.labels) == (['my "card', "the atm; kept it"], ["card", "cash"])


def test_an_explicit_format_or_delimiter_is_not_second_guessed(tmp_path: Path) -> None:
    path = tmp_path / "semi.csv"
    path.write_text("text;label\nhello;a\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="no text column 'text'"):  # format=csv means commas
        read_examples(path, DataConfig(name="csv", train_path=str(path), label_column="label", format="csv"))
    got = read_examples(path, DataConfig(name="csv", train_path=str(path), label_column="label", delimiter=";"))
    assert (got.texts, got.labels) == (["hello"], ["a"])


def test_the_delimiter_is_found_on_records_not_on_line_separators(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"  # U+2028 inside a text: str.splitlines would cut the record in two
    path.write_text("text;label\nline\u2028break;a\nplain;b\n", encoding="utf-8")
    got = read_examples(path, DataConfig(name="csv", train_path=str(path), label_column="label"))
    assert (got.texts, got.labels) == (["line\u2028break", "plain"], ["a", "b"])
