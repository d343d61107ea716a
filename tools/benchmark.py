"""Train-step and forward speed of rnan_jax on whatever device is present: printed, and written as JSON.

    python tools/benchmark.py --output=bench.json          # paper setting and batch 64, float32 and bfloat16
    python tools/benchmark.py --tiny --output=/tmp/b.json  # a tiny model, seconds on a CPU (what the test runs)
    python tools/benchmark.py --model=small --batch_sizes=16 --patch_size=32 --dtypes=float32 \
        --scan_unroll=1,-1 --depthwise=grouped,shifted --skip_forward --compile_only   # knob variants
    python tools/benchmark.py --table=bench.json --peer_log=torch.log  # markdown rows of earlier runs

Settings are the cross product of --batch_sizes, --dtypes, --scan_unroll and --depthwise on the --model
preset ("paper": the default x4 RNAN with 48x48 LR patches, so batch 16 is the paper's setting). Per setting:
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
  float32, eager, NCHW and channels_last, timed the same way, when torch is installed.
- forward: `api.apply` on one LR image of --forward_lr (270x480: a 1920x1080 output at x4), per dtype and
  knobs, at batch 1, timed the same way (--forward_steps per window).
"""
from __future__ import annotations

import collections
import gzip
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
from functools import partial
from typing import Any, Callable, Sequence

from absl import app, flags

PRESETS = {
    "paper": {},
    "small": dict(scale=2, features=32, num_groups=2, num_blocks=3),  # ../shared/DESIGN.md's CPU table
    "small_x2": dict(scale=2, features=48, num_groups=2, num_blocks=3),  # zoo:small_x2 (experiments/small291.py)
    "tiny": dict(scale=4, features=16, num_groups=2, num_blocks=2),
}
# What --tiny sets, unless the flag is given too: a run of seconds on a CPU.
TINY = dict(model="tiny", batch_sizes=["2"], patch_size=12, dtypes=["float32"], warmup=1, steps=2,
            repeats=3, forward_lr="16x24", forward_steps=1)

