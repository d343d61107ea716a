#!/usr/bin/env bash
# The prepared GPU benchmark on one H100/H200, at most 6 minutes (stages share RNAN_GPU_CHECK_BUDGET = 350 s):
# the PyTorch peer at batch 16 and 64, then tools/benchmark.py (paper setting and batch 64, bfloat16 and
# float32, a profile of the paper setting), then variants at the paper setting in bfloat16 while time is
# left: parameters cast once per step, that with XLA command buffers, the shifted depthwise conv (the first
# session's variants, command buffers alone, unroll 2 and shifted, lost or tied: tools/BENCHMARKS.md).
# JSON, logs, one Perfetto trace and a markdown table (printed last) land in $OUT.
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

main=(--dtypes=bfloat16,float32 --batch_sizes=16,64 --steps=8 --repeats=4 --skip_forward --nopeer)
variant=(--dtypes=bfloat16 --batch_sizes=16 --steps=8 --repeats=4 --skip_forward --nopeer)
peer16=(--skip_compile --batch=16 --steps=30)
peer64=(--skip_compile --batch=64 --steps=12)
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"  # fail, rather than time the paper model on the host CPU
if [ -n "${RNAN_GPU_CHECK_TINY:-}" ]; then
  export JAX_PLATFORMS=cpu
  main=(--tiny --dtypes=bfloat16,float32 --nopeer)
  variant=(--tiny --dtypes=bfloat16 --nopeer)
  peer16=(--skip_compile --tiny --steps=3)
  peer64=(--skip_compile --tiny --steps=2 --batch=4)
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

echo "== PyTorch peer, batch 16 and 64 ($(left) s left)"
(cd .bench && timeout 100 "$PY" bench_torch.py "${peer16[@]}") 2>&1 | tee "$OUT/torch_b16.log"
(cd .bench && timeout 80 "$PY" bench_torch.py "${peer64[@]}") 2>&1 | tee "$OUT/torch_b64.log"

echo "== JAX: paper setting and batch 64, bfloat16 and float32 ($(left) s left)"
rm -rf /tmp/rnan_profile
timeout "$(limit 110)" "$PY" tools/benchmark.py --output="$OUT/jax.json" "${main[@]}" \
  --profile_dir=/tmp/rnan_profile 2>&1 | tee "$OUT/run.log"
i=0
for trace in $(find /tmp/rnan_profile -name perfetto_trace.json.gz 2>/dev/null | sort); do
  name=$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$trace")")")")")  # train_b16_<dtype>_<knobs>
  [ $i -lt 1 ] && cp "$trace" "$OUT/trace_${name}.json.gz"
  i=$((i + 1))
done

# Variants at the paper setting, bfloat16, most promising first; each its own process (XLA_FLAGS is read once).
if [ "$(left)" -gt 60 ]; then
  echo "== JAX: parameters cast once per step ($(left) s left)"
  timeout "$(limit 55)" "$PY" tools/benchmark.py --output="$OUT/jax_cast_once.json" "${variant[@]}" \
    --cast_params_once 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$(left)" -gt 60 ]; then
  echo "== JAX: XLA command buffers with while loops ($(left) s left)"
  XLA_FLAGS="$COMMAND_BUFFER_FLAGS" timeout "$(limit 0)" "$PY" tools/benchmark.py --output="$OUT/jax_cmdbuf.json" \
    "${variant[@]}" --cast_params_once 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$(left)" -gt 50 ]; then
  echo "== JAX: depthwise as shifted multiply-adds ($(left) s left)"
  timeout "$(limit 5)" "$PY" tools/benchmark.py --output="$OUT/jax_shifted.json" "${variant[@]}" \
    --depthwise=shifted 2>&1 | tee -a "$OUT/run.log"
fi

mkdir -p /tmp/rnan_gpu_last && cp "$OUT"/jax*.json /tmp/rnan_gpu_last/ 2>/dev/null  # for tools/gpu_train.sh
echo "== table ($(left) s left; $((SECONDS - start)) s used)"
tables=$(ls "$OUT"/jax*.json 2>/dev/null | paste -sd, -)
[ -n "$tables" ] && "$PY" tools/benchmark.py --table="$tables" --peer_log="$OUT/torch_b16.log,$OUT/torch_b64.log" \
  | tee -a "$OUT/run.log"
exit 0
