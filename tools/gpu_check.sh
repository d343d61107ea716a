#!/usr/bin/env bash
# Issue 7's prepared GPU run on one H100/H200, at most 6 minutes (stages share RNAN_GPU_CHECK_BUDGET = 340 s):
# the PyTorch peer, then tools/benchmark.py (paper setting and batch 64, bfloat16 and float32, the 1080p
# forward, a profile of the paper setting), then the shifted-depthwise variant if time is left. JSON, logs,
# two Perfetto traces and a markdown table (printed last) land in $OUT.
#
# Prepared on the CPU machine, in the repository root (both folders are git-ignored):
#   mkdir -p .bench && cp ../shared/peers/bench_torch.py ../shared/peers/rnan_torch.py .bench/
#   (.whl/: wheels of ml_collections, grain, array_record and portpicker for CPython 3.12; the GPU image lacks
#   them and rnan_jax.step imports them; tools/BENCHMARKS.md gives the pip download command)
# Launched with the device tool:
#   run(command="bash tools/gpu_check.sh", carry=[".bench", ".whl"], timeout_s=420)
# Every stage has its own time limit inside RNAN_GPU_CHECK_BUDGET seconds; a stage that fails or runs out
# keeps what the others wrote (benchmark.py rewrites its JSON after every setting).
# Dry run on a CPU (tiny models, about 1.5 minutes):
#   RNAN_GPU_CHECK_TINY=1 OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/rnan_gpu_check}"
mkdir -p "$OUT"
BUDGET="${RNAN_GPU_CHECK_BUDGET:-340}"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the peer runs in .bench/
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
limit() { local n=$(($(left) - $1)); echo $((n < 30 ? 30 : n)); }  # seconds for a stage, keeping $1 for later
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"  # batch 64 float32 is large

main=(--dtypes=bfloat16,float32 --batch_sizes=16,64 --steps=8 --repeats=4)
variant=(--dtypes=bfloat16,float32 --batch_sizes=16 --steps=8 --repeats=4)
peer=(--skip_compile)
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"  # fail, rather than time the paper model on the host CPU
if [ -n "${RNAN_GPU_CHECK_TINY:-}" ]; then
  export JAX_PLATFORMS=cpu
  main=(--tiny --dtypes=bfloat16,float32)
  variant=(--tiny --dtypes=bfloat16,float32)
  peer=(--skip_compile --tiny --steps=3)
fi

if ! "$PY" -c "import grain, ml_collections" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/run.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

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

echo "== PyTorch peer ($(left) s left)"
(cd .bench && timeout 100 "$PY" bench_torch.py "${peer[@]}") 2>&1 | tee "$OUT/torch.log"

echo "== JAX: paper setting and batch 64, bfloat16 and float32 ($(left) s left)"
rm -rf /tmp/rnan_profile
timeout "$(limit 25)" "$PY" tools/benchmark.py --output="$OUT/jax.json" "${main[@]}" \
  --profile_dir=/tmp/rnan_profile 2>&1 | tee "$OUT/run.log"
i=0
for trace in $(find /tmp/rnan_profile -name perfetto_trace.json.gz 2>/dev/null | sort); do
  name=$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$trace")")")")")  # train_b16_<dtype>_<knobs>
  [ $i -lt 2 ] && cp "$trace" "$OUT/trace_${name}.json.gz"
  i=$((i + 1))
done

if [ "$(left)" -gt 75 ]; then
  echo "== JAX: depthwise as shifted multiply-adds, paper setting ($(left) s left)"
  timeout "$(limit 10)" "$PY" tools/benchmark.py --output="$OUT/jax_shifted.json" "${variant[@]}" \
    --depthwise=shifted --skip_forward 2>&1 | tee -a "$OUT/run.log"
fi

echo "== table ($(left) s left; $((SECONDS - start)) s used)"
tables=$(ls "$OUT"/jax*.json 2>/dev/null | paste -sd, -)
[ -n "$tables" ] && "$PY" tools/benchmark.py --table="$tables" --peer_log="$OUT/torch.log" | tee -a "$OUT/run.log"
exit 0
