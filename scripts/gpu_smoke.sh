#!/usr/bin/env bash
# GPU smoke test: a short real ESPO run on CUDA when an NVIDIA GPU is present; exits 0 with a
# message (and does nothing) when there is none.
#
#   scripts/gpu_smoke.sh                 # 3 learner steps, the tiny model, then a joined sampler host
#   PYTHON=/path/to/python scripts/gpu_smoke.sh
#
# What runs (docs/cluster.md): configs/short-chain.yaml with the vLLM sampler on CUDA (bfloat16, 30%
# of the GPU's memory), the HF critic on CUDA, the DeepSpeed learner on CUDA, the tiny model (no
# download, no supervised warm-up), 3 learner steps. Then the same on two "hosts": a head with
# coordinator, learner, stopper and critic, and a sampler host that joins it (run.py --join).
# With 2 or more GPUs the sampler gets GPU 1, the rest GPU 0. Needs the CUDA environment of
# docs/install.md ("GPU machines"). Output: runs/gpu-smoke-<time>/ (ESPO_SMOKE_DIR overrides).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "gpu_smoke: no NVIDIA GPU here (nvidia-smi finds none): nothing to test, exiting 0"
  exit 0
fi
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_smoke: nvidia-smi sees a GPU but $PY's torch has no CUDA: install the GPU environment (docs/install.md)" >&2
  exit 1
fi
GPUS=$(nvidia-smi -L | grep -c '^GPU')
SAMPLER_GPU=0
if [ "$GPUS" -ge 2 ]; then SAMPLER_GPU=1; fi
OUT=${ESPO_SMOKE_DIR:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
echo "gpu_smoke: $GPUS GPU(s); sampler on GPU $SAMPLER_GPU, critic and learner on GPU 0; output in $OUT"

COMMON=(
  --set run.total_steps=3 --set run.checkpoint_every=0 --set run.progress=false
  --set model.sft_steps=0 --set model.dtype=bfloat16 --set model.learner_device=cuda
  --set task.eval_problems=8 --set task.eval_every=0
  --set actors.learner.cpus=null --set actors.critic.cpus=null --set actors.stopper.cpus=null
  --set actors.coordinator.cpus=null --set actors.sampler.cpus=null
  --set actors.learner.env.CUDA_VISIBLE_DEVICES=0 --set actors.critic.env.CUDA_VISIBLE_DEVICES=0
  --set actors.sampler.env.CUDA_VISIBLE_DEVICES=$SAMPLER_GPU
  --set "actors.sampler.options={max_num_seqs: 64, kv_cache_gib: null, gpu_memory_utilization: 0.3}"
  --set "actors.critic.options={device: cuda, dtype: bfloat16}"
  --set transport.heartbeat_timeout_s=120 --set transport.startup_timeout_s=900
)

check_run() {  # RUN_DIR STEPS: the learner wrote STEPS metrics rows and a final model
  "$PY" - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
run, steps = Path(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
assert [r["step"] for r in rows] == list(range(1, steps + 1)), rows
assert (run / "final" / "config.json").is_file(), "no final model"
print(f"gpu_smoke: {run}: {steps} steps, last reward {rows[-1].get('reward')}, stop rate {rows[-1].get('stop_rate')}")
PY
}

echo "gpu_smoke: 1/2 one host"
"$PY" run.py --config configs/short-chain.yaml --run-dir "$OUT/single" --set run.name=gpu-smoke "${COMMON[@]}"
check_run "$OUT/single" 3

echo "gpu_smoke: 2/2 a head and a sampler host that joins it (tcp 127.0.0.1)"
"$PY" run.py --config configs/short-chain.yaml --run-dir "$OUT/head" --set run.name=gpu-smoke-head "${COMMON[@]}" \
  --set transport.kind=tcp --roles coordinator,learner,stopper,critic &
HEAD=$!
trap 'kill $HEAD 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do [ -f "$OUT/head/join.json" ] && break; sleep 1; done  # wait for the head's join file
"$PY" run.py --join "$OUT/head/join.json" --roles sampler --host-name smoke-sampler --run-dir "$OUT/sampler"
wait $HEAD
trap - EXIT
check_run "$OUT/head" 3
echo "gpu_smoke: OK"
