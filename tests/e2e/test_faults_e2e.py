"""What survives what (docs/deployment.md): one loopback deployment of five nodes (TLS, node auth, DP-SGD, SecAgg+
with 3 shares and threshold 2; nodes allow one missing neighbour, ``--max-dropouts 1``) meets the faults a data
owner's machine meets, one after the other, and the tests assert on what each left behind.

A: node 5's process group gets SIGKILL when SecAgg+ asks it to share keys.  B: node 4's ``veil client`` alone
   gets SIGKILL (as from an OOM killer) once the round is booked in its ledger, while it trains; in the same round
   node 2's disk is full (its executor cannot write a byte) until it has declined.  C: node 3's process group gets
   SIGKILL at the unmask stage.  D: nodes 1, 2 and 3 get SIGKILL while node 1 trains: too few survivors.
Node 4 reaches the SuperLink through a slow link (a TCP proxy adding 50 ms to every chunk, benchmarks/lossy_link.py).
E: its link resets every connection every 0.25 s for 4 s while it trains.  F: its link stalls (holds every byte)
   from the moment SecAgg+ asks it to share keys until that round has ended.
G: ``veil server`` gets SIGKILL at the unmask stage; node 2's machine reboots meanwhile (SIGKILL, started again
   while no SuperLink listens); the operator runs ``veil server --resume`` with the same flags.
Each killed node is started again at once with the same flags; the next fault waits until it has trained again.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from benchmarks.loopback import Loopback, alive, cmdline, wait_for

ROUNDS = 14
KILLS = {"A": (5, "share_keys", True), "B": (4, "collect_masked_vectors", False), "C": (3, "unmask", True)}
DISK_NODE = 2
BELOW = (1, 2, 3)  # three of five: in SecAgg+'s ring of 3-node neighbourhoods two of them are neighbours
LINK_NODE, LINK_DELAY = 4, 0.05  # the node behind the lossy link, and the seconds it adds to every chunk
REBOOT_NODE = 2  # killed and started again while the coordinator is down (G)
OVERRIDES = [f"federation.rounds={ROUNDS}", "privacy.noise_multiplier=0.8", "privacy.target_epsilon=0",
             "secagg.timeout=20"]


@dataclass
class Faults:
    lb: Loopback
    status: int | None = None
    at: dict[str, int] = field(default_factory=dict)  # fault -> the round in flight when it struck
    orphans: dict[int, list[int]] = field(default_factory=dict)  # killed node -> its processes alive 15 s later
    restarted_at: dict[str, tuple[int, int]] = field(default_factory=dict)  # fault -> (node, log size at restart)
    disk_log: str = ""
    link: dict[str, int] = field(default_factory=dict)  # the lossy link's counters, and node 4's log size after F
    server_orphans: list[str] = field(default_factory=list)  # the killed coordinator's processes once resumed
    resumed_log: str = ""  # the resumed run's ServerApp log once node 2 has trained in it
    last_checkpoint: int = 0  # the last round checkpointed when the coordinator died


def _booked(lb: Loopback, n: int, rnd: int) -> bool:
    try:
        events = json.loads(lb.ledger_path(n).read_text())["events"]
    except (OSError, ValueError, KeyError):
        return False
    return any(e["round"] == rnd for e in events)


def _kill(out: Faults, n: int, *, group: bool) -> None:
    tree = out.lb.kill_node(n, group=group)
    deadline = time.monotonic() + 15
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    out.orphans[n] = out.orphans.get(n, []) + alive(tree)
    for pid in alive(tree):  # the test's own processes: never left running, whatever the verdict
        os.kill(pid, signal.SIGKILL)


def _restart_and_rejoin(out: Faults, fault: str, nodes: tuple[int, ...], rejoin: bool = True) -> None:
    lb = out.lb
    for n in nodes:
        out.restarted_at[f"{fault}{n}"] = (n, lb.log_size(n))
        lb.start_node(n)
    if rejoin:
        for n in nodes:
            wait_for(lambda n=n: ": trained on " in lb.log_text(n, out.restarted_at[f"{fault}{n}"][1]), 240,
                     f"node {n} to train again after fault {fault}")


def _lossy_link(out: Faults) -> None:
    """E and F: node 4's link resets its connections while it trains, then stalls while it shares keys."""
    lb, link = out.lb, out.lb.links[LINK_NODE]
    lb.wait_stage(LINK_NODE, "collect_masked_vectors", lb.log_size(LINK_NODE))
    out.at["E"] = lb.rounds_done() + 1
    out.link["connections_before_E"] = link.stats["connections"]
    out.link["reset_in_E"] = link.flap(4.0)
    lb.wait_round(out.at["E"])
    out.link["connections_after_E"] = link.stats["connections"]
    lb.wait_stage(LINK_NODE, "share_keys", lb.log_size(LINK_NODE))
    out.at["F"] = lb.rounds_done() + 1
    link.stall()
    try:
        lb.wait_round(out.at["F"], timeout=180)  # the stage timeout, not the link, ends the round
    finally:
        link.flow()
    out.link["log_after_F"] = lb.log_size(LINK_NODE)
    wait_for(lambda: ": trained on " in lb.log_text(LINK_NODE, out.link["log_after_F"]), 240,
             "node 4 to train again after its link stalled")


