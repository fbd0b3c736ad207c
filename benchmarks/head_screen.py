"""A fast screen of the DP linear head's levers (issue 22): a vectorised replica of veil's head-only local step, run
over a grid in seconds per arm, to pick the few settings that ``benchmarks.head_study`` then runs through veil's own
trainer and strategy.

Why a replica: ``head_study`` runs Opacus per arm (1-5 minutes each on 2 cores), too slow for a grid of dozens.
For a linear softmax head the per-example gradient is exact in closed form, ``(p - y) [x, 1]^T`` with norm
``||p - y|| sqrt(||x||^2 + 1)``, so the replica clips, Poisson-samples (q = B/N), adds N(0, σ²C²) noise to the sum,
divides by the expected batch B and averages the banks' deltas with weight 1 each, as veil's DP-SGD and SecAgg+'s
sum do, with σ from veil's own calibration (PRV, δ 1e-5) per bank. Checked against ``head_study`` (10 banks, lr 10,
no feature map): no DP 86.8 / 87.4% against 87.1 / 87.6% (validation / test), ε 8 82.5 / 82.7% against 80.5 / 82.7%.
It reads the frozen features ``head_study --feature-cache DIR`` saved, and scores the validation split only.

    python -m benchmarks.head_study --epsilons 0 --rounds 1 --steps 1 --feature-cache /tmp/fc --no-record
    python -m benchmarks.head_screen --feature-cache /tmp/fc --banks 10 --epsilons 8 --scales 0,1,2,3 --lrs 5,10
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import tempfile
from pathlib import Path

import torch

from benchmarks.common import add_output_args, machine_info, now, report
from benchmarks.utility_study import TRAIN, carve_validation
from veil.client.round_plan import noise_scaled_lr, round_clip
from veil.conf.schema import DataConfig, FederationConfig, ModelConfig, PrivacyConfig, VeilConfig
from veil.privacy.calibration import calibrate_noise_multiplier
from veil.task import get_task
from veil.task.data import read_examples
from veil.task.model import build_model
from veil.task.shards import resolve_labels, simulated_partitions

TASK = get_task("classification")


@functools.lru_cache(maxsize=None)
def _sigma(epsilon: float, q: float, steps: int) -> float:
    return calibrate_noise_multiplier(target_epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, accountant="prv")


def _label_name_features(args: argparse.Namespace, labels: list[str]) -> torch.Tensor:
    """The label names' pooled embeddings (K, H), through the same encoder and pooling as the cached features."""
    from veil.task.model import _label_name_inputs, load_tokenizer

    cfg = ModelConfig(tuning="head", path=args.model_path, source=args.source, pooling=args.pooling,
                      max_length=args.max_length, feature_center="none", feature_scale=1.0)
    model = build_model(cfg, labels, seed=0)
    enc = _label_name_inputs(load_tokenizer(cfg), labels)
    model.eval()
    with torch.no_grad():
        return model.embed(enc["input_ids"], enc["attention_mask"]).float()


