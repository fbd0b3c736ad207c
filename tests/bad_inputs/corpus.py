"""The bad-input corpus: loading ``cases.yaml``, materialising each case's files and command line.

A case names a ``veil`` command line with placeholders, the substring of the one error line it must print (the
problem), a second substring (the fix), and the exit code. Positive controls (``accept``) name a file that must
parse. Placeholders:

``{files}``  the committed bad files (``tests/bad_inputs/files``)
``{tmp}``    the case's own empty working directory (also the current directory while it runs)
``{port}``   a TCP port nothing listens on (a node must fail before it dials)
``{gen:X}``  a file or directory generated into ``{tmp}/gen`` before the case runs (expired certificates, a
             fresh `veil certs` bundle, 100 kB lines): see :data:`GENERATORS`

Run ``python tests/bad_inputs/corpus.py`` to rewrite the table in ``docs/errors.md`` from the corpus.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import re
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
CASES_FILE = HERE / "cases.yaml"
ROOT = HERE.parents[1]
DOCS = ROOT / "docs" / "errors.md"
_GEN = re.compile(r"\{gen:([a-z0-9_]+)\}")


@dataclass(frozen=True)
class Case:
    """One entry of ``cases.yaml``."""

    id: str
    area: str  # config | data | credentials | certs | model
    what: str  # the bad input, in words (for docs/errors.md)
    argv: list[str] = field(default_factory=list)
    error: str = ""  # substring naming the problem
    fix: str = ""  # substring of the fix hint
    exit: int = 2
    xfail: str = ""  # reason, when a known bug in code this corpus may not change
    accept: dict[str, Any] | None = None  # positive control: read_examples(path, DataConfig(**data)) succeeds


def load_cases(path: Path = CASES_FILE) -> list[Case]:
    """All cases, checked for unique ids and the fields each kind needs."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cases = [Case(**entry) for entry in raw]
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate case ids {duplicates}")
    for case in cases:
        if case.accept is None and not (case.argv and case.error and case.fix and case.exit != 0):
            raise ValueError(f"{path}: case {case.id} needs argv, error, fix and a non-zero exit")
    return cases


def unused_port() -> int:
    """A port nothing listens on right now (bound once by the kernel, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fill(obj: Any, tmp: Path) -> Any:
    """``obj`` with placeholders filled in; each ``{gen:X}`` it names is generated first."""
    text = json.dumps(obj)
    for name in sorted(set(_GEN.findall(text))):
        GENERATORS[name](tmp / "gen" / name)
    text = _GEN.sub(lambda m: str(tmp / "gen" / m.group(1)), text)
    text = text.replace("{files}", str(FILES)).replace("{tmp}", str(tmp)).replace("{port}", str(unused_port()))
    return json.loads(text)


def materialise(case: Case, tmp: Path) -> list[str]:
    """Generate the files the case names and return its argv, placeholders filled in."""
    argv = [str(arg) for arg in _fill(case.argv, tmp)]
    if argv and argv[0] == "simulate":
        argv.append(f"hydra.run.dir={tmp / 'run'}")  # must not exist afterwards
    return argv


def filled_accept(case: Case, tmp: Path) -> dict[str, Any]:
    """The ``accept`` block of a positive control, placeholders filled in."""
    filled: dict[str, Any] = _fill(case.accept, tmp)
    return filled


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under ``roots`` with a digest of its content: equal snapshots, nothing written."""
    seen: dict[str, str] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path)] = digest
    return seen


# ---- generated inputs ---------------------------------------------------------------------------------------------


def _bundle(out: Path) -> None:
    """A fresh, valid `veil certs` bundle (CA, server certificate, one node key pair)."""
    from veil.security import certs

    certs.write_files(out, certs.build_files(server_names="localhost,127.0.0.1", nodes=1, days=30), force=False)


def _old_certificate(out: Path) -> None:
    """``out/ca.crt``: a CA certificate that expired on 2021-01-01; ``out/server.pem``+``server.key``: a server
    certificate signed by it, expired too; ``out/fresh/``: a valid bundle whose server.pem is expired."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def build(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: Any,
              ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
                .not_valid_after(datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signer, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    out.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = build("expired CA", ca_key, None, ca_key, True)
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    _bundle(out / "fresh")
    fresh_ca = x509.load_pem_x509_certificate((out / "fresh" / "ca.crt").read_bytes())
    fresh_ca_key = serialization.load_pem_private_key((out / "fresh" / "ca.key").read_bytes(), password=None)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = build("veil SuperLink", server_key, fresh_ca.subject, fresh_ca_key, False)
    (out / "fresh" / "server.pem").write_bytes(server.public_bytes(pem))
    key_pem = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (out / "fresh" / "server.key").write_bytes(key_pem)
    (out / "fresh" / "server.key").chmod(0o600)


def _ed25519_key(out: Path) -> None:
    """``out``: an OpenSSH private key on ed25519 (a format Flower's node authentication rejects)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
    out.chmod(0o600)


def _long_csv_line(out: Path) -> None:
    """``out``: 100 kB of CSV on one line without a newline (a file whose line breaks were lost)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ",".join(f"my card was lost {i},card" for i in range(4000))
    out.write_text(("text,label," + fields)[:100_000], encoding="utf-8")


def _long_jsonl_line(out: Path) -> None:
    """``out``: a 100 kB JSON array on one line, saved as .jsonl (JSON where JSON Lines is needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"my card was lost {i:05d}", "label": "card"} for i in range(2100)]  # 100 kB
    out.write_text(json.dumps(rows), encoding="utf-8")