def _coordinator_kill_and_resume(out: Faults) -> None:
    """G: ``veil server`` killed at unmask, node 2 rebooted meanwhile, then ``veil server --resume``."""
    lb = out.lb
    lb.wait_stage(5, "unmask", lb.log_size(5))
    out.at["G"] = lb.rounds_done() + 1
    assert out.at["G"] < ROUNDS, f"the faults ran late: the coordinator kill would land after round {ROUNDS}"
    tree = lb.kill_server()
    _kill(out, REBOOT_NODE, group=True)
    _restart_and_rejoin(out, "G", (REBOOT_NODE,), rejoin=False)
    from veil.server.checkpoint import latest_checkpoint

    last = latest_checkpoint(lb.run_dir)  # the project's reader: what --resume will continue from
    assert last is not None
    out.last_checkpoint = last.round
    lb.start_server(OVERRIDES, resume=True)
    out.server_orphans = [f"{pid}: {cmdline(pid)[:200]}" for pid in alive(tree)]
    wait_for(lambda: ": trained on " in lb.log_text(REBOOT_NODE, out.restarted_at[f"G{REBOOT_NODE}"][1]), 300,
             "node 2 to train again after the coordinator's resume")
    out.resumed_log = lb.serverapp_log()


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    lb = Loopback(tmp_path_factory.mktemp("faults"), 5, node_flags=["--max-dropouts", "1"],
                  links={LINK_NODE: LINK_DELAY})
    out = Faults(lb)
    try:
        lb.start_server(OVERRIDES)
        for n in range(1, 6):
            lb.start_node(n)
        lb.wait_round(1, timeout=300)
        for fault, (n, stage, group) in KILLS.items():
            since, disk_since = lb.log_size(n), lb.log_size(DISK_NODE)
            if fault == "B":  # the same round: node 2 finds its disk full when it books
                lb.wait_stage(DISK_NODE, "setup", disk_since)
                lb.fill_disk(DISK_NODE, True)
            lb.wait_stage(n, stage, since)
            rnd = out.at[fault] = lb.rounds_done() + 1
            if stage == "collect_masked_vectors":
                wait_for(lambda n=n, rnd=rnd: _booked(lb, n, rnd), 60, f"node {n} to book round {rnd}", poll=0.02)
            _kill(out, n, group=group)
            if fault == "B":
                wait_for(lambda: "refusing to train" in lb.log_text(DISK_NODE, disk_since), 120, "node 2 to decline")
                lb.fill_disk(DISK_NODE, False)
                out.disk_log = lb.log_text(DISK_NODE, disk_since)
            _restart_and_rejoin(out, fault, (n,))
        lb.wait_stage(BELOW[0], "collect_masked_vectors", lb.log_size(BELOW[0]))
        out.at["D"] = lb.rounds_done() + 1
        for n in BELOW:
            _kill(out, n, group=True)
        _restart_and_rejoin(out, "D", BELOW)
        _lossy_link(out)
        _coordinator_kill_and_resume(out)
        assert lb.server is not None
        wait_for(lambda: lb.server.poll() is not None, 400, "the run to finish")
        lb.server.wait_output()
        out.status = lb.server.poll()
        yield out
    finally:
        lb.close()


