#!/usr/bin/env bash
# The prepared GPU benchmark on one H100/H200, at most 7 minutes (stages share RNAN_GPU_CHECK_BUDGET = 410 s),
# all at the paper setting (x4, batch 16 of 48x48, bfloat16) unless named: the PyTorch peer; then
# tools/benchmark.py, one process per setting, all but one sharing XLA's autotuning cache: the default knobs
# (parameters cast once, remat convs; profiled), each GCRG's blocks unrolled (profiled), the first session's
# step (neither), scan unroll 2, XLA command
# buffers, cuDNN's heuristics instead of autotuning (--xla_gpu_autotune_level=0); while time is left, batch 64
# in both dtypes. (Measured so far: tools/BENCHMARKS.md, "Measured on one NVIDIA H200".)
# Logs, the JSON records (jax_json.tar), the Perfetto trace (traces.tar) and a markdown table (printed last)
# land in $OUT.
#
# Prepared on the CPU machine, in the repository root (the folders are git-ignored):
#   mkdir -p .bench && cp ../shared/peers/bench_torch.py ../shared/peers/rnan_torch.py .bench/
#   (.whl/: wheels of ml_collections, grain, array_record, dm-tree, portpicker and tensorboardX for CPython
#   3.12; the GPU image lacks them and rnan_jax imports them; tools/BENCHMARKS.md gives the pip command)
# Launched with the device tool (tools/gpu_train.sh follows at once on the warm machine):
#   run(command="bash tools/gpu_check.sh", carry=[".bench", ".whl"], timeout_s=450)
# Every stage has its own time limit inside RNAN_GPU_CHECK_BUDGET seconds; a stage that fails or runs out
# keeps what the others wrote (benchmark.py rewrites its JSON after every setting).
# Dry run on a CPU (tiny models, about 1.5 minutes):
#   RNAN_GPU_CHECK_TINY=1 OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/rnan_gpu_check}"
mkdir -p "$OUT"
BUDGET="${RNAN_GPU_CHECK_BUDGET:-410}"
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

# Every process but one shares XLA's autotuning results through a cache folder, so that all use the same
# conv algorithms: in the second session each process autotuned afresh, XLA warned "Delay kernel timed out"
# throughout, and the same step ran at 89.5 ms in one process and 110.7 in another (the depthwise conv's
# kernel gradient alone 12.6 us or 66 us by the algorithm picked). The first process fills the cache (its
# compile time is the cold one); the one with --xla_gpu_autotune_level=0 runs cuDNN's heuristics instead.
CACHE="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/rnan_autotune"
rm -rf /tmp/rnan_autotune /tmp/rnan_profile
bench() {  # bench NAME KEEP_SECONDS XLA_FLAGS ARGS...: one benchmark.py process, its JSON in $OUT/jax_NAME.json
  local name=$1 keep=$2 flags=$3; shift 3
  echo "== JAX $name: XLA_FLAGS=$flags $* ($(left) s left)" | tee -a "$OUT/run.log"
  XLA_FLAGS="$flags" timeout "$(limit "$keep")" "$PY" tools/benchmark.py --output="$OUT/jax_$name.json" "${one[@]}" \
    "$@" 2>&1 | grep -v cuda_timer | tee -a "$OUT/run.log"
}
bench default 230 "$CACHE" --profile_dir=/tmp/rnan_profile  # the default knobs: cast once, remat convs
# Each GCRG's 20 RNA blocks unrolled, the groups' scan rolled: no per-block parameter slices, loop copies or
# residual stacking inside a group (on the CPU's HLO: copies 730 -> 50 a step, launches -11%).
bench blocks 170 "$CACHE" --scan_unroll=1:-1 --profile_dir=/tmp/rnan_profile
(cd /tmp/rnan_profile 2>/dev/null && find . -name perfetto_trace.json.gz | tar -cf "$OUT/traces.tar" -T -)
bench old 130 "$CACHE" --cast_params_once=false --remat=none  # the first session's step
bench unroll2 100 "$CACHE" --scan_unroll=2
bench cmdbuf 70 "$CACHE $COMMAND_BUFFER_FLAGS"
bench heuristics 30 "--xla_gpu_autotune_level=0"
[ "$(left)" -gt 40 ] && bench b64 0 "$CACHE" --batch_sizes=64 --dtypes=bfloat16,float32

rm -rf /tmp/rnan_gpu_last && mkdir -p /tmp/rnan_gpu_last && cp "$OUT"/jax*.json /tmp/rnan_gpu_last/ 2>/dev/null  # for gpu_train.sh
echo "== table ($(left) s left; $((SECONDS - start)) s used)"
tables=$(ls "$OUT"/jax*.json 2>/dev/null | paste -sd, -)
[ -n "$tables" ] && "$PY" tools/benchmark.py --table="$tables" --peer_log="$OUT/torch_b16.log" \
  | tee -a "$OUT/run.log"
# The device tool returns at most 8 files: the JSON records travel as one tar.
(cd "$OUT" && ls jax_*.json >/dev/null 2>&1 && tar -cf jax_json.tar jax_*.json && rm -f jax_*.json)
exit 0
