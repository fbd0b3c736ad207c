"""Every `veil ...` command in README.md, docs/*.md and examples/*/README.md parses as written: the sub-command and
each flag exist, and the Hydra overrides of `simulate` / `server` compose and validate against the schema. The
cheap ones run for real: `veil certs` (into a temporary directory) and `veil simulate` up to its checks."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from veil.cli import _COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_ASSIGN = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


def documented_commands() -> list[tuple[str, list[str], str]]:
    """(where, argv after `veil`, the `veil: error: ...` line shown right below it or "") of every command line in a
    fenced code block; backslash continuations joined, comments, `&` and variables of the same block resolved."""
    found: list[tuple[str, list[str], str]] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in _FENCE.findall(text):
            lines = block.replace("\\\n", " ").splitlines()
            env: dict[str, str] = {"i": "1"}
            for n, line in enumerate(lines):
                line = line.strip()
                assign = _ASSIGN.match(line)
                if assign:
                    env[assign.group(1)] = " ".join(shlex.split(assign.group(2), comments=True))
                    continue
                if "veil" not in line:  # output shown in the block (may hold an apostrophe), not a command
                    continue
                words = shlex.split(line, comments=True)
                words = [w for w in words if w != "&"]
                for k, word in enumerate(words):  # `.venv/bin/veil simulate`, `for ...; do veil client ...`
                    if word.endswith("veil") and word in ("veil", ".venv/bin/veil") and k + 1 < len(words):
                        argv = _expand(words[k + 1:], env)
                        if argv and argv[0] in _COMMANDS:
                            line_no = text[: text.index(block)].count("\n") + 1
                            shown = lines[n + 1].strip() if n + 1 < len(lines) else ""
                            error = shown if shown.startswith("veil: error: ") else ""
                            found.append((f"{doc.relative_to(ROOT)}:{line_no}", argv, error))
                        break
    return found


def _expand(words: list[str], env: dict[str, str]) -> list[str]:
    out: list[str] = []
    for word in words:
        if word in (";", "done", "&&"):
            break
        if word.startswith("$") and word[1:] in env and " " in env[word[1:]]:
            out.extend(env[word[1:]].split())
            continue
        out.append(re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), "X"), word))
    return out


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_kind() -> None:
    kinds = {argv[0] for _where, argv, _error in COMMANDS}
    assert {"simulate", "certs", "server", "client", "report"} <= kinds, kinds


def _compose(overrides: list[str], *, server: bool) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from veil.conf import CONF_DIR
    from veil.preflight import _sweep_variants, follow_defaults, register_schema
    from veil.conf.runconfig import to_veil_config

    plain = [o for o in follow_defaults(overrides) if not o.startswith(("-", "hydra.", "hydra/"))]
    if server and not any(o.startswith("data.train_path=") for o in plain):
        plain.append("data.train_path=${data.test_path}")  # as `veil server` does
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            for variant in _sweep_variants(plain):
                to_veil_config(compose(config_name="config", overrides=variant))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(("where", "argv", "error"), COMMANDS, ids=[f"{w}:{a[0]}" for w, a, _e in COMMANDS])
def test_documented_command_parses(where: str, argv: list[str], error: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    name, rest = argv[0], argv[1:]
    if error:  # a documented failure: it fails exactly as shown (a cheap run, stopped by the checks)
        monkeypatch.chdir(tmp_path)
        extra = [f"hydra.run.dir={tmp_path / 'run'}"] if name == "simulate" else []
        assert main([*argv, *extra]) != 0
        assert capsys.readouterr().err.strip() == error, where
        return
    module = importlib.import_module(_COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"veil {name}", exit_on_error=False)
    module.configure_parser(parser)
    try:
        args = parser.parse_args(rest)
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"{where}: `veil {' '.join(argv)}` does not parse: {err}")
    if name in ("simulate", "server"):
        _compose(list(args.overrides), server=name == "server")


def test_documented_certs_commands_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = [argv for _where, argv, error in COMMANDS if argv[0] == "certs" and "--out" in argv and not error]
    assert certs
    for k, argv in enumerate(certs):
        argv = list(argv)
        argv[argv.index("--out") + 1] = str(tmp_path / f"certs-{k}")
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        assert (tmp_path / f"certs-{k}" / "ca.crt").is_file()


def test_the_server_names_flag_the_docs_use_gives_every_name(tmp_path: Path) -> None:
    from cryptography import x509

    assert main(["certs", "--out", str(tmp_path), "--nodes", "1", "--server-names", "coord.example.org,10.0.0.5"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
