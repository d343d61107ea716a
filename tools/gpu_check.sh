#!/usr/bin/env bash
# The prepared GPU benchmark on one H100/H200, at most 8.5 minutes (stages share RNAN_GPU_CHECK_BUDGET = 490 s),
# all at the paper setting (x4, batch 16 of 48x48, bfloat16): the PyTorch peer; then tools/benchmark.py
# processes of the default knobs (scans unrolled by 2, parameters cast once, remat convs), each compiling cold:
# XLA's autotuning as it comes (cache A), at level 0 (cuDNN's heuristics), at level 3 (no correctness
# checks); on cache A's picks: command buffers that record the loops, then unroll 2 and groups by 2 with their
# blocks unrolled in one process; if time is left, a second cold process as it comes (cache B). (Measured so far: tools/BENCHMARKS.md, from
# "Measured on one NVIDIA H200" on.)
# Logs, the JSON records (jax_json.tar), the autotuning caches (autotune.tar)
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

# XLA autotunes each convolution when it compiles and keeps its picks in a cache folder. Cold, on these
# machines, its timer warns "Delay kernel timed out" and the picks vary: the same step ran at 71.7 ms in one
# process and 104.6 in another, and compiled in 91 s cold (tools/BENCHMARKS.md, "Third GPU session"). XLA's
# autotuner times each candidate behind a delay kernel, which D2H copies of its correctness checks (autotune
# level 4, the default) can stall (openxla/xla#42415); level 3 skips those checks, level 0 autotunes nothing.
# So: a cold process of the default step (cache A), one at level 0, one at level 3 (cache C), the variants on
# cache A, and if time is left a second cold one at level 4 (cache B: do its picks and time match A's?).
# The caches come back in autotune.tar, to set beside the step times.
rm -rf /tmp/rnan_autotune_a /tmp/rnan_autotune_b /tmp/rnan_autotune_c
bench() {  # bench NAME KEEP_SECONDS XLA_FLAGS ARGS...: one benchmark.py process, its JSON in $OUT/jax_NAME.json
  local name=$1 keep=$2 flags=$3; shift 3
  echo "== JAX $name: XLA_FLAGS=$flags $* ($(left) s left)" | tee -a "$OUT/run.log"
  XLA_FLAGS="$flags" timeout "$(limit "$keep")" "$PY" tools/benchmark.py --output="$OUT/jax_$name.json" "${one[@]}" \
    "$@" 2>&1 | grep -v cuda_timer | tee -a "$OUT/run.log"
}
cache() { echo "--xla_gpu_per_fusion_autotune_cache_dir=/tmp/rnan_autotune_$1"; }
# A cold compile took about 90 s in the third session, so each cold stage keeps about 110 s for itself; the
# stages on cache A's picks compile in 10-20 s.
bench cold_a 250 "$(cache a)"  # the default knobs: unroll 2, cast once, remat convs
bench heuristics 170 "--xla_gpu_autotune_level=0"
bench level3 75 "$(cache c) --xla_gpu_autotune_level=3"
bench cmdbuf 40 "$(cache a) $COMMAND_BUFFER_FLAGS"  # command buffers that record the unrolled-by-2 loops too
bench variants 0 "$(cache a)" --scan_unroll=2,2:-1 --steps=6 --repeats=3
if [ "$(left)" -ge 110 ]; then bench cold_b 0 "$(cache b)"; fi  # a second cold process: do its picks match A's?
(cd /tmp && tar -cf "$OUT/autotune.tar" rnan_autotune_a rnan_autotune_b rnan_autotune_c 2>/dev/null)

rm -rf /tmp/rnan_gpu_last && mkdir -p /tmp/rnan_gpu_last && cp "$OUT"/jax*.json /tmp/rnan_gpu_last/ 2>/dev/null  # for gpu_train.sh
echo "== table ($(left) s left; $((SECONDS - start)) s used)"
tables=$(ls "$OUT"/jax*.json 2>/dev/null | paste -sd, -)
[ -n "$tables" ] && "$PY" tools/benchmark.py --table="$tables" --peer_log="$OUT/torch_b16.log" \
  | tee -a "$OUT/run.log"
# The device tool returns at most 8 files: the JSON records travel as one tar.
(cd "$OUT" && ls jax_*.json >/dev/null 2>&1 && tar -cf jax_json.tar jax_*.json && rm -f jax_*.json)
exit 0
