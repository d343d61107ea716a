"""Where a profiled train step's GPU time goes: kernels grouped by `rnan_jax.profiling.KERNEL_CATEGORIES`.

    python tools/trace_breakdown.py TRACE.json.gz [TRACE2.json.gz ...] --steps 3

TRACE: a Perfetto trace that `tools/benchmark.py --profile_dir` wrote (`--profile_steps`, default 3, steps).
Prints one markdown row per category: ms and kernels per step for each trace.
"""
import argparse
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rnan_jax.profiling import kernel_categories  # noqa: E402


def labels(paths: list[str]) -> list[str]:
    """Column heads: the traces' file names, or where two share one (every trace jax.profiler writes is named
    perfetto_trace.json.gz) their paths below the folder they have in common."""
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names) and len(set(map(os.path.abspath, paths))) == len(paths):
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
        names = [os.path.relpath(os.path.abspath(p), common) for p in paths]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--steps", type=int, default=3, help="steps the trace holds (benchmark.py --profile_steps)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    tables = []
    for path in args.traces:
        try:
            with gzip.open(path) if path.endswith(".gz") else open(path) as f:
                tables.append(kernel_categories(json.load(f), args.steps))
        except (OSError, ValueError, EOFError) as e:
            sys.exit(f"{path}: cannot read the trace ({type(e).__name__}: {e})")
        except (AttributeError, KeyError, TypeError) as e:
            sys.exit(f"{path}: not a Perfetto trace of jax.profiler ({type(e).__name__}: {e})")
        if not any(c["kernels_per_step"] for c in tables[-1].values()):
            sys.exit(f"{path}: no device kernels in the trace (no /device: process with events: a trace of a run "
                     "on the CPU?)")
    print("| per step | " + " | ".join(labels(args.traces)) + " |")
    print("| --- |" + " --- |" * len(args.traces))
    total = [sum(c["ms_per_step"] for c in t.values()) for t in tables]
    count = [sum(c["kernels_per_step"] for c in t.values()) for t in tables]
    print("| all kernels | " + " | ".join(f"{ms:.1f} ms, {n:,.0f}" for ms, n in zip(total, count)) + " |")
    for name in tables[0]:
        print(f"| {name} | " + " | ".join(f"{t[name]['ms_per_step']:.1f} ms, {t[name]['kernels_per_step']:,.0f}"
                                          for t in tables) + " |")


if __name__ == "__main__":
    main()
