#!/usr/bin/env bash
# The prepared GPU benchmark on one H100/H200, at most 8.5 minutes (stages share RNAN_GPU_CHECK_BUDGET = 490 s),
# at the paper setting (x4, batch 16 of 48x48, bfloat16): the PyTorch peer; then tools/benchmark.py processes of
# the default knobs (scans unrolled by 2, parameters cast once, remat convs), each compiling cold on an
# autotuning cache of its own: XLA's fusion autotuner off then on in one process, off again, and the default;
# then, if time is left, both dtypes at batch 16 and 64 and the peer at batch 64. (Measured so far:
# tools/BENCHMARKS.md, from "Measured on one NVIDIA H200" on.)
# Logs, the JSON records (jax_json.tar), a Perfetto trace (traces.tar), the autotuning caches (autotune.tar)
# and a markdown table (printed last) land in $OUT.
#
# Prepared on the CPU machine, in the repository root (the folders are git-ignored):
#   mkdir -p .bench && cp ../shared/peers/bench_torch.py ../shared/peers/rnan_torch.py .bench/
#   (.whl/: wheels of ml_collections, grain, array_record, dm-tree, portpicker and tensorboardX for CPython
#   3.12; the GPU image lacks them and rnan_jax imports them; tools/BENCHMARKS.md gives the pip command)
# Launched with the device tool (tools/gpu_train.sh follows at once on the warm machine):
#   run(command="bash tools/gpu_check.sh", carry=[".bench", ".whl"], timeout_s=550, kind="nvidia-h200")
# Every stage has its own time limit inside RNAN_GPU_CHECK_BUDGET seconds; a stage that fails or runs out
# keeps what the others wrote (benchmark.py rewrites its JSON after every setting).
# Dry run on a CPU (tiny models, about 1.5 minutes):
#   RNAN_GPU_CHECK_TINY=1 OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/rnan_gpu_check}"
mkdir -p "$OUT"
BUDGET="${RNAN_GPU_CHECK_BUDGET:-490}"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the peer runs in .bench/
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
limit() { local n=$(($(left) - $1)); echo $((n < 30 ? 30 : n)); }  # seconds for a stage, keeping $1 for later
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"  # batch 64 float32 is large

one=(--dtypes=bfloat16 --batch_sizes=16 --steps=8 --repeats=4 --skip_forward --nopeer)
peer16=(--skip_compile --batch=16 --steps=15)
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

# A cold compile of the default step took 89-91 s (third and fourth sessions), 7-8 s on cached autotuning picks.
# The fourth session's caches (tools/BENCHMARKS.md, "Fourth GPU session") hold 376 picks for the step: 34 cuDNN
# convolution algorithms and 342 fusions on which XLA's fusion autotuner timed Triton against its own emitter
# (kept its own for 320). Autotuning level 0 compiled in 7 s but ran 11.7 s a step; level 3 was not faster to
# compile. So: the fusion autotuner off, then on, in one process on a fresh cache (D): the first compile is the
# cold one without fusion autotuning, the second adds it on the same convolution picks, and the two steps run
# the same conv algorithms; a second cold process with it off (cache E: are the compile and the step the
# same?), traced (traces.tar, for tools/trace_breakdown.py: which kernels a block launches); the default cold (cache F) as the reference; then, if time is left, both dtypes at batch 16 and 64
# with the faster setting, and the peer at batch 64.
# The caches come back in autotune.tar, to set beside the step times.
rm -rf /tmp/rnan_autotune_d /tmp/rnan_autotune_e /tmp/rnan_autotune_f /tmp/rnan_profile
bench() {  # bench NAME KEEP_SECONDS XLA_FLAGS ARGS...: one benchmark.py process, its JSON in $OUT/jax_NAME.json
  local name=$1 keep=$2 flags=$3; shift 3
  echo "== JAX $name: XLA_FLAGS=$flags $* ($(left) s left)" | tee -a "$OUT/run.log"
  XLA_FLAGS="$flags" timeout "$(limit "$keep")" "$PY" tools/benchmark.py --output="$OUT/jax_$name.json" "${one[@]}" \
    "$@" 2>&1 | grep -v cuda_timer | tee -a "$OUT/run.log"
}
cache() { echo "--xla_gpu_per_fusion_autotune_cache_dir=/tmp/rnan_autotune_$1"; }
bench tuner 200 "$(cache d)" --fusion_autotuner=false,true  # the default knobs: unroll 2, cast once, remat convs
bench tuner_off_again 150 "$(cache e)" --fusion_autotuner=false --profile_dir=/tmp/rnan_profile  # + a trace
(cd /tmp/rnan_profile 2>/dev/null && find . -name perfetto_trace.json.gz | tar -cf "$OUT/traces.tar" -T -)
bench default_cold 30 "$(cache f)"
if [ "$(left)" -ge 150 ]; then  # the Done-when's rows: both dtypes, batch 16 and 64, on cache D's picks
  bench dtypes 60 "$(cache d)" --fusion_autotuner=false --dtypes=float32,bfloat16 --batch_sizes=16,64 \
    --steps=5 --repeats=3
  [ -z "${RNAN_GPU_CHECK_TINY:-}" ] && peer64=(--skip_compile --batch=64 --steps=6) || peer64=("${peer16[@]}")
  (cd .bench && timeout "$(limit 0)" "$PY" bench_torch.py "${peer64[@]}") 2>&1 | tee "$OUT/torch_b64.log"
fi
(cd /tmp && tar -cf "$OUT/autotune.tar" rnan_autotune_d rnan_autotune_e rnan_autotune_f 2>/dev/null)

rm -rf /tmp/rnan_gpu_last && mkdir -p /tmp/rnan_gpu_last && cp "$OUT"/jax*.json /tmp/rnan_gpu_last/ 2>/dev/null  # for gpu_train.sh
echo "== table ($(left) s left; $((SECONDS - start)) s used)"
tables=$(ls "$OUT"/jax*.json 2>/dev/null | paste -sd, -)
peers=$(ls "$OUT"/torch_b*.log 2>/dev/null | paste -sd, -)
[ -n "$tables" ] && "$PY" tools/benchmark.py --table="$tables" --peer_log="$peers" \
  | tee -a "$OUT/run.log"
# The device tool returns at most 8 files: the JSON records travel as one tar.
(cd "$OUT" && ls jax_*.json >/dev/null 2>&1 && tar -cf jax_json.tar jax_*.json && rm -f jax_*.json)
exit 0
