#!/usr/bin/env bash
# The prepared GPU benchmark on one H100/H200, at most 6 minutes (stages share RNAN_GPU_CHECK_BUDGET = 350 s),
# all at the paper setting (x4, batch 16 of 48x48) unless named: the PyTorch peer; then tools/benchmark.py in
# bfloat16 with the parameters cast once and each RNA block's backward keeping all its activations, its
# input alone or its input and 3x3 conv outputs (execution.remat none/block/convs), each profiled; the
# unchanged default step; while time is left, the fastest of those at batch 64 and in float32. (The first
# session's variants, command buffers, unroll 2 and shifted depthwise, lost or tied: tools/BENCHMARKS.md.)
# JSON, logs, the Perfetto traces (traces.tar) and a markdown table (printed last) land in $OUT.
#
# Prepared on the CPU machine, in the repository root (the folders are git-ignored):
#   mkdir -p .bench && cp ../shared/peers/bench_torch.py ../shared/peers/rnan_torch.py .bench/
#   (.whl/: wheels of ml_collections, grain, array_record, dm-tree, portpicker and tensorboardX for CPython
#   3.12; the GPU image lacks them and rnan_jax imports them; tools/BENCHMARKS.md gives the pip command)
# Launched with the device tool (tools/gpu_train.sh follows at once on the warm machine):
#   run(command="bash tools/gpu_check.sh", carry=[".bench", ".whl"], timeout_s=380)
# Every stage has its own time limit inside RNAN_GPU_CHECK_BUDGET seconds; a stage that fails or runs out
# keeps what the others wrote (benchmark.py rewrites its JSON after every setting).
# Dry run on a CPU (tiny models, about 1.5 minutes):
#   RNAN_GPU_CHECK_TINY=1 OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/rnan_gpu_check}"
mkdir -p "$OUT"
BUDGET="${RNAN_GPU_CHECK_BUDGET:-350}"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the peer runs in .bench/
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
limit() { local n=$(($(left) - $1)); echo $((n < 30 ? 30 : n)); }  # seconds for a stage, keeping $1 for later
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"  # batch 64 float32 is large

one=(--dtypes=bfloat16 --batch_sizes=16 --steps=8 --repeats=4 --skip_forward --nopeer)
peer16=(--skip_compile --batch=16 --steps=30)
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"  # fail, rather than time the paper model on the host CPU
if [ -n "${RNAN_GPU_CHECK_TINY:-}" ]; then
  export JAX_PLATFORMS=cpu
  one=(--tiny --dtypes=bfloat16 --nopeer)
  peer16=(--skip_compile --tiny --steps=3)
fi

source tools/gpu_env.sh || exit 1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
    --format=csv
  "$PY" -c "import sys, jax, jaxlib, flax, optax, torch, rnan_jax.step
print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)
print(jax.devices())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== PyTorch peer, batch 16 ($(left) s left)"
(cd .bench && timeout 100 "$PY" bench_torch.py "${peer16[@]}") 2>&1 | tee "$OUT/torch_b16.log"

# Paper setting, bfloat16: what the backward keeps of each RNA block (execution.remat), parameters cast once,
# one process, each setting profiled; then the unchanged default step; then the winner at batch 64 and in float32.
echo "== JAX: remat none, block, convs with parameters cast once ($(left) s left)"
rm -rf /tmp/rnan_profile
timeout "$(limit 120)" "$PY" tools/benchmark.py --output="$OUT/jax_remat.json" "${one[@]}" --remat=none,block,convs \
  --cast_params_once=true --profile_dir=/tmp/rnan_profile 2>&1 | tee "$OUT/run.log"
(cd /tmp/rnan_profile 2>/dev/null && find . -name perfetto_trace.json.gz | tar -cf "$OUT/traces.tar" -T -)
echo "== JAX: the default step, unchanged ($(left) s left)"
timeout "$(limit 80)" "$PY" tools/benchmark.py --output="$OUT/jax.json" "${one[@]}" --remat=none 2>&1 | tee -a "$OUT/run.log"
best=$("$PY" -c "import json, sys
rows = [r for r in json.load(open(sys.argv[1]))['train'] if r.get('step_ms')]
print(min(rows, key=lambda r: r['step_ms'])['remat'] if rows else 'block')" "$OUT/jax_remat.json" 2>/dev/null || echo block)
if [ "$(left)" -gt 50 ]; then
  echo "== JAX: remat $best, cast once, batch 64 ($(left) s left)"
  timeout "$(limit 35)" "$PY" tools/benchmark.py --output="$OUT/jax_b64.json" "${one[@]}" --batch_sizes=64 \
    --remat="$best" --cast_params_once=true 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$(left)" -gt 35 ]; then
  echo "== JAX: remat $best, float32 ($(left) s left)"
  timeout "$(limit 0)" "$PY" tools/benchmark.py --output="$OUT/jax_f32.json" "${one[@]}" --dtypes=float32 \
    --remat="$best" 2>&1 | tee -a "$OUT/run.log"
fi

mkdir -p /tmp/rnan_gpu_last && cp "$OUT"/jax*.json /tmp/rnan_gpu_last/ 2>/dev/null  # for tools/gpu_train.sh
echo "== table ($(left) s left; $((SECONDS - start)) s used)"
tables=$(ls "$OUT"/jax*.json 2>/dev/null | paste -sd, -)
[ -n "$tables" ] && "$PY" tools/benchmark.py --table="$tables" --peer_log="$OUT/torch_b16.log" \
  | tee -a "$OUT/run.log"
exit 0