def _rows(lb: Loopback) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(ln) for ln in (lb.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _round_log(lb: Loopback, rnd: int) -> str:
    """The ServerApp's lines of round ``rnd``: what a failed round's assertion shows."""
    text = lb.serverapp_log(0)  # the rounds before the coordinator's kill ran in the first run
    start = text.find(f"[ROUND {rnd}]")
    return text[start:start + 4000] if start >= 0 else text[-4000:]


@pytest.mark.slow
def test_every_round_runs_once_and_a_killed_node_costs_at_most_its_own_update(faults: Faults) -> None:
    assert faults.status == 0, faults.lb.server_out[-20:]
    rows = {r["round"]: r for r in _rows(faults.lb)}
    assert sorted(rows) == list(range(1, ROUNDS + 1)), "each round exactly once"
    at = faults.at
    assert rows[at["A"]]["completed"] and rows[at["A"]]["clients"] == 4, rows[at["A"]]  # killed before sharing keys
    # B: killed before sending its update, and node 2 declined (4 answers, one of them a refusal)
    assert rows[at["B"]]["completed"] and rows[at["B"]]["clients"] == 4 and rows[at["B"]]["refused"] == 1, rows[at["B"]]
    # C: killed at unmask, its masked update had arrived; the survivors' shares unmask the sum
    assert rows[at["C"]]["completed"] and rows[at["C"]]["clients"] == 5, rows[at["C"]]
    assert not rows[at["D"]]["completed"], rows[at["D"]]  # below the threshold: recorded, nothing applied
    failed = {k: (r["clients"], r["refused"]) for k, r in rows.items() if k < at["D"] and not r["completed"]}
    assert not failed, (failed, at, _round_log(faults.lb, min(failed, default=0)))
    # the rounds after it run; one may fail again while the three restarted nodes still load
    assert rows[ROUNDS]["completed"] and rows[ROUNDS]["clients"] == 5, rows[ROUNDS]
    assert all(r["clients"] <= 5 for r in rows.values()), "no reply counted twice"


@pytest.mark.slow
def test_a_killed_node_leaves_no_process_behind(faults: Faults) -> None:
    assert faults.orphans and not any(faults.orphans.values()), f"processes outlived their veil client: {faults.orphans}"


@pytest.mark.slow
def test_a_restarted_node_rejoins_and_trains_in_a_later_round(faults: Faults) -> None:
    for key, (n, since) in faults.restarted_at.items():
        after = faults.lb.log_text(n, since)
        trained = [int(ln.split("round ", 1)[1].split(":")[0]) for ln in after.splitlines() if ": trained on " in ln]
        # G: a resumed run trains the round in flight at the coordinator's kill again
        first = faults.at[key[0]] + (0 if key[0] == "G" else 1)
        assert trained and min(trained) >= first, (key, trained, after[-1500:])
    for log in faults.lb.logs.glob("node-*-1.log"):
        assert "veil: error" not in log.read_text(), log.read_text()[-1500:]


@pytest.mark.slow
def test_the_killed_round_stays_booked_and_nothing_is_half_written(faults: Faults) -> None:
    from veil.privacy.ledger import PrivacyLedger
    from veil.server.checkpoint import read_checkpoint, weights_sha256

    lb, at = faults.lb, faults.at
    ledgers = {n: PrivacyLedger.open(lb.ledger_path(n), create=False) for n in range(1, 6)}  # the project's reader
    for n, ledger in ledgers.items():
        assert not [p.name for p in lb.ledger_path(n).parent.iterdir() if p.name.endswith(".tmp")]
        booked = [(e.run_id, e.round) for e in ledger.events]  # a resumed run is a new Flower run
        assert len(booked) == len(set(booked)), f"node {n} booked a round of a run twice: {booked}"
    assert at["B"] in [e.round for e in ledgers[4].events], "killed while training: the round stays on its ledger"
    assert at["C"] in [e.round for e in ledgers[3].events]
    assert at["A"] not in [e.round for e in ledgers[5].events], "killed before training: nothing to book"
    checkpoints = sorted((lb.run_dir / "checkpoints").iterdir())
    assert all(p.suffix == ".npz" for p in checkpoints), [p.name for p in checkpoints]
    saved = {read_checkpoint(p).round: weights_sha256(read_checkpoint(p).arrays) for p in checkpoints}
    assert sorted(saved) == list(range(1, ROUNDS + 1)), sorted(saved)
    assert saved[at["D"]] == saved[at["D"] - 1], "a failed round applies nothing"
    assert saved[ROUNDS] != saved[at["D"]], "the rounds after it apply their sums"


@pytest.mark.slow
def test_a_full_disk_makes_the_node_refuse_with_one_line_then_recover(faults: Faults) -> None:
    from veil.privacy.ledger import PrivacyLedger

    lines = [ln for ln in faults.disk_log.splitlines() if "cannot write privacy ledger" in ln]
    assert len(lines) == 1 and ": refusing to train: cannot write privacy ledger" in lines[0], lines
    assert "check disk space and permissions" in lines[0] and "Traceback" not in faults.disk_log
    rnd = int(lines[0].split("round ", 1)[1].split(":")[0])
    assert rnd == faults.at["B"]
    rounds = [e.round for e in PrivacyLedger.open(faults.lb.ledger_path(DISK_NODE), create=False).events]
    assert rnd not in rounds, "declined unbooked"
    assert [r for r in rounds if rnd < r < faults.at["D"]], f"trained again once the disk had room: {rounds}"


def _trained(lb: Loopback, n: int, since: int = 0) -> list[int]:
    """Rounds node ``n`` reported trained (every process of it: its executor log is appended across restarts)."""
    return [int(ln.split("round ", 1)[1].split(":")[0]) for ln in lb.log_text(n, since).splitlines()
            if ": trained on " in ln]


@pytest.mark.slow
def test_a_lossy_link_costs_at_most_the_node_s_update_and_the_node_reconnects(faults: Faults) -> None:
    from veil.privacy.ledger import PrivacyLedger

    lb, at, link = faults.lb, faults.at, faults.link
    rows = {r["round"]: r for r in _rows(lb)}
    assert link["reset_in_E"] >= 1, f"the flapping link reset no connection: {link}"
    assert link["connections_after_E"] > link["connections_before_E"], f"node 4 never reconnected: {link}"
    # E: every reply either arrived or counted as a drop-out; the sum is applied once
    assert rows[at["E"]]["completed"] and 4 <= rows[at["E"]]["clients"] <= 5, rows[at["E"]]
    # F: stalled at share keys: the stage timeout ends the round without node 4, whatever its link holds
    assert rows[at["F"]]["completed"] and rows[at["F"]]["clients"] == 4, rows[at["F"]]
    assert min(_trained(lb, LINK_NODE, link["log_after_F"])) > at["F"], "node 4 trains again without a restart"
    assert sum(1 for p in lb.procs if p.name.startswith(f"node-{LINK_NODE}-")) == 2, "started once, restarted once (B)"
    events = PrivacyLedger.open(lb.ledger_path(LINK_NODE), create=False).events
    first_run = [e.round for e in events if e.run_id == events[0].run_id]
    assert first_run.count(at["E"]) == 1 and at["F"] not in first_run, first_run
    # every booking is a round it trained, but one: B killed it after booking, before it trained
    assert len(events) == len(_trained(lb, LINK_NODE)) + 1, (len(events), _trained(lb, LINK_NODE))


@pytest.mark.slow
def test_a_coordinator_killed_at_unmask_resumes_from_its_last_checkpoint(faults: Faults) -> None:
    from veil.privacy.ledger import PrivacyLedger
    from veil.server.checkpoint import checkpoint_files, read_checkpoint, weights_sha256

    lb, at, last = faults.lb, faults.at, faults.last_checkpoint
    assert faults.server_orphans == [], "nothing of the killed coordinator runs beside the resumed one"
    assert last in (at["G"] - 1, at["G"]), (last, at["G"])  # the round in flight, unless it ended before the kill
    resumed = faults.resumed_log
    saved = {read_checkpoint(p).round: read_checkpoint(p) for p in checkpoint_files(lb.run_dir)}
    digest = weights_sha256(saved[last].arrays)
    assert f"resuming after round {last} from weights sha256 {digest}" in resumed, resumed[:3000]
    rows = {r["round"]: r for r in _rows(lb)}
    assert sorted(rows) == list(range(1, ROUNDS + 1)) and rows[last]["weights_sha256"] == digest
    # the first resumed round samples only nodes that are there (the rebooted node 2 included, once it is back); on a
    # loaded machine one node may still miss that round's first 20-s stage (seen in CI): it drops out, the round holds
    first = resumed.split("Secure aggregation completed", 1)[0]
    assert "sampled 5 clients (out of 5)" in first and "2 node(s) dropped out" not in first, first[-3000:]
    assert rows[last + 1]["completed"] and rows[last + 1]["clients"] >= 4, rows[last + 1]
    # node 5 trained the killed round under the first run and again under the resumed one: both booked
    events = PrivacyLedger.open(lb.ledger_path(5), create=False).events
    assert len(events) == len(_trained(lb, 5)), "ledger events == rounds trained"
    if last < at["G"]:
        assert len({e.run_id for e in events if e.round == at["G"]}) == 2, [(e.run_id, e.round) for e in events]
