r"""Train-step and forward speed of rnan_jax on whatever device is present: printed, and written as JSON.

    python tools/benchmark.py --output=bench.json          # paper setting and batch 64, float32 and bfloat16
    python tools/benchmark.py --tiny --output=/tmp/b.json  # a tiny model, seconds on a CPU (what the test runs)
    python tools/benchmark.py --model=small --batch_sizes=16 --patch_size=32 --dtypes=float32 \
        --scan_unroll=1,-1 --depthwise=grouped,shifted --skip_forward --compile_only   # knob variants
    python tools/benchmark.py --table=bench.json --peer_log=torch.log  # markdown rows of earlier runs

Settings are the cross product of --batch_sizes, --dtypes, --scan_unroll, --depthwise, --cast_params_once,
--remat and --fusion_autotuner on the --model preset ("paper": the default x4 RNAN with 48x48 LR patches, so
batch 16 is the paper's setting). Per setting:
- compile: the train step jitted as the trainer does (a one-device "data" mesh, state and metrics donated),
  `lower` and `compile` timed apart; no persistent compilation cache is enabled here.
- step time: --repeats windows of --steps steps after --warmup steps, on one random uint8 batch kept on the
  device; a window ends in one `block_until_ready` and holds no other host sync. Reported: the median
  window's mean step time, the fastest and slowest window, patches/s.
- TFLOP/s from an analytic FLOP count: every conv's multiply-adds from the config (what the forward hooks of
  ../shared/peers/bench_torch.py count), 2 FLOPs each, times 3 for forward + backward (6 x MACs, the peer's
  convention). XLA's `cost_analysis()` flops are recorded beside it; they count a while loop's body once,
  so a rolled scan reads low.
- memory: `compiled.memory_analysis()` (arguments + outputs + temporaries - donated aliases: the step's
  peak as XLA plans it) and, where the device reports it (GPU, TPU), `memory_stats()["peak_bytes_in_use"]`
  (the high-water mark of the process so far, so it includes earlier settings).
- HLO: instructions of the optimized HLO that launch work (outside fused computations; parameters, tuples,
  bitcasts and control flow left out), counted once each (static) and per step (a while body times its
  known trip count), with their opcodes, fusion kinds and custom-call targets.
- --profile_dir: --profile_steps more steps of the first batch size under `jax.profiler.trace`, its device
  kernels summarized (count and time per step, the slowest kernels) and the Perfetto trace kept.
- peer (--peer, default on): the PyTorch peer (--peer_dir/rnan_torch.py) for the same model, batch and patch,
  float32, eager, NCHW and channels_last, when torch is installed: timed in the same windows, taking turns
  with the float32 train step window by window (a 0.1 s pause before each), so that load from elsewhere on
  a shared machine falls on both.
- forward: `api.apply` on one LR image of --forward_lr (270x480: a 1920x1080 output at x4), once per dtype,
  scan unroll and depthwise (what it depends on: not remat, cast_params_once, fusion_autotuner or
  batch_chunks), at batch 1, timed the same way (--forward_steps per window).
The measuring, the FLOP count and the table are `rnan_jax.bench`; the HLO, profile and memory summaries are
`rnan_jax.profiling`. This file holds the flags and runs the settings.
"""
from __future__ import annotations

import json
import os
import re
import sys
from functools import partial
from typing import Any, Callable

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # rnan_jax without an install
from rnan_jax import cli
from rnan_jax.bench import (PRESETS, bench_forward, bench_train_step, environment, forward_knobs,  # noqa: E402
                            forward_line, parse_unroll, peer_line, peer_steps, table, train_line)

# What --tiny sets, unless the flag is given too: a run of seconds on a CPU.
TINY = dict(model="tiny", batch_sizes=["2"], patch_size=12, dtypes=["float32"], warmup=1, steps=2,
            repeats=3, forward_lr="16x24", forward_steps=1)

