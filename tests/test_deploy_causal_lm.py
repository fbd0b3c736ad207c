"""Deployment with task=causal_lm, without a network: the run config `veil server` resolves (no label set, nodes'
data node-local), what a deployed node reads from its own file with its own column names (prompt = --text-column,
completion = --label-column; a text-only file), and the node's start-up check of such files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from veil.client.settings import node_settings
from veil.preflight import preflight
from veil.conf.runconfig import from_run_config, to_run_config
from veil.server.deploy import NODE_LOCAL, resolve_config
from veil.task.causal_lm import IGNORE
from veil.task.model import load_tokenizer
from veil.task.shards import client_shard, node_labels

EVAL = [{"prompt": "my card is lost", "completion": "lost card"}, {"prompt": "the atm kept my cash", "completion": "cash"}]
NODE = [("where is my new card", "card arrival"), ("i was charged twice", "double charge"), ("pin blocked", "pin")]


def _server_cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    test = tmp_path / "eval.csv"
    test.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in EVAL), encoding="utf-8")
    # what `veil server` composes: a coordinator without training data reads its evaluation file for the checks
    cfg = preflight(["task=causal_lm", "model=tiny_llama", "data=csv", f"data.test_path={test}",
                     "data.train_path=${data.test_path}", "data.prompt_prefix=Intent? ", *extra])
    return resolve_config(cfg, tmp_path / "run")


def _node_cfg(resolved):  # type: ignore[no-untyped-def]
    """The run config as a node receives it (flat run config, read back)."""
    return from_run_config(json.loads(json.dumps(to_run_config(resolved))))


def test_server_resolves_a_causal_lm_run_config(tmp_path: Path) -> None:
    resolved = _server_cfg(tmp_path)
    assert resolved.data.labels == "[]" and resolved.data.train_path == NODE_LOCAL
    assert resolved.data.test_path == str((tmp_path / "eval.csv").resolve())
    assert resolved.output_dir == str(tmp_path / "run")
    node = _node_cfg(resolved)
    assert node.task.name == "causal_lm" and node.data.labels == "[]"


def _settings(tmp_path: Path, data: Path, **columns: str):  # type: ignore[no-untyped-def]
    return node_settings({"data-path": str(data), "no-budget": True, "ledger-path": str(tmp_path / "ledger.json"),
                          **columns})


def test_a_deployed_node_reads_its_own_columns_as_prompt_and_completion(tmp_path: Path) -> None:
    node_file = tmp_path / "bank.csv"
    node_file.write_text("query,intent\n" + "".join(f"{q},{i}\n" for q, i in NODE), encoding="utf-8")
    node = _node_cfg(_server_cfg(tmp_path))
    settings = _settings(tmp_path, node_file, **{"text-column": "query", "label-column": "intent"})
    assert node_labels(node, settings) == []
    shard = client_shard(node, settings)
    tok = load_tokenizer(node.model)
    assert shard["input_ids"].shape[0] == len(NODE)
    for row, (query, intent) in enumerate(NODE):
        counted = shard["labels"][row][shard["labels"][row] != IGNORE].tolist()
        assert tok.decode(counted, skip_special_tokens=True) == intent  # the completion, and only it, is learned
        prompt = shard["input_ids"][row][shard["labels"][row] == IGNORE][shard["attention_mask"][row][
            shard["labels"][row] == IGNORE] == 1].tolist()
        assert f"intent? {query}" in tok.decode(prompt, skip_special_tokens=True)  # the run's prefix, the node's text


def test_a_deployed_node_with_a_text_only_file_learns_every_token(tmp_path: Path) -> None:
    node_file = tmp_path / "notes.jsonl"
    node_file.write_text("".join(json.dumps({"body": q}) + "\n" for q, _ in NODE), encoding="utf-8")
    node = _node_cfg(_server_cfg(tmp_path, "data.format=csv"))  # the operator's format is not the node's (JSONL)
    shard = client_shard(node, _settings(tmp_path, node_file, **{"text-column": "body", "label-column": ""}))
    tok = load_tokenizer(node.model)
    for row, (query, _) in enumerate(NODE):
        counted = shard["labels"][row][shard["labels"][row] != IGNORE].tolist()
        assert tok.decode(counted, skip_special_tokens=True) == query


def _client_args(tmp_path: Path, data: Path, *flags: str) -> argparse.Namespace:
    from veil.client.node import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(["--superlink", "127.0.0.1:1", "--data", str(data), "--no-budget", "--insecure",
                              "--ledger", str(tmp_path / "ledger.json"), *flags])


def test_node_start_up_check_accepts_causal_lm_files(tmp_path: Path) -> None:
    from veil.client.node import preflight as node_preflight

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "completion": i}) + "\n" for q, i in NODE), encoding="utf-8")
    args = _client_args(tmp_path, pairs, "--text-column", "prompt", "--label-column", "completion")
    node_preflight(args)
    assert args.owner_delta == pytest.approx(min(1e-5, 1 / (10 * len(NODE))))
    text_only = tmp_path / "text.jsonl"
    text_only.write_text("".join(json.dumps({"text": q}) + "\n" for q, _ in NODE), encoding="utf-8")
    node_preflight(_client_args(tmp_path, text_only, "--label-column", ""))  # text only: said explicitly
    from veil.errors import ConfigError, DataFileError

    with pytest.raises(DataFileError, match="no label column 'label'"):  # a forgotten --label-column: still refused
        node_preflight(_client_args(tmp_path, text_only))
    with pytest.raises(DataFileError, match="text"):
        node_preflight(_client_args(tmp_path, pairs))
    with pytest.raises(ConfigError, match="no text column 'text'"):
        node_preflight(_client_args(tmp_path, pairs, "--label-column", ""))