# ---- model directories a task cannot train (issue 26): tiny configs and word-level tokenizers built in code ----
_WORDS = ["[UNK]", "</s>", "[PAD]", "my", "card", "was", "lost", "why", "a", "fee", "again", "card_lost", "fee_charged"]


def _model_dir(out: Path, *, family: str = "gpt2", words: list[str] | None = None, vocab: int | None = None,
               tokenizer: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> None:
    """``out``: a 2-layer random ``family`` model and a word-level tokenizer over ``words`` (no download).
    ``tokenizer``: its special tokens (a token not among ``words`` is added past them); ``vocab``: the model's
    vocab_size (default: the words); ``config``: more config.json values (e.g. eos_token_id=None)."""
    import logging as _logging

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    from transformers import PreTrainedTokenizerFast

    words = words or _WORDS
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **{"unk_token": "[UNK]", **(tokenizer or {})}).save_pretrained(out)
    torch.manual_seed(0)
    size = vocab or len(words)
    _logging.getLogger("transformers").setLevel(_logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the generator's own output must not count as the command's
    if family == "bert":
        model: Any = BertForSequenceClassification(BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=64,
                                                              **(config or {})))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=size, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                           **{"bos_token_id": None, "eos_token_id": None, **(config or {})}))
    model.save_pretrained(out)


def _lm_data(out: Path) -> None:
    """``out/train.jsonl`` and ``out/test.jsonl``: prompt/completion rows over :data:`_WORDS`."""
    out.mkdir(parents=True)
    rows = [{"prompt": "my card was lost", "completion": "card_lost"}, {"prompt": "why a fee", "completion": "fee_charged"}]
    for name in ("train.jsonl", "test.jsonl"):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")


def _rows_10001(out: Path) -> None:
    """``out`` as a CSV of 10,001 rows: one more than the default δ 1e-5 is below 1/(10·N) for."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("text,label\n" + "".join(f"my card was lost {i},card\n" for i in range(10_001)), encoding="utf-8")


GENERATORS: dict[str, Callable[[Path], None]] = {
    "lm_data": _lm_data,
    "rows_10001_csv": _rows_10001,
    # no end-of-sequence token anywhere (config eos_token_id null, tokenizer without eos_token)
    "lm_no_eos": lambda out: _model_dir(out),
    # the tokenizer's eos_token is not in its vocabulary: added with id 13, past the model's 13 embeddings
    "lm_eos_outside_vocab": lambda out: _model_dir(out, words=[w for w in _WORDS if w != "</s>"] + ["spare"],
                                                   tokenizer={"eos_token": "</s>", "pad_token": "[PAD]"}),
    # config.json names an end token (id 1), the tokenizer does not
    "lm_eos_only_in_config": lambda out: _model_dir(out, config={"eos_token_id": 1}),
    # config.json keeps GPT-2's eos_token_id 50256 with a vocabulary of 13
    "lm_config_eos_outside_vocab": lambda out: _model_dir(out, tokenizer={"eos_token": "</s>"},
                                                          config={"eos_token_id": 50256}),
    # the tokenizer has more tokens (13) than the model's vocabulary (10)
    "lm_tokenizer_bigger_than_vocab": lambda out: _model_dir(out, vocab=10, tokenizer={"eos_token": "</s>"}),
    # a classifier whose tokenizer has no pad token and no end token to pad with
    "bert_no_pad": lambda out: _model_dir(out, family="bert", config={"pad_token_id": None}),

    "creds": _bundle,
    "other_creds": _bundle,
    "old": _old_certificate,
    "ed25519_key": _ed25519_key,
    "long_line_csv": _long_csv_line,
    "long_line_jsonl": _long_jsonl_line,
}


# ---- docs/errors.md -----------------------------------------------------------------------------------------------


def run_in_process(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``veil`` in this process in ``cwd``; returns the exit status and what went to stderr."""
    import os

    from veil.cli import main

    err, out, old = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        os.chdir(old)
    return code, err.getvalue()


def _shown(text: str, tmp: Path) -> str:
    text = text.replace(str(FILES), "files").replace(str(tmp), "TMP")
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text).replace("|", "\\|")


def render_docs(cases: list[Case]) -> str:
    """The "Bad inputs" section: each case, what the user typed, and the line they see."""
    lines = [
        "## Bad inputs",
        "",
        "Generated from `tests/bad_inputs/cases.yaml` by `python tests/bad_inputs/corpus.py`; checked by",
        "`tests/test_bad_inputs.py`. Every failure is one line on stderr, a non-zero exit (2), no traceback, and",
        "nothing written. `files/` is `tests/bad_inputs/files/`, `TMP` the directory the command ran in.",
        "",
        "| case | bad input | what the user sees |",
        "|---|---|---|",
    ]
    for case in cases:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            if case.accept is not None:
                shown = "accepted (positive control)"
            else:
                _code, err = run_in_process(materialise(case, tmp), tmp)
                shown = "<br>".join(f"`` {_shown(line, tmp)} ``" for line in err.strip().splitlines())
                if case.xfail:
                    shown += f" — **known bug**: {case.xfail}"
        lines.append(f"| `{case.id}` | {case.what} | {shown} |")
    return "\n".join(lines) + "\n"


def write_docs(path: Path = DOCS) -> None:
    """Replace the "Bad inputs" section of ``path`` (or create the file) with the generated table."""
    section = render_docs(load_cases())
    text = path.read_text(encoding="utf-8") if path.exists() else "# Errors a user can see\n\n"
    start = text.find("## Bad inputs")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    write_docs(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS)
