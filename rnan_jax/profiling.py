"""What XLA compiled and what the device ran: kernel launches in optimized HLO text, device kernels in a
Perfetto trace, and a compiled program's cost and memory analyses (tools/benchmark.py records them).

Nothing here imports jax at module level; the functions that need it import it when called.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

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
    `async_fusion_roots_per_step`: per step, the root opcodes of the fusions run asynchronously (`fusion-start`;
    on XLA:GPU, e.g. a scan's per-iteration parameter slices as async copies: "dynamic-slice").
    """
    computations: dict[str, list[tuple[str, str]]] = {}
    roots: dict[str, str] = {}  # computation -> its ROOT instruction's opcode
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
            if line.lstrip().startswith("ROOT "):
                roots[current] = computations[current][-1][0]
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    static, per_step = collections.Counter(), collections.Counter()
    fusion_kinds, targets, async_roots = collections.Counter(), collections.Counter(), collections.Counter()
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
            if op == "fusion-start":  # what XLA runs asynchronously: the called computation's root
                callee = re.search(r"calls=%?([\w.\-]+)", line)
                async_roots[roots.get(callee.group(1), "?") if callee else "?"] += times

    walk(entry, 1, ())
    return {"static": sum(static.values()), "per_step": sum(per_step.values()),
            "while_loops": stats["while_loops"], "unknown_trip_counts": stats["unknown_trip_counts"],
            "convolutions": sum(op == "convolution" for ins in computations.values() for op, _ in ins),
            "opcodes_per_step": dict(per_step.most_common()), "fusion_kinds_per_step": dict(fusion_kinds),
            "custom_call_targets_per_step": dict(targets), "async_fusion_roots_per_step": dict(async_roots)}


def _device_spans(trace: dict) -> tuple[dict, dict, list[dict], list[dict]]:
    """(process names, thread names, the device processes' complete events, and of those the kernels: the events
    of threads named "Stream ..." (all of them where no thread is so named)) of a Perfetto/Chrome trace."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e.get("args", {}).get("name", "")
    device = {p for p, n in processes.items() if n.startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in device]
    streams = [e for e in spans if str(threads.get((e["pid"], e["tid"]), "")).startswith("Stream")] or spans
    return processes, threads, spans, streams


def profile_summary(trace: dict, steps: int, top: int = 15) -> dict[str, Any]:
    """Device kernels in a Perfetto/Chrome trace (`jax.profiler.trace(..., create_perfetto_trace=True)`).

    Device events are those of processes named like "/device:GPU:0" (the host's are left out). Per thread
    (stream): events and busy milliseconds per step; over the threads named "Stream ..." (all device
    threads where none is so named): kernels per step, busy time per step and the `top` kernels by time.
    """
    processes, threads, spans, streams = _device_spans(trace)
    per_thread = collections.defaultdict(lambda: [0, 0.0])
    for e in spans:
        key = f"{processes[e['pid']]} {threads.get((e['pid'], e['tid']), e['tid'])}"
        per_thread[key][0] += 1
        per_thread[key][1] += e.get("dur", 0.0)
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


# Kernel-name rules of `kernel_categories`, first match wins (cuDNN, cuBLAS and XLA fusion names as an H200
# trace of the train step shows them).
KERNEL_CATEGORIES = (
    ("1x1 and depthwise convolutions", ("depthwise", "c1_k1", "nvjet", "cutlass", "splitKreduce")),
    ("3x3 convolutions (cuDNN fprop, dgrad, wgrad)", ("_fprop_", "_dgrad_", "_wgrad_")),
    ("device-to-device copies", ("MemcpyD2D", "memcpy")),
    ("the scan's dynamic-(update-)slices", ("loop_dynamic_update_slice_fusion", "loop_dynamic_slice_fusion")),
    ("dtype converts", ("convert",)),
)


def kernel_categories(trace: dict, steps: int) -> dict[str, dict[str, float]]:
    """{category: {"ms_per_step", "kernels_per_step"}} of the device kernels on the streams (as
    `profile_summary` counts them: a trace's "XLA Ops" and "XLA Modules" lines, where it has them beside the
    streams, repeat the streams' work), by `KERNEL_CATEGORIES`, the rest under "everything else"."""
    out = {name: {"ms_per_step": 0.0, "kernels_per_step": 0.0} for name, _ in KERNEL_CATEGORIES}
    out["everything else"] = {"ms_per_step": 0.0, "kernels_per_step": 0.0}
    for e in _device_spans(trace)[3]:
        name = next((c for c, keys in KERNEL_CATEGORIES if any(k in e["name"] for k in keys)), "everything else")
        out[name]["ms_per_step"] += e.get("dur", 0.0) / 1e3 / steps
        out[name]["kernels_per_step"] += 1 / steps
    return out


def trace_window(run: Callable[[], Any], steps: int, directory: str, name: str) -> dict[str, Any]:
    """`steps` calls of `run` under `jax.profiler.trace` into `directory/name`, one sync at the end: the
    `profile_summary` of the Perfetto trace written, with its path under "trace" (or {"error": ...})."""
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


def cost_flops(compiled) -> float | None:
    """`compiled.cost_analysis()`'s flops (a while loop's body counted once), or None where the backend
    reports none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def memory_analysis(compiled) -> dict[str, int]:
    """`compiled.memory_analysis()`'s sizes in bytes, and "peak_bytes": arguments + outputs + temporaries -
    donated aliases, the program's peak as XLA plans it ({} where the backend reports nothing)."""
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


def device_peak(device) -> int | None:
    """`memory_stats()["peak_bytes_in_use"]` of a jax device (the process's high-water mark so far), or None
    where the device reports none (a CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
