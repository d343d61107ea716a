#!/usr/bin/env bash
# The paper's model (experiments/classic291.py, x2) trained on one GPU for a fixed RNAN_GPU_TRAIN_S seconds
# (default 200), then scored on Set5 and Set14 by rnan_jax.evaluate. Run right after tools/gpu_check.sh on
# the same warm machine: dtype, command buffers, scan unrolling, parameter casting and remat are the fastest in
# its results (/tmp/rnan_gpu_last/jax*.json), and the cosine schedule is sized to the steps that fit at its step
# time.
# Data: .gpudata/ (git-ignored) holds benchmark/{Set5,Set14} and train/{T91,BSD200} from ../shared/data
# (BSD200: its first 120 images by name, to keep the carried tree under 64 MiB).
#   run(command="bash tools/gpu_train.sh", carry=[".whl", ".gpudata"], timeout_s=...)
# Dry run on a CPU (a tiny model, about 2 minutes):
#   RNAN_GPU_CHECK_TINY=1 RNAN_GPU_TRAIN_S=60 OUT=/tmp/gpu_train PYTHON=.venv/bin/python bash tools/gpu_train.sh
set -uo pipefail
OUT="${OUT:-/tmp/rnan_gpu_train}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TRAIN_S="${RNAN_GPU_TRAIN_S:-200}"
export PYTHONUNBUFFERED=1 RNAN_DATA_DIR="$PWD/.gpudata" RNAN_CACHE_DIR=/tmp/rnan_cache
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
extra=()
if [ -n "${RNAN_GPU_CHECK_TINY:-}" ]; then
  export JAX_PLATFORMS=cpu
  extra=(--config.model.features=16 --config.model.num_groups=1 --config.model.num_blocks=2
         --config.data.val_max_images=2)
fi
source tools/gpu_env.sh || exit 1

# Knobs and run length from gpu_check's measurements: the faster dtype at batch 16 (float32 when unknown),
# command buffers if they beat that; steps = the seconds left after start-up (about 60 s) over the step time.
read -r DTYPE USE_CMDBUF CAST REMAT UNROLL BLOCK_UNROLL FUSION STEPS < <("$PY" - "$TRAIN_S" <<'PYEOF'
import glob, json, sys
train_s = float(sys.argv[1])
# (ms, dtype, command buffers, cast once, remat, scan_unroll, block_unroll, fusion autotuner): "auto"/0 while
# nothing is measured
best = (150.0, "float32", 0, "auto", "auto", 0, 0, "auto")
config_value = {"full": -1}  # a record's unroll name ("2", "full", "1+full") as execution.* takes it
for path in glob.glob("/tmp/rnan_gpu_last/jax*.json"):
    res = json.load(open(path))
    cmdbuf = int("command_buffer" in res["env"].get("xla_flags", ""))
    for r in res.get("train", []):
        if r["batch"] == 16 and r.get("step_ms") and r["depthwise"] == "grouped":
            groups, _, blocks = str(r["scan_unroll"]).partition("+")
            unroll = [int(config_value.get(v, v)) for v in (groups, blocks or "0")]
            best = min(best, (r["step_ms"], r["dtype"], cmdbuf, str(bool(r.get("cast_params_once"))).lower(),
                              r.get("remat", "none"), *unroll,
                              "false" if r.get("compiler_options", {}).get(
                                  "xla_gpu_experimental_enable_fusion_autotuner") is False else "auto"))
ms, dtype, cmdbuf, cast, remat, unroll, block_unroll, fusion = best
print(dtype, cmdbuf, cast, remat, unroll, block_unroll, fusion, max(100, int((train_s - 60) / (ms / 1000) * 0.9)))
PYEOF
)
echo "== training: dtype $DTYPE, command buffers $USE_CMDBUF, parameters cast once $CAST, remat $REMAT," \
  "scan unroll $UNROLL (blocks $BLOCK_UNROLL), fusion autotuner $FUSION, $STEPS steps in at most $TRAIN_S s"
[ "$USE_CMDBUF" = 1 ] && export XLA_FLAGS="$COMMAND_BUFFER_FLAGS"
extra+=(--config.execution.cast_params_once="$CAST" --config.execution.remat="$REMAT"
        --config.execution.scan_unroll="$UNROLL" --config.execution.block_unroll="$BLOCK_UNROLL"
        --config.execution.fusion_autotuner="$FUSION")
WARMUP=$((STEPS / 10 < 100 ? STEPS / 10 : 100))  # under total_steps, which the config requires
rm -rf /tmp/run291
start=$SECONDS
timeout -s TERM -k 60 "$TRAIN_S" "$PY" -m rnan_jax.train --config experiments/classic291.py --workdir /tmp/run291 \
  --config.total_steps="$STEPS" --config.optim.schedule=cosine --config.optim.lr=2e-4 \
  --config.optim.warmup_steps="$WARMUP" --config.eval_every="$STEPS" --config.checkpoint_every=100000 \
  --config.log_every=100 --config.data.num_workers=8 --config.model.dtype="$DTYPE" "${extra[@]}" 2>&1 \
  | tee "$OUT/train.log"
echo "== trained for $((SECONDS - start)) s" | tee -a "$OUT/train.log"
cp /tmp/run291/metrics.jsonl "$OUT/" 2>/dev/null
echo "== evaluate Set5, Set14"
"$PY" -m rnan_jax.evaluate --checkpoint /tmp/run291 --datasets Set5,Set14 --output "$OUT/eval" --noprogress 2>&1 \
  | tee "$OUT/eval.log"
exit 0
