"""The Flower wing (veil/flower/) against the installed Flower: every name it reaches for is there with the shape it
expects, every guard refuses an untested release in one line before it patches anything, and no veil module outside
the wing imports a private Flower module.

Against the newest Flower wheel: the rows of the wing's ``REACHES`` tables are checked against whatever ``flwr`` this
interpreter imports, so install the candidate release where it shadows the pinned one and run this file alone::

    python -m pip install --no-deps --target /tmp/flwr-next "flwr==1.42.0"   # or the newest the registry offers
    PYTHONPATH=/tmp/flwr-next:$PWD python -m pytest -q tests/test_flower_wing.py

``test_every_name_the_wing_reaches_for_fits_the_installed_flower`` then names each row the new release breaks, and
``test_the_installed_flower_is_a_tested_release`` fails until the release is added to ``veil.flower.TESTED`` (do that
only once the rows fit and the wing's own tests pass: tests/test_polling.py, test_engine_sweep.py,
test_node_sessions.py, test_secagg_malicious.py, test_secagg_guard.py, test_deploy.py). docs/upstream/README.md has
the same lines; ``make check-flower-newest`` runs this file and the fast ones of those against ``FLWR_NEWEST``.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from veil import flower
from veil.flower import PUBLIC, TESTED, FlowerVersionError, Reach, problem

ROOT = Path(__file__).resolve().parents[1]
WING = ROOT / "veil" / "flower"
WING_MODULES = sorted(f"veil.flower.{p.stem}" for p in WING.glob("*.py") if p.stem != "__init__")


def _rows() -> list[tuple[str, Reach]]:
    return [(name, row) for name in WING_MODULES for row in importlib.import_module(name).REACHES]


def test_every_wing_module_has_a_table() -> None:
    assert WING_MODULES and all(importlib.import_module(name).REACHES for name in WING_MODULES)


@pytest.mark.parametrize("owner, row", _rows(), ids=lambda v: v if isinstance(v, str) else f"{v.module}:{v.attribute}")
def test_every_name_the_wing_reaches_for_fits_the_installed_flower(owner: str, row: Reach) -> None:
    assert problem(row) is None, f"{owner}: {problem(row)}"


def test_the_installed_flower_is_a_tested_release() -> None:
    import flwr

    assert flwr.__version__ in TESTED, f"flwr {flwr.__version__} is not in veil.flower.TESTED {TESTED}"


def test_a_row_that_does_not_fit_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ModuleType("flwr_fake_internal")

    def pull(client: Any, message_ids: Any, *, timeout: float = 1.0) -> None: ...

    fake.pull = pull  # type: ignore[attr-defined]
    fake.Grid = type("Grid", (), {"send": lambda self, messages: None})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert problem(Reach(fake.__name__, "pull", ("client", "message_ids"), keywords=("timeout",))) is None
    assert problem(Reach(fake.__name__, "Grid.send", ("self", "messages"))) is None
    assert problem(Reach("flwr.no_such_module", "x")) == "module flwr.no_such_module is gone"
    assert problem(Reach(fake.__name__, "gone")) == "flwr_fake_internal.gone is gone"
    assert problem(Reach(fake.__name__, "Grid.receive")) == "flwr_fake_internal.Grid.receive is gone"
    assert problem(Reach(fake.__name__, "pull", ("client", "reply_to_message_ids"))) == (
        "flwr_fake_internal.pull takes (client, message_ids, timeout), not (client, reply_to_message_ids, ...)")
    assert problem(Reach(fake.__name__, "pull", keywords=("max_time",))) == "flwr_fake_internal.pull takes no max_time"


class _Grid:
    def push_messages(self, messages: Any) -> list[str]:
        raise AssertionError("a refused guard must not reach the grid")


def _guards(tmp_path: Path) -> dict[str, Any]:
    """Each guard of the wing, called as veil calls it."""
    from veil.client import executor
    from veil.flower import patches, polling, runtime, secagg, sessions, task_claims, workflows

    return {
        "SuperNode poll patch": lambda: patches.cap_supernode_sleeps(0.25),
        "object-pull patch": patches.shorten_object_pull_backoff,
        "node-sweep patch": patches.sweep_only_addressed_nodes,
        "SecAgg+ mask patch": secagg.full_strength_masks,
        "heartbeat patch": sessions.short_node_heartbeat,
        "activation patch": sessions.patient_activation,
        "resume patch": lambda: sessions.forget_online_nodes(tmp_path / "superlink.db"),
        "reply pull patch": lambda: sessions.bound_reply_pulls(5.0),
        "stale receive patch": sessions.clean_stale_receive,
        "task claim patch": task_claims.patient_task_claims,
        "reply polling grid": lambda: polling.PollingGrid(_Grid()),  # type: ignore[arg-type]
        "round loop": lambda: workflows.RoundLoop(lambda g, c: None, SimpleNamespace())(_Grid(), None),  # type: ignore[arg-type]
        "SecAgg+ drop-out workflow": lambda: workflows.DropoutTolerantSecAggPlus(3, 2, relay=lambda g: g)(_Grid(), None),
        "node executor": lambda: runtime.runtime_client("127.0.0.1:9", None),
        "executor": lambda: executor.serve("127.0.0.1:9", expected_hash="0" * 64),
    }


_PATCHED = {  # module -> names a guard would rebind
    "flwr.supernode.start_client_internal": ("time", "pull_objects", "_pull_and_store_message"),
    "flwr.supercore.inflatable.inflatable_utils": ("pull_objects",),
    "flwr.superlink.grid.http_grid": ("pull_objects",),
    "flwr.server.superlink.fleet.vce.vce_api": ("add_messages_to_queue",),
    "flwr.common.secure_aggregation.secaggplus_utils": ("pseudo_rand_gen",),
    "flwr.supernode.fleet_http_connection": ("HEARTBEAT_DEFAULT_INTERVAL", "FleetHttpClient"),
    "flwr.supercore.heartbeat": ("HEARTBEAT_DEFAULT_INTERVAL",),
}


def test_every_guard_refuses_an_untested_flower_in_one_line_and_patches_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr

    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    before = {(m, n): getattr(importlib.import_module(m), n) for m, names in _PATCHED.items() for n in names}
    claim = SqlCoreState.claim_task
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    for what, guard in _guards(tmp_path).items():
        with pytest.raises(FlowerVersionError) as refused:
            guard()
        line = str(refused.value)
        assert "\n" not in line and line.startswith("flwr 9.9.9: veil's ") and "9.9.9" in line, what
        assert f"tested on flwr {', '.join(TESTED)} only" in line, what
    after = {(m, n): getattr(importlib.import_module(m), n) for m, names in _PATCHED.items() for n in names}
    assert after == before and SqlCoreState.claim_task is claim, "a refused guard changed Flower"
    assert not (tmp_path / "superlink.db").exists()


def test_the_patched_supernode_superlink_and_the_executor_end_in_one_line_on_an_untested_flower(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import flwr

    from veil.client import executor
    from veil.flower import patches, task_claims

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # patches.main rewrites argv only once the patches are in
    with pytest.raises(SystemExit) as ended:
        patches.main(["--poll-interval", "0.25", "--", "--superlink", "127.0.0.1:9"])
    assert ended.value.code == 2
    with pytest.raises(SystemExit) as ended:  # the patched SuperLink of veil server
        task_claims.main(["--", "--host", "127.0.0.1", "--port", "9"])
    assert ended.value.code == 2
    assert executor.main(["--runtime-api-address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("veil: error: flwr 9.9.9: veil's ") for line in err), err


def _flower_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None for a whole-module import, line) of every Flower import in a file."""
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "flwr"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "flwr":
            out += [(node.module or "", a.name, node.lineno) for a in node.names]
    return out