def federate(shards: list[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor, bias: torch.Tensor, *,
             epsilon: float, lr: float, clip: float, rounds: int, steps: int, batch: int, seed: int,
             decay: float = 0.0, lr_noise_ref: float = 0.0, ema: float = 0.0,
             local_avg: bool = False, shared: bool = False,
             momentum: float = 0.0, schedule: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """The global head after ``rounds`` of local DP-SGD on every shard (``epsilon`` 0: no DP).

    ``ema`` > 0: the published head is the exponential moving average (weight ``ema`` on the past) of the global
    heads after each round, a post-processing of what the coordinator already holds (no ε). ``local_avg``: each bank
    sends the mean of its local iterates instead of the last one, a post-processing of its own noisy steps."""
    gen = torch.Generator().manual_seed(seed)
    weight0, bias0 = weight.clone(), bias.clone()
    avg_w, avg_b = weight.clone(), bias.clone()
    mom_w, mom_b = torch.zeros_like(weight), torch.zeros_like(bias)
    sigmas = [_sigma(epsilon, min(1.0, batch / len(y)), rounds * steps) if epsilon else 0.0 for _x, y in shards]
    rate = batch * len(shards) / sum(len(y) for _x, y in shards)  # shared: the run's public q (B / mean bank size)
    if shared:  # privacy.share_noise: one step a round, q and divisor public, each bank adds sigma/sqrt(M)
        sigmas = [(_sigma(epsilon, rate, rounds * steps) if epsilon else 0.0) / len(shards) ** 0.5] * len(shards)
    # schedules (public functions of the round): cos = cosine lr decay to 0; clip:F = C decays from C to F·C by
    # veil's own rule (privacy.max_grad_norm_final, round_clip; the noise σ·C_t with it); lrclip:F = lr decays so too
    end = float(schedule.split(":")[1]) if schedule.startswith(("clip:", "lrclip:")) else 1.0
    clips = VeilConfig(privacy=PrivacyConfig(max_grad_norm=clip, max_grad_norm_final=clip * end if end != 1 else 0.0),
                       federation=FederationConfig(rounds=rounds))
    for rnd in range(rounds):
        frac = rnd / max(1, rounds - 1)
        lr_t = lr * (0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cos" else 1.0)
        if schedule.startswith("clip:"):
            clip = round_clip(clips, rnd + 1)
        elif schedule.startswith("lrclip:"):
            clip, lr_t = round_clip(clips, rnd + 1), lr * end ** frac
        d_w, d_b = torch.zeros_like(weight), torch.zeros_like(bias)
        for (xs, ys), sigma in zip(shards, sigmas, strict=True):
            w, b, n = weight.clone(), bias.clone(), len(ys)
            step = noise_scaled_lr(lr_t, sigma=sigma, ref=lr_noise_ref)  # veil's rule (federation.lr_noise_ref)
            q = rate if shared else min(1.0, batch / n)
            sum_w, sum_b = torch.zeros_like(w), torch.zeros_like(b)
            for _ in range(steps):
                take = torch.rand(n, generator=gen) < q
                x, y = xs[take], ys[take]
                g = torch.softmax(x @ w.T + b, dim=-1)
                g[torch.arange(len(y)), y] -= 1  # dL/dlogits per example
                if epsilon:
                    norm = g.norm(dim=1) * torch.sqrt((x * x).sum(dim=1) + 1)
                    g = g * torch.clamp(clip / (norm + 1e-12), max=1.0)[:, None]
                g_w, g_b = g.T @ x, g.sum(dim=0)
                if epsilon:
                    g_w += torch.randn(g_w.shape, generator=gen) * sigma * clip
                    g_b += torch.randn(g_b.shape, generator=gen) * sigma * clip
                divisor = batch if q < 1 or shared else n
                w, b = w - step * g_w / divisor, b - step * g_b / divisor
                if decay:  # shrink toward the public start (the label-name head): a prior against the noise walk
                    w, b = w - step * decay * (w - weight0), b - step * decay * (b - bias0)
                sum_w, sum_b = sum_w + w, sum_b + b
            if local_avg:
                w, b = sum_w / steps, sum_b / steps
            d_w += (w - weight) / len(shards)
            d_b += (b - bias) / len(shards)
        mom_w, mom_b = momentum * mom_w + d_w, momentum * mom_b + d_b
        weight, bias = weight + mom_w, bias + mom_b
        avg_w, avg_b = ema * avg_w + (1 - ema) * weight, ema * avg_b + (1 - ema) * bias
    return (avg_w, avg_b) if ema else (weight, bias)


def public_transform(kind: str, names: torch.Tensor) -> torch.Tensor:
    """A linear map of the head's inputs built from the label names' mapped embeddings ``names`` (K, H) alone (public,
    no ε): ``none`` (identity), ``project`` (onto the span of the centred names: K - 1 directions) or ``whiten:λ``
    ((Σ + λ tr(Σ)/H I)^(-1/2), Σ the names' covariance). Screen-only levers (issue 22, the 10-bank gap): DP noise
    grows with the head's input dimension; a public subspace or a public preconditioner may spend it better."""
    eye = torch.eye(names.shape[1], dtype=torch.float64)
    centred = (names - names.mean(dim=0)).double()
    if kind == "none":
        return eye.float()
    if kind == "project":
        u, s, _vt = torch.linalg.svd(centred.T, full_matrices=False)
        basis = u[:, s > s.max() * 1e-6]
        return (basis @ basis.T).float()
    lam = float(kind.split(":", 1)[1])
    cov = centred.T @ centred / len(names)
    vals, vecs = torch.linalg.eigh(cov + lam * cov.trace() / names.shape[1] * eye)
    return (vecs @ torch.diag(vals.rsqrt()) @ vecs.T).float()


def data_pca(kind: str, rows: torch.Tensor) -> torch.Tensor:
    """``pca:K`` (non-private: an upper bound) or ``pca:K:EPS`` (the Gaussian mechanism on the second-moment matrix
    of the rows clipped to norm 1 after dividing by their median norm, at ε EPS, δ 1e-6, RDP calibration): the
    projection onto the top-K eigenvectors."""
    parts = kind.split(":")
    k = int(parts[1])
    x = rows.double()
    scale = x.norm(dim=1).median()
    x = x / scale
    x = x * torch.clamp(1.0 / x.norm(dim=1, keepdim=True), max=1.0)
    m = x.T @ x
    if len(parts) > 2:  # one Gaussian release (q 1, one step), σ from veil's own calibration
        sigma = calibrate_noise_multiplier(target_epsilon=float(parts[2]), delta=1e-6, sample_rate=1.0, steps=1,
                                           accountant="rdp")
        gen = torch.Generator().manual_seed(12345)
        noise = torch.randn(m.shape, generator=gen, dtype=torch.float64) * sigma  # sensitivity 1 (‖x‖ ≤ 1)
        m = m + (noise + noise.T) / 2 ** 0.5
    vals, vecs = torch.linalg.eigh(m)
    basis = vecs[:, -k:]
    return (basis @ basis.T).float()


def screen(args: argparse.Namespace, argv: list[str] | None) -> None:
    info, started = machine_info(torch.device("cpu")), now()
    key = f"{args.model_path or args.source}-{args.pooling}-{args.max_length}-{args.val_per_class}"
    cached = Path(args.feature_cache) / f"head_study-{key.replace('/', '_')}.pt"
    if not cached.is_file():
        raise SystemExit(f"head_screen: no cached features at {cached}; run benchmarks.head_study with "
                         f"--feature-cache {args.feature_cache} and the same model flags first")
    everything, splits = torch.load(cached, weights_only=True)
    with tempfile.TemporaryDirectory(prefix="veil-screen-") as tmp:
        train, _val = carve_validation(TRAIN, Path(tmp), per_class=args.val_per_class)
        model_cfg = ModelConfig(tuning="head", path=args.model_path, source=args.source, pooling=args.pooling,
                                max_length=args.max_length)
        cfg = VeilConfig(model=model_cfg, federation=FederationConfig(num_clients=args.banks, alpha=args.alpha),
                         data=DataConfig(train_path=str(train))).validate()
        labels = resolve_labels(cfg.data)
        examples = read_examples(str(train), cfg.data)
        _ids, parts = simulated_partitions(TASK, examples, labels, {**vars(cfg.federation)}, path=str(train))
    val_x, val_y = splits["validation"]["features"], splits["validation"]["labels"]
    rows: list[list[str]] = []
    name_feats = _label_name_features(args, labels)
    for center, scale, kind in itertools.product(args.centers.split(","), [float(v) for v in args.scales.split(",")],
                                                 args.transforms.split(",")):
        # scale 0: no feature map (the raw pooled embedding), else veil's own map for that centre and scale
        if scale == 0 and center != args.centers.split(",")[0]:
            continue
        mapped = ModelConfig(**{**vars(model_cfg), "feature_center": center if scale else "none",
                                "feature_scale": scale or 1.0})
        model = build_model(mapped, labels, seed=0)
        with torch.no_grad():
            mapped_in = model.head_input if hasattr(model, "head_input") else (lambda t: t)
            names_in = mapped_in(name_feats)
            if kind.startswith("pca:"):  # EXPERIMENT: the span of the banks' top-K principal directions
                transform = data_pca(kind, mapped_in(everything["features"][torch.as_tensor(
                    [i for b in range(args.banks) for i in parts[b]])]))
            else:
                transform = public_transform(kind, names_in)
            # after the transform, the names' mean centred norm is the one veil's map gave (the scale stays a lever)
            ref = (names_in - names_in.mean(dim=0)).norm(dim=1).mean()
            moved = (names_in - names_in.mean(dim=0)) @ transform.T
            rescale = float(ref / moved.norm(dim=1).mean())

            def head_in(t: torch.Tensor) -> torch.Tensor:
                return mapped_in(t) @ transform.T * rescale

            init_w = model.head.weight.detach().clone()
            if kind != "none":  # the label-name head, read in the transformed space (as veil builds it)
                tn = head_in(name_feats)
                init_w = torch.nn.functional.normalize(tn - tn.mean(dim=0), dim=-1) * init_w.norm(dim=1, keepdim=True)
            shards = [(head_in(everything["features"][torch.as_tensor(parts[i])]),
                       everything["labels"][torch.as_tensor(parts[i])]) for i in range(args.banks)]
            if args.central:  # one trusted curator holds every bank's rows: the reference veil's trust model forgoes
                shards = [(torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards]))]
            val_in = head_in(val_x)
            for eps, lr, ref, ema in itertools.product([float(v) for v in args.epsilons.split(",")],
                                                       [float(v) for v in args.lrs.split(",")],
                                                       [float(v) for v in args.lr_noise_refs.split(",")],
                                                       [float(v) for v in args.emas.split(",")]):
                accs = []
                for seed in range(args.seeds):
                    w, b = federate(shards, init_w.clone(), model.head.bias.detach().clone(),
                                    epsilon=eps, lr=lr, clip=args.clip, rounds=args.rounds, steps=args.steps,
                                    batch=args.batch, seed=seed, decay=args.decay, lr_noise_ref=ref,
                                    ema=ema, local_avg=args.local_avg, shared=args.shared,
                                    momentum=args.momentum, schedule=args.schedule)
                    accs.append(float(((val_in @ w.T + b).argmax(dim=1) == val_y).float().mean()))
                what = ("none" if scale == 0 else f"{center} x {scale:g}") + ("" if kind == "none" else f", {kind}")
                rows.append([what, "no DP" if eps == 0 else f"{eps:g}", f"{lr:g}" + (f" × min(1, {ref:g}/σ)" if ref else "") + (f", EMA {ema:g}" if ema else ""),
                             f"{100 * sum(accs) / len(accs):.1f}", " / ".join(f"{100 * a:.1f}" for a in accs)])
                print(" | ".join(rows[-1]), flush=True)
    settings = (f"{args.banks} banks, Dirichlet α={args.alpha}, {args.model_path or args.source} frozen "
                f"(pooling {args.pooling}), head from label names, SGD, C={args.clip:g}, {args.rounds}x{args.steps} "
                f"steps, B={args.batch}; validation: {args.val_per_class} texts per label; replica of veil's head step"
                + ("; CENTRAL: the banks' rows pooled at one trusted curator (not veil's trust model)" if args.central
                   else "") + (f"; shrinkage toward the label-name head {args.decay:g} x lr per step" if args.decay
                               else "") + ("; each bank sends the mean of its local iterates" if args.local_avg else "")
                + ("; SHARED noise: each bank adds sigma/sqrt(banks), one step a round, public q and divisor"
                   if args.shared else ""))
    report("head_screen", args, argv, info, settings=settings,
           headers=["feature map", "ε", "lr", "validation acc %", "per seed"], rows=rows,
           notes=["feature map: veil's model.feature_center x model.feature_scale (none: the raw pooled embedding)",
                  "screen only: the chosen settings are then run through veil's trainer by benchmarks.head_study"],
           elapsed=now() - started)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feature-cache", required=True, help="the directory head_study --feature-cache wrote")
    ap.add_argument("--banks", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--epsilons", default="4", help="comma list; 0 = no DP")
    ap.add_argument("--lrs", default="5")
    ap.add_argument("--centers", default="label_names", help="comma list of model.feature_center values")
    ap.add_argument("--scales", default="0,3", help="comma list of model.feature_scale values; 0 = no map")
    ap.add_argument("--transforms", default="none",
                    help="comma list of public input transforms: none, project, whiten:LAMBDA (see public_transform)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--central", action="store_true",
                    help="pool the banks' rows at one curator (DP-SGD there): what per-bank noise costs")
    ap.add_argument("--lr-noise-refs", default="0", help="comma list of federation.lr_noise_ref values (0: off)")
    ap.add_argument("--decay", type=float, default=0.0, help="per-step shrinkage toward the label-name head (× lr)")
    ap.add_argument("--emas", default="0", help="comma list: EMA weight of the published head over rounds (0: last)")
    ap.add_argument("--schedule", default="none", help="EXPERIMENT: none | cos | clip:F | lrclip:F")
    ap.add_argument("--momentum", type=float, default=0.0, help="server heavy-ball momentum (fedavgm, server lr 1)")
    ap.add_argument("--local-avg", action="store_true", help="each bank sends the mean of its local iterates")
    ap.add_argument("--shared", action="store_true",
                    help="privacy.share_noise: one step a round (--steps 1), q = B / mean bank size, divisor B, "
                         "each bank adds sigma/sqrt(banks)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--pooling", default="auto")
    ap.add_argument("--model-path", default="")
    ap.add_argument("--source", default="minilm")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--val-per-class", type=int, default=10)
    add_output_args(ap, quick="(no effect)", root=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    screen(args, argv)


if __name__ == "__main__":
    main()