_MODEL = flags.DEFINE_enum("model", "paper", list(PRESETS), "Model preset (paper: the default x4 RNAN).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "64"], "Batch sizes (16: the paper's).")
_PATCH = flags.DEFINE_integer("patch_size", 48, "LR patch side (48: the paper's).", lower_bound=1)
_SCALE = flags.DEFINE_enum("scale", "0", ["0", "2", "3", "4"], "Upscaling factor (0: the preset's; the paper preset "
                           "is x4).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters stay float32).")
_UNROLL = flags.DEFINE_list("scan_unroll", ["0"], "Scan unroll factors: 0 the backend's default, -1 full, n; "
                            "n:m the GCRGs' scan by n and each GCRG's RNA-block scan by m (1:-1: blocks unrolled).")


def _unroll_values_parse(values: list[str]) -> bool:
    """Whether every --scan_unroll value is "n" or "n:m" (`parse_unroll`)."""
    try:
        for value in values:
            parse_unroll(value)
    except ValueError:
        return False
    return True


def _one_of(*choices: str) -> Callable[[list[str]], bool]:
    return lambda values: all(v.strip() in choices for v in values)


flags.register_validator("scan_unroll", _unroll_values_parse, "each value must be an integer n or a pair n:m")
cli.require_ints("batch_sizes")
flags.register_validator("dtypes", _one_of("float32", "bfloat16", "float16"),
                         "each value must be float32, bfloat16 or float16")
_DEPTHWISE = flags.DEFINE_list("depthwise", ["auto"], "Depthwise conv: auto (backend default), grouped, shifted.")
flags.register_validator("depthwise", _one_of("auto", "grouped", "shifted"),
                         "each value must be auto, grouped or shifted")
_CHUNKS = flags.DEFINE_integer("batch_chunks", 0, "execution.batch_chunks: 0 the trainer's default on one device "
                                "(CPU: 2 chunks of an even batch; 4 without the native kernels), n: gradients "
                                "of n parts of the batch.", lower_bound=0)
_CAST_ONCE = flags.DEFINE_list("cast_params_once", ["auto"], "auto (backend default), false, true or several: cast "
                               "the parameters to the compute dtype once per step (execution.cast_params_once).")
_REMAT = flags.DEFINE_list("remat", ["auto"], "What the backward recomputes of each RNA block (execution.remat): "
                           "auto (backend default), none, block, convs.")
_FUSION_AUTOTUNER = flags.DEFINE_list("fusion_autotuner", ["auto"], "auto (backend default), false, true or several: "
                                      "XLA:GPU's fusion autotuner when the step compiles (execution.fusion_autotuner).")
flags.register_validator("cast_params_once", _one_of("auto", "true", "false"), "each value must be auto, true or false")
flags.register_validator("fusion_autotuner", _one_of("auto", "true", "false"), "each value must be auto, true or false")
flags.register_validator("remat", _one_of("auto", "none", "block", "convs"),
                         "each value must be auto, none, block or convs")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before timing.", lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows; the median window is reported.", lower_bound=1)
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile and count, run nothing.")
_SKIP_FORWARD = flags.DEFINE_bool("skip_forward", False, "Skip the forward timing (slow on a CPU).")
_FORWARD_LR = flags.DEFINE_string("forward_lr", "270x480", "LR size HxW of the forward timing.")
flags.register_validator("forward_lr", lambda v: bool(re.fullmatch(r"[1-9]\d*[xX][1-9]\d*", v)),
                         "must be HxW, e.g. 270x480")
_FORWARD_STEPS = flags.DEFINE_integer("forward_steps", 3, "Forward passes per timed window.", lower_bound=1)
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Trace --profile_steps steps of the first batch size here.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.", lower_bound=1)
_TINY = flags.DEFINE_bool("tiny", False, f"Preset for a quick CPU run: {TINY}.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file written (after every setting, so a cut run keeps some).")
_TABLE = flags.DEFINE_list("table", [], "Print markdown rows for these JSON files and exit.")
_PEER_LOG = flags.DEFINE_string("peer_log", "", "With --table: bench_torch.py's outputs (comma-separated; a name "
                                 "with _b<N> gives its batch, else 16), for their rows.")
_PEER = flags.DEFINE_bool("peer", True, "Also time the PyTorch peer's train step for the same model and batch in "
                          "this run (CPU: NCHW and channels_last), when torch and --peer_dir's rnan_torch.py exist.")
_PEER_DIR = flags.DEFINE_string("peer_dir", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "peers"), "Folder holding rnan_torch.py (the PyTorch peer).")