def test_no_veil_module_outside_the_wing_imports_a_private_flower_module() -> None:
    private = [f"{path.relative_to(ROOT)}:{line} imports {module}"
               for path in sorted((ROOT / "veil").rglob("*.py")) if WING not in path.parents
               for module, _name, line in _flower_imports(path) if module not in PUBLIC]
    assert private == [], "move these into veil/flower/ (a row of its REACHES table each):\n" + "\n".join(private)


def test_every_private_flower_import_of_the_wing_is_a_row_of_its_table() -> None:
    missing = []
    for name in ["veil.flower", *WING_MODULES]:
        module = importlib.import_module(name)
        rows = {(r.module, r.attribute.split(".")[0]) for r in getattr(module, "REACHES", ())}
        for imported, attr, line in _flower_imports(Path(module.__file__ or "")):
            if imported in PUBLIC:
                continue
            if (attr is None and imported not in {m for m, _ in rows}) or (attr and (imported, attr) not in rows):
                missing.append(f"{name}:{line} {imported}.{attr or '*'}")
    assert missing == []


def test_the_wing_imports_no_flower_at_import_time_where_a_node_starts() -> None:
    """The executor and the patched SuperNode set their quiet environment before Flower loads."""
    for name in ("veil.flower", "veil.flower.runtime", "veil.flower.patches", "veil.flower.sessions",
                 "veil.flower.task_claims"):
        tree = ast.parse(Path(importlib.import_module(name).__file__ or "").read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not [n for n in top if "flwr" in ast.unparse(n)], name
    assert flower.check_version("test") in TESTED
