# Sourced by tools/gpu_check.sh and tools/gpu_train.sh on the GPU machine: installs the carried CPython 3.12
# wheels (.whl/) that its image lacks into /tmp/site and puts them and the checkout on PYTHONPATH. Needs $PY, $OUT.
# XLA:GPU command buffers (CUDA graphs) that also record the scan's while loops, so one graph launch replaces
# the loop's thousands of kernel launches; flag values as XLA's debug_options_flags.cc lists them.
COMMAND_BUFFER_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1"
if ! "$PY" -c "import grain, ml_collections, tensorboardX" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/run.log"; return 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
