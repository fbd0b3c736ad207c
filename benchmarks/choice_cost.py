"""What closed-set scoring (``choice_accuracy``, issue 26 scope 3) costs per query on ``make demo-llm``'s model:
SmolLM2-135M + LoRA, BANKING77 queries as instructions (chat template), the 77 intent names as candidates. Both
paths of :func:`veil.task.choices.choice_scores` run side by side in one process on the same queries: the padded
batch (the prompt's cache repeated 77 times, candidates right-padded to the longest) and the packed prefix tree (the
candidates as one sequence after the prompt's cache, each shared prefix once, with a custom attention mask). The old
path is the same function with packing refused, as for a family :func:`~veil.task.choices.packs` does not accept.

CPU-seconds are the process' CPU time (all threads); wall clock depends on the load. On a loaded machine a second
torch thread spin-waits at every operator for a sibling that was descheduled, and that waiting is CPU time too: the
one-thread rows measure the work itself, the two-thread rows what a default run pays there
(``OMP_WAIT_POLICY=PASSIVE``, set before Python starts, makes the waiting threads sleep instead). LoRA B is drawn N(0, 0.02) (it starts at zero) so the adapters count in the scores both paths must agree on.

    python -m benchmarks.choice_cost                        # 6 queries, 1 and 2 threads; records to benchmarks/results/
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.choice_cost --threads 2   # idle threads sleep
    python -m benchmarks.choice_cost --quick --no-record    # 2 queries
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import add_output_args, machine_info, now, report  # noqa: E402
from veil.preflight import preflight  # noqa: E402
from veil.task import choices, get_task  # noqa: E402
from veil.task.causal_lm import PromptExamples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["task=causal_lm", "model=smollm2", "data=banking77_instructions", "model.max_length=64", "data.choices=auto"]
TASK = get_task("causal_lm")


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """``fn()``, its CPU-seconds (process, all threads) and its wall-clock seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def padded(model: torch.nn.Module, prompt: list[int], cands: list[list[int]]) -> torch.Tensor:
    """``choice_scores`` on its fallback path: packing refused, as for a family it is not checked for."""
    with mock.patch.object(choices, "PACKED_FAMILIES", frozenset()):
        return choices.choice_scores(model, prompt, cands)


def measure(model: torch.nn.Module, prompts: list[list[int]], cands: list[list[int]],
            paths: dict[str, Callable[..., torch.Tensor]]) -> tuple[dict[str, list[float]], dict[str, list[float]],
                                                                  list[tuple[torch.Tensor, ...]]]:
    """CPU and wall seconds of each path on each prompt (which path runs first alternates), and the score pairs."""
    for fn in paths.values():  # warm-up: first-call allocations and kernels, not timed
        fn(model, prompts[0], cands[:3])
    cpu: dict[str, list[float]] = {p: [] for p in paths}
    wall: dict[str, list[float]] = {p: [] for p in paths}
    found = []
    for q, prompt in enumerate(prompts):
        scores = {}
        for p in list(paths) if q % 2 == 0 else list(reversed(paths)):
            scores[p], c, w = timed(lambda fn=paths[p]: fn(model, prompt, cands))  # type: ignore[misc]
            cpu[p].append(c)
            wall[p].append(w)
        found.append(tuple(scores[p] for p in paths))
    return cpu, wall, found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=6, help="test queries scored, spread over the file")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one table block each")
    add_output_args(ap, quick="2 queries", root=ROOT)
    args = ap.parse_args(argv)
    queries = 2 if args.quick else args.queries
    started, info = now(), machine_info(torch.device("cpu"))
    cfg = preflight(DEMO)
    labels = TASK.labels(cfg)
    examples = TASK.read(cfg.data.test_path, cfg)
    picks = range(0, len(examples.prompts), max(1, len(examples.prompts) // queries))[:queries]
    subset = PromptExamples([examples.prompts[i] for i in picks], [examples.completions[i] for i in picks])
    data = TASK.tensors(subset, labels, cfg, path=cfg.data.test_path, evaluation=True)
    model = TASK.build_model(cfg, labels, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    cands = [[t for t in row if t >= 0] for row in data["choice_ids"][0].tolist()]
    prompts = [[t for t in row if t >= 0] for row in data["choice_prompt"].tolist()]
    paths = {"padded batch (before)": padded, "packed prefix tree": choices.choice_scores}
    tokens, _, _ = choices.prefix_tree(cands)
    width = max(map(len, cands))
    positions = {"padded batch (before)": len(cands) * (width - 1), "packed prefix tree": len(tokens)}
    rows, gap, same = [], 0.0, 0
    wait = os.environ.get("OMP_WAIT_POLICY", "default")
    for threads in args.threads:
        torch.set_num_threads(threads)
        cpu, wall, found = measure(model, prompts, cands, paths)
        gap = max(gap, max(float((old - new).abs().max()) for old, new in found))
        same += sum(int(old.argmax()) == int(new.argmax()) for old, new in found)
        base = statistics.median(cpu["padded batch (before)"])
        rows += [[p, str(threads), wait, f"{statistics.median(cpu[p]):.2f}", f"{min(cpu[p]):.2f}-{max(cpu[p]):.2f}",
                  f"{statistics.median(wall[p]):.2f}", str(positions[p]), f"{base / statistics.median(cpu[p]):.2f}x"]
                 for p in paths]
    prompt_lengths = sorted(map(len, prompts))
    notes = [f"{len(prompts)} BANKING77 test queries (prompt {prompt_lengths[0]}-{prompt_lengths[-1]} tokens with the "
             f"chat template), {len(cands)} candidates of 1-{width} tokens ({sum(map(len, cands))} in all); "
             f"positions after the prompt per query: padded {len(cands)} x {width - 1}, packed {len(tokens)} "
             f"(every token but each candidate's last, each shared prefix once)",
             f"the two paths agree: max |score difference| {gap:.2e} nats, same argmax on {same}/"
             f"{len(prompts) * len(args.threads)} query runs",
             "under load, torch's second thread spin-waits for a descheduled sibling and that counts as CPU time: "
             "compare rows of the same thread count and wait policy"]
    report("choice_cost", args, argv, info,
           settings="SmolLM2-135M-Instruct + LoRA r=8 (q/v), fp32, CPU, batch of one query; "
                    "veil.task.choices.choice_scores, padded fallback against the packed path",
           headers=["path", "threads", "OMP_WAIT_POLICY", "CPU-s per query", "CPU-s range", "wall s per query", "positions", "x padded CPU-s"],
           rows=rows, notes=notes, elapsed=now() - started)


if __name__ == "__main__":
    main()
