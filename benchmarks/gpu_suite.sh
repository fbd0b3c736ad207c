#!/usr/bin/env bash
# The prepared GPU measurement of issue 14 item 4, for a session that is lent a device (about 10 minutes):
#   run(command="bash benchmarks/gpu_suite.sh", timeout_s=600)      # the device tool sets $OUT
# Each step has its own time limit and writes its section to $OUT/<step>.md (dp_overhead, utility) and its log to
# $OUT/<step>.log, so a step that fails or runs out of time leaves the others' figures. Afterwards file the
# records beside them (python -m benchmarks.page --add $OUT/*.jsonl: they carry the GPU model, versions and
# load), regenerate the page (make bench-page) and update the notes in benchmarks/notes/.
#
# Steps (CUDA is picked automatically by the benchmarks; device=auto in veil):
#   1. dp_overhead, MiniLM-L6, float32, B=32, T=64: LoRA and full, non-private / hooks / ghost   (~2 min)
#   2. dp_overhead, MiniLM-L6, bfloat16 (Opacus 1.6 clips and adds noise in the parameters' dtype) (~2 min)
#   3. dp_overhead on SmolLM2-135M if this tree has the causal-LM task of issue 12 (--model smollm2); skipped
#      otherwise                                                                                    (~2 min)
#   4. utility_banking77, reduced (2 rounds x 3 steps x B=256, 10 clients)                          (~3 min)
set -u
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? $(date -u +%H:%M:%S)" | tee -a "$OUT/summary.txt"
  tail -n 20 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

step dp_fp32 150 -m benchmarks.dp_overhead --steps 5 --repeats 3 --output "$OUT/dp_fp32.md"
step dp_bf16 150 -m benchmarks.dp_overhead --steps 5 --repeats 3 --dtype bfloat16 --output "$OUT/dp_bf16.md"
if "$PY" -m benchmarks.dp_overhead --help 2>/dev/null | grep -q -- "--model"; then
  step dp_smollm2 150 -m benchmarks.dp_overhead --model smollm2 --batch-size 8 --seq-len 128 --steps 3 \
    --repeats 2 --output "$OUT/dp_smollm2.md"
else
  echo "== dp_smollm2 skipped: benchmarks.dp_overhead has no --model option in this tree (issue 12 not merged)" \
    | tee -a "$OUT/summary.txt"
fi
step utility 170 -m benchmarks.utility_banking77 --reduced --output "$OUT/utility.md"
echo "sections in $OUT:"; ls -l "$OUT"