def _write(path: str, results: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def _apply_tiny_preset() -> None:
    for name, value in TINY.items():
        if not flags.FLAGS[name].present:
            flags.FLAGS[name].value = value


def _attempt(results: dict, what: dict, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the failure recorded in results["errors"] (an out-of-memory batch must not cost
    the other settings)."""
    try:
        return fn()
    except Exception as e:
        results["errors"].append({**what, "error": f"{type(e).__name__}: {e}"[:2000]})
        print(f"FAILED {what}: {results['errors'][-1]['error'][:300]}", flush=True)
        return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _TABLE.value:
        try:
            print(table(_TABLE.value, _PEER_LOG.value))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a missing or foreign file
            sys.exit(f"benchmark: --table: cannot read {_TABLE.value} as benchmark.py's JSON output "
                     f"({type(e).__name__}: {e})")
        return
    if _OUTPUT.value:  # found now, not after the first setting's minutes
        try:
            if os.path.isdir(_OUTPUT.value):
                raise IsADirectoryError(f"{_OUTPUT.value}: is a folder")
            os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        except OSError as e:
            sys.exit(f"benchmark: cannot write --output: {e}")
    if _TINY.value:
        _apply_tiny_preset()
    from rnan_jax import env

    env.reuse_freed_memory()  # as the trainer runs: a fresh mmap per step would cost a third of a CPU step
    import jax

    from rnan_jax.configs import ExecutionConfig
    from rnan_jax.model import RNANConfig

    h, w = (int(v) for v in _FORWARD_LR.value.lower().split("x"))
    results = {"env": environment(), "flop_count": "analytic: 6 x conv multiply-adds of the config per patch "
               "(forward 2, backward 4; bench_torch.py's convention); xla_cost_flops: compiled.cost_analysis()",
               "train": [], "forward": [], "peer": [], "errors": []}
    peer_done: set[tuple[int, int]] = set()
    forward_done: set[tuple[str, str, str]] = set()  # forward_knobs: one forward for the train settings it serves
    print(json.dumps(results["env"]), flush=True)
    for unroll in _UNROLL.value:
        casts = [ExecutionConfig(cast_params_once=v.strip()).cast_once for v in _CAST_ONCE.value]
        tuners = [ExecutionConfig(fusion_autotuner=v.strip()).autotune_fusions for v in _FUSION_AUTOTUNER.value]
        for depthwise, remat, cast, tuner in ((d, r, c, t) for t in tuners for d in _DEPTHWISE.value for c in casts
                                              for r in _REMAT.value):
            for dtype in _DTYPES.value:
                config = RNANConfig(**{**PRESETS[_MODEL.value], "dtype": dtype,
                                       **({"scale": int(_SCALE.value)} if _SCALE.value != "0" else {})})
                what = dict(model=_MODEL.value, dtype=dtype, scan_unroll=unroll, depthwise=depthwise, remat=remat,
                            cast_params_once=cast, fusion_autotuner=tuner)
                params = None
                for i, batch in enumerate(int(b) for b in _BATCH_SIZES.value):
                    peers = []  # the peer's steps, timed in alternation with ours (once per batch and patch)
                    if (_PEER.value and dtype == "float32" and not _COMPILE_ONLY.value
                            and (batch, _PATCH.value) not in peer_done):
                        peer_done.add((batch, _PATCH.value))
                        peers = _attempt(results, {"peer": True, "batch": batch}, partial(
                            peer_steps, config, batch, _PATCH.value, peer_dir=_PEER_DIR.value)) or []
                    out = _attempt(results, {**what, "batch": batch}, partial(
                        bench_train_step, config, batch, _PATCH.value, unroll, depthwise, warmup=_WARMUP.value,
                        steps=_STEPS.value, repeats=_REPEATS.value, compile_only=_COMPILE_ONLY.value,
                        profile_dir=_PROFILE_DIR.value if i == 0 else "", profile_steps=_PROFILE_STEPS.value,
                        cast_params_once=cast, batch_chunks=_CHUNKS.value, remat=remat, fusion_autotuner=tuner,
                        peers=peers))
                    if peers:
                        peers[0][1].close()
                    if out is not None:
                        record, params = out
                        peer_records = record.pop("peers", [])
                        results["train"].append({"model": _MODEL.value, **record})
                        print(train_line(record), flush=True)
                        for r in peer_records:
                            results["peer"].append({"model": _MODEL.value, **r})
                            print(peer_line(r), flush=True)
                    _write(_OUTPUT.value, results)
                # params: the train step resolved these knobs; a forward that an earlier setting measured is
                # not measured again
                if (params is not None and not (_SKIP_FORWARD.value or _COMPILE_ONLY.value)
                        and forward_knobs(config, unroll, depthwise) not in forward_done):
                    forward_done.add(forward_knobs(config, unroll, depthwise))
                    record = _attempt(results, {**what, "forward_lr": [h, w]}, partial(
                        bench_forward, config, params, (h, w), unroll, depthwise, warmup=1,
                        steps=_FORWARD_STEPS.value, repeats=3))
                    if record is not None:
                        results["forward"].append(record)
                        print(forward_line(record), flush=True)
                    _write(_OUTPUT.value, results)
                del params
                jax.clear_caches()
    if _OUTPUT.value:
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