_MODEL = flags.DEFINE_enum("model", "paper", list(PRESETS), "Model preset (paper: the default x4 RNAN).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "64"], "Batch sizes (16: the paper's).")
_PATCH = flags.DEFINE_integer("patch_size", 48, "LR patch side (48: the paper's).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters stay float32).")
_UNROLL = flags.DEFINE_list("scan_unroll", ["0"], "Scan unroll factors: 0 the backend's default, -1 full, n.")
_DEPTHWISE = flags.DEFINE_list("depthwise", ["auto"], "Depthwise conv: auto (backend default), grouped, shifted.")
_CAST_ONCE = flags.DEFINE_bool("cast_params_once", False, "Cast the parameters to the compute dtype once per "
                               "step (execution.cast_params_once) instead of per block inside the scan.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before timing.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows; the median window is reported.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile and count, run nothing.")
_SKIP_FORWARD = flags.DEFINE_bool("skip_forward", False, "Skip the forward timing (slow on a CPU).")
_FORWARD_LR = flags.DEFINE_string("forward_lr", "270x480", "LR size HxW of the forward timing.")
_FORWARD_STEPS = flags.DEFINE_integer("forward_steps", 3, "Forward passes per timed window.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Trace --profile_steps steps of the first batch size here.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
_TINY = flags.DEFINE_bool("tiny", False, f"Preset for a quick CPU run: {TINY}.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file written (after every setting, so a cut run keeps some).")
_TABLE = flags.DEFINE_list("table", [], "Print markdown rows for these JSON files and exit.")
_PEER_LOG = flags.DEFINE_string("peer_log", "", "With --table: bench_torch.py's outputs (comma-separated; a name "
                                 "with _b<N> gives its batch, else 16), for their rows.")
_PEER = flags.DEFINE_bool("peer", True, "Also time the PyTorch peer's train step for the same model and batch in "
                          "this run (CPU: NCHW and channels_last), when torch and --peer_dir's rnan_torch.py exist.")
_PEER_DIR = flags.DEFINE_string("peer_dir", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "peers"), "Folder holding rnan_torch.py (the PyTorch peer).")


def forward_macs(config, h: int, w: int) -> int:
    """Multiply-adds of every conv in one forward pass on one h x w LR image (depthwise: 9 per output)."""
    c, g, b = config.features, config.num_groups, config.num_blocks
    area = h * w
    block = area * (2 * 9 * c * c + 9 * c + c * c)  # c1, c2, depthwise dc, pointwise pc
    cr = c // config.gc_reduction
    gc = area * c + c * cr + cr * c  # attention logits, then the bottleneck on one position
    group = b * block + area * ((b // config.block_interval) * c * c + 9 * c * c) + gc
    fusion = area * ((g // config.group_interval) * c * c + 9 * c * c)
    total = area * 9 * 3 * c + g * group + fusion  # head, groups, global fusion
    side = 1
    for s in config.upsample_stages:
        total += area * side * side * 9 * c * c * s * s
        side *= s
    return total + area * side * side * 9 * c * 3  # the reconstruction conv


def train_flops(config, batch: int, patch: int) -> float:
    """FLOPs of one train step by the peer's convention: 6 x forward MACs (forward 2, backward 4)."""
    return 6.0 * batch * forward_macs(config, patch, patch)


_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
              "after-all", "add-dependency", "opt-barrier", "domain", "partition-id", "replica-id"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")


def _opcode(rest: str) -> str:
    """The opcode after the shape in `shape opcode(operands), attributes` (a tuple shape has parentheses)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    return rest.strip().split("(", 1)[0].strip()


def hlo_stats(text: str) -> dict[str, Any]:
    """Counts of work-launching instructions in an optimized HLO module's text (`compiled.as_text()`).

    Walks the computations reachable from ENTRY through while bodies and conditions, calls and conditional
    branches (not into fused computations or reducers). `static` counts each instruction once; `per_step`
    multiplies a while body's instructions by its known trip count (1 where XLA knows none, counted in
    `unknown_trip_counts`). `convolutions` counts convolution instructions anywhere, fused ones included.
    """
    computations: dict[str, list[tuple[str, str]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith(" "):
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            computations[current].append((_opcode(m.group(1)), line))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    static, per_step = collections.Counter(), collections.Counter()
    fusion_kinds, targets = collections.Counter(), collections.Counter()
    stats = {"while_loops": 0, "unknown_trip_counts": 0}

    def walk(name: str, times: int, seen: tuple[str, ...]) -> None:
        if name in seen or name not in computations:
            return
        for op, line in computations[name]:
            if op == "while":
                stats["while_loops"] += 1
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                stats["unknown_trip_counts"] += trip is None
                n = int(trip.group(1)) if trip else 1
                for key, runs in (("condition", n + 1), ("body", n)):
                    callee = re.search(key + r"=%?([\w.\-]+)", line)
                    if callee:
                        walk(callee.group(1), times * runs, seen + (name,))
                continue
            if op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)",
                                         line) + re.findall(r"branch_computations=\{([^}]*)\}", line):
                    for c in callee.split(","):
                        walk(c.strip().lstrip("%"), times, seen + (name,))
                continue
            if op in _NO_KERNEL:
                continue
            static[op] += 1
            per_step[op] += times
            if op == "fusion":
                kind = re.search(r"kind=(\w+)", line)
                fusion_kinds[kind.group(1) if kind else "?"] += times
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                targets[target.group(1) if target else "?"] += times

    walk(entry, 1, ())
    return {"static": sum(static.values()), "per_step": sum(per_step.values()),
            "while_loops": stats["while_loops"], "unknown_trip_counts": stats["unknown_trip_counts"],
            "convolutions": sum(op == "convolution" for ins in computations.values() for op, _ in ins),
            "opcodes_per_step": dict(per_step.most_common()), "fusion_kinds_per_step": dict(fusion_kinds),
            "custom_call_targets_per_step": dict(targets)}


def profile_summary(trace: dict, steps: int, top: int = 15) -> dict[str, Any]:
    """Device kernels in a Perfetto/Chrome trace (`jax.profiler.trace(..., create_perfetto_trace=True)`).

    Device events are those of processes named like "/device:GPU:0" (the host's are left out). Per thread
    (stream): events and busy milliseconds per step; over the threads named "Stream ..." (all device
    threads where none is so named): kernels per step, busy time per step and the `top` kernels by time.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e.get("args", {}).get("name", "")
    device = {p for p, n in processes.items() if n.startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in device]
    per_thread = collections.defaultdict(lambda: [0, 0.0])
    for e in spans:
        key = f"{processes[e['pid']]} {threads.get((e['pid'], e['tid']), e['tid'])}"
        per_thread[key][0] += 1
        per_thread[key][1] += e.get("dur", 0.0)
    streams = [e for e in spans if str(threads.get((e["pid"], e["tid"]), "")).startswith("Stream")] or spans
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in streams:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e.get("dur", 0.0)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "device_events": len(spans),
        "threads": {k: {"events_per_step": n / steps, "busy_ms_per_step": us / steps / 1e3}
                    for k, (n, us) in sorted(per_thread.items())},
        "kernels_per_step": len(streams) / steps,
        "kernel_ms_per_step": sum(e.get("dur", 0.0) for e in streams) / steps / 1e3,
        "top_kernels": [{"name": name[:160], "calls_per_step": n / steps, "ms_per_step": us / steps / 1e3}
                        for name, (n, us) in ranked],
    }


def _windows(run: Callable[[], Any], warmup: int, steps: int, repeats: int) -> list[float]:
    """Seconds per call of `run` in `repeats` windows of `steps` calls; one sync at each window's end."""
    import jax

    out = None
    for _ in range(warmup):
        out = run()
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps)
    return times


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def _memory(compiled) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                         + out["temp_size_in_bytes"])
    return out


def _device_peak(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _knobs(unroll: int, depthwise: str, config) -> tuple[Any, Any, str, str]:
    """(scan_unroll, depthwise) as the step takes them, and as resolved for the record."""
    from rnan_jax import api

    default_unroll, default_impl = api.default_knobs(config=config)
    value = None if unroll == 0 else (True if unroll < 0 else unroll)
    impl = None if depthwise == "auto" else depthwise
    resolved = default_unroll if value is None else value
    return value, impl, "full" if resolved is True else str(resolved), impl or default_impl


def _trace_window(run: Callable[[], Any], steps: int, directory: str, name: str) -> dict[str, Any]:
    import jax

    target = os.path.join(directory, name)
    with jax.profiler.trace(target, create_perfetto_trace=True):
        out = None
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
    found = sorted(glob.glob(os.path.join(target, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        return {"error": f"no perfetto_trace.json.gz under {target}"}
    with gzip.open(found[-1], "rt") as f:
        summary = profile_summary(json.load(f), steps)
    summary["trace"] = found[-1]
    return summary


def bench_train_step(config, batch: int, patch: int, unroll: int, depthwise: str, *, warmup: int, steps: int,
                     repeats: int, compile_only: bool = False, profile_dir: str = "",
                     profile_steps: int = 3) -> tuple[dict, Any]:
    """One setting's record, and the parameters (for the forward timing)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from rnan_jax import api, step

    scan_unroll, impl, unroll_name, impl_name = _knobs(unroll, depthwise, config)
    optim = step.OptimConfig()  # the paper's Adam and schedule
    chunks = step.default_batch_chunks(batch, 1)  # what the trainer runs on one device
    spec = step.StepSpec(config, optim, scan_unroll, impl, chunks, _CAST_ONCE.value)
    device = jax.devices()[0]
    mesh = Mesh(np.array([device]), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.jit(partial(step.create_state, spec=spec), out_shardings=replicated)(jax.random.key(0))
    rng = np.random.default_rng(0)
    s = config.scale
    host = {"lr": rng.integers(0, 256, (batch, patch, patch, 3), np.uint8),
            "hr": rng.integers(0, 256, (batch, s * patch, s * patch, 3), np.uint8)}
    data = {k: jax.device_put(v, sharded) for k, v in host.items()}
    acc = jax.device_put(step.empty_metrics(), replicated)
    jitted = jax.jit(partial(step.train_step, spec=spec), in_shardings=(replicated, sharded, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=(0, 2))
    start = time.perf_counter()
    lowered = jitted.lower(state, data, acc)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = train_flops(config, batch, patch)
    memory = _memory(compiled)
    record = dict(scale=s, features=config.features,
                  num_groups=config.num_groups, num_blocks=config.num_blocks, params=api.count_params(state.params),
                  batch=batch, patch=patch, dtype=config.dtype, scan_unroll=unroll_name, depthwise=impl_name,
                  batch_chunks=chunks, cast_params_once=_CAST_ONCE.value,
                  lower_s=lower_s, compile_s=compile_s, train_flop_per_step=flops,
                  xla_cost_flops=_cost_flops(compiled), memory=memory, peak_memory_bytes=memory.get("peak_bytes"),
                  hlo=hlo_stats(compiled.as_text()))
    if compile_only:
        return record, state.params

    carry = {"state": state, "acc": acc}

    def run():
        carry["state"], carry["acc"] = compiled(carry["state"], data, carry["acc"])
        return carry["state"], carry["acc"]

    times = _windows(run, warmup, steps, repeats)
    step_s = statistics.median(times)
    metrics = jax.device_get(carry["acc"])
    record.update(step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                  timed_steps=steps * repeats, patches_per_s=batch / step_s, tflops=flops / step_s / 1e12,
                  device_peak_bytes_in_use=_device_peak(device),
                  mean_loss=float(metrics["loss"] / max(metrics["steps"] - metrics["nonfinite"], 1)),
                  nonfinite_steps=int(metrics["nonfinite"]))
    if profile_dir:
        name = f"train_b{batch}_{config.dtype}_{unroll_name}_{impl_name}"
        try:
            record["profile"] = _trace_window(run, profile_steps, profile_dir, name)
        except Exception as e:  # the timings above stand without it
            record["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return record, carry["state"].params


def bench_forward(config, params: Any, lr_hw: tuple[int, int], unroll: int, depthwise: str, *, warmup: int,
                  steps: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from rnan_jax import api

    scan_unroll, impl, unroll_name, impl_name = _knobs(unroll, depthwise, config)
    h, w = lr_hw
    lr = jax.device_put(np.random.default_rng(1).random((1, h, w, 3), np.float32))
    jitted = jax.jit(partial(api.apply, config=config, scan_unroll=scan_unroll, depthwise=impl))
    start = time.perf_counter()
    compiled = jitted.lower(params, lr).compile()
    compile_s = time.perf_counter() - start
    times = _windows(lambda: compiled(params, lr), warmup, steps, repeats)
    fwd_s = statistics.median(times)
    flops = 2.0 * forward_macs(config, h, w)
    memory = _memory(compiled)
    return dict(dtype=config.dtype, scan_unroll=unroll_name, depthwise=impl_name, lr_hw=[h, w],
                sr_hw=[h * config.scale, w * config.scale], compile_s=compile_s, forward_ms=fwd_s * 1e3,
                forward_ms_min=min(times) * 1e3, forward_ms_max=max(times) * 1e3, flop=flops,
                tflops=flops / fwd_s / 1e12, megapixels_per_s=h * w * config.scale ** 2 / fwd_s / 1e6,
                memory=memory, peak_memory_bytes=memory.get("peak_bytes"))


def environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return dict(platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
                python=platform.python_version(), cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                time=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv))


def _write(path: str, results: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def train_line(r: dict) -> str:
    return (f"train b{r['batch']} {r['patch']}x{r['patch']} x{r['scale']} {r['dtype']} unroll={r['scan_unroll']} "
            f"depthwise={r['depthwise']} chunks={r.get('batch_chunks', 1)}"
            f"{' cast once' if r.get('cast_params_once') else ''}: {_fmt(r.get('step_ms'), '.2f')} ms/step "
            f"({_fmt(r.get('patches_per_s'), '.1f')} patches/s, {_fmt(r.get('tflops'), '.3f')} TFLOP/s of "
            f"{r['train_flop_per_step'] / 1e12:.4f} TFLOP), compile {r['lower_s']:.1f}+{r['compile_s']:.1f} s, "
            f"peak {_mib(r['peak_memory_bytes'])} (XLA plan), {r['hlo']['per_step']} kernel launches/step "
            f"({r['hlo']['static']} in the HLO)")


def forward_line(r: dict) -> str:
    return (f"forward {r['lr_hw'][0]}x{r['lr_hw'][1]} -> {r['sr_hw'][0]}x{r['sr_hw'][1]} {r['dtype']} "
            f"unroll={r['scan_unroll']} depthwise={r['depthwise']}: {r['forward_ms']:.1f} ms "
            f"({r['tflops']:.3f} TFLOP/s), compile {r['compile_s']:.1f} s, peak {_mib(r['peak_memory_bytes'])}")


def table(paths: Sequence[str], peer_log: str = "") -> str:
    """Markdown rows: every train and forward record in `paths`, then the peer's SUMMARY from `peer_log`."""
    lines = ["| run | setting | dtype | knobs | ms/step | patches/s | TFLOP/s | compile s | peak GiB | launches/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    profiles = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        env = res["env"]
        run = f"{env['device_kind']}, jax {env['jax']}" + (f", XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags") else "")
        for r in res.get("train", []):
            mem = r.get("device_peak_bytes_in_use") or r["peak_memory_bytes"]
            lines.append(f"| {run} | train b{r['batch']} {r['patch']}px x{r['scale']} | {r['dtype']} | "
                         f"{r['scan_unroll']}/{r['depthwise']}{'/cast once' if r.get('cast_params_once') else ''} | "
                         f"{_fmt(r.get('step_ms'), '.1f')} | "
                         f"{_fmt(r.get('patches_per_s'), '.0f')} | {_fmt(r.get('tflops'), '.2f')} | "
                         f"{r['lower_s'] + r['compile_s']:.1f} | {_gib(mem)} | {r['hlo']['per_step']} |")
        for r in res.get("forward", []):
            lines.append(f"| {run} | forward {r['lr_hw'][0]}x{r['lr_hw'][1]} -> {r['sr_hw'][0]}x{r['sr_hw'][1]} | "
                         f"{r['dtype']} | {r['scan_unroll']}/{r['depthwise']} | {r['forward_ms']:.1f} | - | "
                         f"{r['tflops']:.2f} | {r['compile_s']:.1f} | {_gib(r['peak_memory_bytes'])} | - |")
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        for r in res.get("train", []):
            p = r.get("profile")
            if p and "error" not in p and not p["device_events"]:
                profiles.append(f"- profile b{r['batch']} {r['dtype']}: no device events in the trace (a CPU run)")
            elif p and "error" not in p:
                top = "; ".join(f"{k['name'][:60]} {k['ms_per_step']:.2f} ms ({k['calls_per_step']:g}x)"
                                for k in p["top_kernels"][:6])
                profiles.append(f"- profile b{r['batch']} {r['dtype']} {r['scan_unroll']}/{r['depthwise']}: "
                                f"{p['kernels_per_step']:.0f} kernels/step, {p['kernel_ms_per_step']:.1f} ms busy/step; "
                                f"top: {top}")
            elif p:
                profiles.append(f"- profile b{r['batch']} {r['dtype']}: {p['error']}")
        for e in res.get("errors", []):
            profiles.append(f"- failed: {json.dumps(e)[:300]}")
    for log in filter(os.path.isfile, peer_log.split(",") if peer_log else []):
        with open(log) as f:
            text = f.read()
        summary = [line for line in text.splitlines() if line.startswith("SUMMARY ")]
        named = re.search(r"_b(\d+)", os.path.basename(log))
        batch = int(named.group(1)) if named else 16
        for r in json.loads(summary[-1][len("SUMMARY "):]) if summary else []:
            lines.append(f"| PyTorch peer | train b{batch} 48px x4 | {r['name']} | - | {r['ms']} | "
                         f"{batch / r['ms'] * 1e3:.0f} | {r['tflops']} | - | - | - |")
    return "\n".join(lines + profiles)


def _apply_tiny_preset() -> None:
    for name, value in TINY.items():
        if not flags.FLAGS[name].present:
            flags.FLAGS[name].value = value


def bench_peer(config, batch: int, patch: int, *, warmup: int, steps: int, repeats: int) -> list[dict]:
    """The PyTorch peer's train step (forward, L1, backward, Adam) for `config` at batch x patch, float32, on
    this machine's device, timed like ours (median of `repeats` windows); [] without torch or the peer."""
    try:
        import torch
    except ImportError:
        return []
    if not os.path.isfile(os.path.join(_PEER_DIR.value, "rnan_torch.py")):
        return []
    sys.path.insert(0, _PEER_DIR.value)
    try:
        from rnan_torch import RNAN as TorchRNAN
    finally:
        sys.path.remove(_PEER_DIR.value)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = config.scale
    out = []
    for layout in ("nchw", "channels_last"):
        torch.manual_seed(0)
        model = TorchRNAN(scale=s, c=config.features, n_groups=config.num_groups, n_blocks=config.num_blocks,
                          group_interval=config.group_interval, block_interval=config.block_interval,
                          r=config.gc_reduction).to(dev)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = torch.rand(batch, 3, patch, patch, device=dev).to(memory_format=fmt)
        y = torch.rand(batch, 3, s * patch, s * patch, device=dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            loss = (model(x) - y).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def run():
            for _ in range(steps):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()

        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) / steps * 1e3)
        out.append({"peer": f"torch {torch.__version__} eager float32 {layout}", "device": dev,
                    "threads": torch.get_num_threads(), "batch": batch, "patch": patch,
                    "step_ms": statistics.median(times), "step_ms_min": min(times), "step_ms_max": max(times)})
    return out


def peer_line(r: dict) -> str:
    return (f"peer b{r['batch']} {r['patch']}x{r['patch']} {r['peer']} ({r['device']}, {r['threads']} threads): "
            f"{r['step_ms']:.2f} ms/step (windows {r['step_ms_min']:.2f}-{r['step_ms_max']:.2f})")


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
        print(table(_TABLE.value, _PEER_LOG.value))
        return
    if _TINY.value:
        _apply_tiny_preset()
    import jax

    from rnan_jax.model import RNANConfig

    h, w = (int(v) for v in _FORWARD_LR.value.lower().split("x"))
    results = {"env": environment(), "flop_count": "analytic: 6 x conv multiply-adds of the config per patch "
               "(forward 2, backward 4; bench_torch.py's convention); xla_cost_flops: compiled.cost_analysis()",
               "train": [], "forward": [], "peer": [], "errors": []}
    peer_done: set[tuple[int, int]] = set()
    print(json.dumps(results["env"]), flush=True)
    for unroll in (int(u) for u in _UNROLL.value):
        for depthwise in _DEPTHWISE.value:
            for dtype in _DTYPES.value:
                config = RNANConfig(**{**PRESETS[_MODEL.value], "dtype": dtype})
                what = dict(model=_MODEL.value, dtype=dtype, scan_unroll=unroll, depthwise=depthwise)
                params = None
                for i, batch in enumerate(int(b) for b in _BATCH_SIZES.value):
                    out = _attempt(results, {**what, "batch": batch}, partial(
                        bench_train_step, config, batch, _PATCH.value, unroll, depthwise, warmup=_WARMUP.value,
                        steps=_STEPS.value, repeats=_REPEATS.value, compile_only=_COMPILE_ONLY.value,
                        profile_dir=_PROFILE_DIR.value if i == 0 else "", profile_steps=_PROFILE_STEPS.value))
                    if out is not None:
                        record, params = out
                        results["train"].append({"model": _MODEL.value, **record})
                        print(train_line(record), flush=True)
                    if _PEER.value and dtype == "float32" and (batch, _PATCH.value) not in peer_done:
                        peer_done.add((batch, _PATCH.value))
                        for r in _attempt(results, {"peer": True, "batch": batch}, partial(
                                bench_peer, config, batch, _PATCH.value, warmup=_WARMUP.value, steps=_STEPS.value,
                                repeats=_REPEATS.value)) or []:
                            results["peer"].append({"model": _MODEL.value, **r})
                            print(peer_line(r), flush=True)
                    _write(_OUTPUT.value, results)
                if params is not None and not (_SKIP_FORWARD.value or _COMPILE_ONLY.value):
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
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
