"""Speed of the train step and the forward pass on the present device, with the FLOP count they are rated
by, the PyTorch peer's step timed the same way, and the records written as lines and markdown rows.

`tools/benchmark.py` is the command line over these (its docstring says what each measurement means):

    from rnan_jax import RNANConfig, bench
    record, params = bench.bench_train_step(RNANConfig(**bench.PRESETS["tiny"]), 2, 12, 0, "auto",
                                            warmup=1, steps=2, repeats=3)
    print(bench.train_line(record))

- FLOPs: `forward_macs` counts every conv's multiply-adds from the config (what the forward hooks of
  ../shared/peers/bench_torch.py count); `train_flops` is 6 x that per patch (forward 2, backward 4).
- timing: `time_windows` runs `repeats` windows of `steps` calls after `warmup`, one sync per window;
  `time_alternating` does so for several contenders in turn, window by window (the train step beside the
  PyTorch peer's: a burst of load on a shared machine then falls on both).
- input: `data_throughput` times the training input pipeline (tools/data_throughput.py).
- records: `bench_train_step` (the trainer's jitted step on a one-device "data" mesh, state and metrics
  donated; with `peers` from `peer_steps`, the PyTorch peer's steps timed in alternation with it),
  `bench_forward` (`api.apply` on one LR image); `train_line`, `forward_line`, `peer_line` print one record,
  `table` the markdown rows of the JSON files tools/benchmark.py writes. HLO, profile and memory figures come
  from `rnan_jax.profiling`.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from functools import partial
from typing import Any, Callable, Sequence

from rnan_jax import profiling

# Model presets by name (RNANConfig fields; "paper": the default x4 RNAN).
PRESETS = {
    "paper": {},
    "small": dict(scale=2, features=32, num_groups=2, num_blocks=3),  # ../shared/DESIGN.md's CPU table
    "small_x2": dict(scale=2, features=48, num_groups=2, num_blocks=3),  # zoo:small_x2 (experiments/small291.py)
    "tiny": dict(scale=4, features=16, num_groups=2, num_blocks=2),
}


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


def time_windows(run: Callable[[], Any], warmup: int, steps: int, repeats: int) -> list[float]:
    """Seconds per call of `run` in `repeats` windows of `steps` calls; one sync at each window's end."""
    return time_alternating([_jax_window(run)], warmup, steps, repeats, pause_s=0.0)[0]


def _jax_window(run: Callable[[], Any]) -> Callable[[int], None]:
    """n calls of `run`, then a wait for the last result."""
    import jax

    def window(n: int) -> None:
        out = None
        for _ in range(n):
            out = run()
        jax.block_until_ready(out)

    return window


def time_alternating(windows: Sequence[Callable[[int], None]], warmup: int, steps: int, repeats: int,
                     pause_s: float = 0.1) -> list[list[float]]:
    """Seconds per step of each contender (`window(n)` runs n steps and waits for them) in `repeats` windows of
    `steps` steps, the contenders taking turns window by window after `warmup` steps each. `pause_s` before
    every window lets the previous contender's idle threads stop spinning (PyTorch's OpenMP workers)."""
    for window in windows:
        window(warmup)
    times: list[list[float]] = [[] for _ in windows]
    for _ in range(repeats):
        for window, out in zip(windows, times):
            time.sleep(pause_s)
            start = time.perf_counter()
            window(steps)
            out.append((time.perf_counter() - start) / steps)
    return times


def parse_unroll(text: str) -> tuple[int, int]:
    """(execution.scan_unroll, execution.block_unroll) from a --scan_unroll value: "n", or "n:m" for the GCRGs'
    scan and the RNA blocks' scan apart (e.g. "1:-1": groups rolled, each group's blocks fully unrolled)."""
    groups, _, blocks = str(text).partition(":")
    return int(groups), int(blocks or 0)


def _unroll_name(value: Any) -> str:
    """A resolved scan_unroll for the record: "full", "n", or "groups+blocks" for a pair ("1+full")."""
    if isinstance(value, tuple):
        return "+".join(_unroll_name(v) for v in value)
    return "full" if value is True else str(value)


def _knobs(unroll: int | str, depthwise: str, config, remat: str = "auto") -> tuple[Any, Any, Any, str, str, str]:
    """(scan_unroll, depthwise, remat) as the step takes them, and as resolved for the record. `unroll`: an int
    or a --scan_unroll value (`parse_unroll`)."""
    from rnan_jax import api
    from rnan_jax.configs import ExecutionConfig

    groups, blocks = parse_unroll(unroll)
    execution = ExecutionConfig(scan_unroll=groups, block_unroll=blocks, depthwise=depthwise,
                                remat=remat)  # the config's encoding
    value, impl, policy = execution.unroll, execution.depthwise_impl, execution.remat_policy
    module = api.build(config, scan_unroll=value, depthwise=impl, remat=policy)  # resolved as the step does
    return value, impl, policy, _unroll_name(module.scan_unroll), module.depthwise, module.remat


def bench_train_step(config, batch: int, patch: int, unroll: int | str, depthwise: str, *, warmup: int, steps: int,
                     repeats: int, compile_only: bool = False, profile_dir: str = "", profile_steps: int = 3,
                     cast_params_once: bool | None = None, batch_chunks: int = 0, remat: str = "auto",
                     fusion_autotuner: bool | None = None,
                     peers: Sequence[tuple[dict, Callable[[int], None]]] = ()) -> tuple[dict, Any]:
    """One setting's record, and the parameters (for the forward timing).

    `unroll`: 0 the backend's default, -1 full, n, or "n:m" (`parse_unroll`); `depthwise`: "auto" (the
    backend's default), "grouped" or "shifted"; `cast_params_once`: execution.cast_params_once (None: the
    backend's default); `batch_chunks`: execution.batch_chunks (0: what the trainer runs on one device);
    `remat`: execution.remat ("auto": the backend's default); `fusion_autotuner`: execution.fusion_autotuner
    (None: the backend's default; the record's "compiler_options" say what the step compiled with).
    `compile_only`: compile and count, run nothing.
    `profile_dir`: also trace `profile_steps` more steps there (`profiling.trace_window`).
    `peers`: `peer_steps`' contenders, timed in alternation with this step (`time_alternating`); their
    records, with the timings, come back under the record's "peers".
    """
    import jax
    import numpy as np

    from rnan_jax import api, step

    scan_unroll, impl, remat_policy, unroll_name, impl_name, remat_name = _knobs(unroll, depthwise, config, remat)
    optim = step.OptimConfig()  # the paper's Adam and schedule
    chunks = step.batch_chunks(batch_chunks, batch, 1)  # 0: what the trainer runs on one device
    if cast_params_once is None:
        cast_params_once = api.default_cast_params_once()
    device = jax.devices()[0]
    if fusion_autotuner is None:
        fusion_autotuner = api.default_fusion_autotuner(device.platform)
    spec = step.StepSpec(config, optim, scan_unroll, impl, chunks, cast_params_once, remat_policy, fusion_autotuner)
    jitted, replicated, sharded = step.jit_train_step(spec, step.data_mesh([device]))
    state = jax.jit(partial(step.create_state, spec=spec), out_shardings=replicated)(jax.random.key(0))
    rng = np.random.default_rng(0)
    s = config.scale
    host = {"lr": rng.integers(0, 256, (batch, patch, patch, 3), np.uint8),
            "hr": rng.integers(0, 256, (batch, s * patch, s * patch, 3), np.uint8)}
    data = {k: jax.device_put(v, sharded) for k, v in host.items()}
    acc = jax.device_put(step.empty_metrics(), replicated)
    start = time.perf_counter()
    lowered = jitted.lower(state, data, acc)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = train_flops(config, batch, patch)
    memory = profiling.memory_analysis(compiled)
    record = dict(scale=s, features=config.features,
                  num_groups=config.num_groups, num_blocks=config.num_blocks, params=api.count_params(state.params),
                  batch=batch, patch=patch, dtype=config.dtype, scan_unroll=unroll_name, depthwise=impl_name,
                  batch_chunks=chunks, cast_params_once=cast_params_once, remat=remat_name,
                  compiler_options=step.compiler_options(spec, device.platform),
                  lower_s=lower_s, compile_s=compile_s, train_flop_per_step=flops,
                  xla_cost_flops=profiling.cost_flops(compiled), memory=memory,
                  peak_memory_bytes=memory.get("peak_bytes"), hlo=profiling.hlo_stats(compiled.as_text()))
    if compile_only:
        return record, state.params

    carry = {"state": state, "acc": acc}

    def run():
        carry["state"], carry["acc"] = compiled(carry["state"], data, carry["acc"])
        return carry["state"], carry["acc"]

    all_times = time_alternating([_jax_window(run), *(window for _, window in peers)], warmup, steps, repeats,
                                 pause_s=0.1 if peers else 0.0)
    times = all_times[0]
    if peers:
        record["peers"] = [{**meta, "timing": "alternating windows with rnan_jax's step", **_timings(t)}
                           for (meta, _), t in zip(peers, all_times[1:])]
    step_s = statistics.median(times)
    metrics = jax.device_get(carry["acc"])
    record.update(step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                  timed_steps=steps * repeats, patches_per_s=batch / step_s, tflops=flops / step_s / 1e12,
                  device_peak_bytes_in_use=profiling.device_peak(device),
                  mean_loss=float(metrics["loss"] / max(metrics["steps"] - metrics["nonfinite"], 1)),
                  nonfinite_steps=int(metrics["nonfinite"]))
    if profile_dir:
        name = f"train_b{batch}_{config.dtype}_{unroll_name}_{impl_name}_{remat_name}"
        try:
            record["profile"] = profiling.trace_window(run, profile_steps, profile_dir, name)
        except Exception as e:  # the timings above stand without it
            record["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return record, carry["state"].params


def forward_knobs(config, unroll: int | str, depthwise: str) -> tuple[str, str, str]:
    """What `bench_forward` measures differs by: (dtype, scan unroll, depthwise) as resolved for the record.
    The train step's other knobs (remat, cast_params_once, fusion_autotuner, batch_chunks) do not reach it."""
    _, _, _, unroll_name, impl_name, _ = _knobs(unroll, depthwise, config)
    return config.dtype, unroll_name, impl_name


def bench_forward(config, params: Any, lr_hw: tuple[int, int], unroll: int | str, depthwise: str, *, warmup: int,
                  steps: int, repeats: int) -> dict:
    """The record of `api.apply` on one random [1, h, w, 3] LR image (`lr_hw` = (h, w)): compile time, the
    median window's time per pass and its FLOP rate, memory. `unroll`, `depthwise`: as `bench_train_step`."""
    import jax
    import numpy as np

    from rnan_jax import api

    scan_unroll, impl, _, unroll_name, impl_name, _ = _knobs(unroll, depthwise, config)
    h, w = lr_hw
    lr = jax.device_put(np.random.default_rng(1).random((1, h, w, 3), np.float32))
    jitted = jax.jit(partial(api.apply, config=config, scan_unroll=scan_unroll, depthwise=impl))
    start = time.perf_counter()
    compiled = jitted.lower(params, lr).compile()
    compile_s = time.perf_counter() - start
    times = time_windows(lambda: compiled(params, lr), warmup, steps, repeats)
    fwd_s = statistics.median(times)
    flops = 2.0 * forward_macs(config, h, w)
    memory = profiling.memory_analysis(compiled)
    return dict(dtype=config.dtype, scan_unroll=unroll_name, depthwise=impl_name, lr_hw=[h, w],
                sr_hw=[h * config.scale, w * config.scale], compile_s=compile_s, forward_ms=fwd_s * 1e3,
                forward_ms_min=min(times) * 1e3, forward_ms_max=max(times) * 1e3, flop=flops,
                tflops=flops / fwd_s / 1e12, megapixels_per_s=h * w * config.scale ** 2 / fwd_s / 1e6,
                memory=memory, peak_memory_bytes=memory.get("peak_bytes"))


def _timings(seconds: Sequence[float]) -> dict[str, float]:
    ms = [t * 1e3 for t in seconds]
    return {"step_ms": statistics.median(ms), "step_ms_min": min(ms), "step_ms_max": max(ms)}


def peer_steps(config, batch: int, patch: int, *, peer_dir: str) -> list[tuple[dict, Callable[[int], None]]]:
    """The PyTorch peer's train step (forward, L1, backward, Adam) for `config` at batch x patch, float32, on
    this machine's device, in NCHW and channels_last: (record, window) pairs for `bench_train_step`'s `peers`
    (`window(n)` runs n steps and waits for the device); [] without torch or the peer (`peer_dir`/rnan_torch.py).

    The steps run in a process of their own (`rnan_jax.peer`, driven through a pipe; `window.close()` ends it,
    as does this process's exit): in a process that has run an XLA:CPU program PyTorch's CPU step was 10-15%
    slower."""
    import dataclasses
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torch") is None or not os.path.isfile(os.path.join(peer_dir, "rnan_torch.py")):
        return []
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "rgb_mean"}
    worker = subprocess.Popen([sys.executable, "-m", "rnan_jax.peer", peer_dir, json.dumps(fields), str(batch),
                               str(patch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(worker.stdout.readline() or '{"error": "the peer process exited"}')
    if "error" in hello:
        worker.wait()
        raise RuntimeError(f"PyTorch peer: {hello['error']}")

    def close() -> None:
        worker.stdin.close()
        worker.wait(timeout=60)

    def window_of(layout: str) -> Callable[[int], None]:
        def window(n: int) -> None:
            worker.stdin.write(f"{layout} {n}\n")
            worker.stdin.flush()
            if worker.stdout.readline().strip() != "ok":
                raise RuntimeError(f"PyTorch peer: the {layout} step failed (exit status {worker.poll()})")

        window.close = close  # ends the worker (and frees its device memory); any window's does
        return window

    return [(meta, window_of(meta["peer"].rsplit(" ", 1)[1])) for meta in hello["peers"]]


def data_throughput(cfg, batches: int, warmup: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, patches per second over `batches` batches after `warmup`) of the training
    input pipeline `data.train_iterator(cfg)` (`cfg`: a `data.DataConfig`) at `batch_size`, one process."""
    from rnan_jax import data

    start = time.perf_counter()
    it = data.train_iterator(cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - start
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - start)
    it.close()  # stops the workers and frees their shared memory
    return first, rate


def environment() -> dict[str, Any]:
    """The device, library versions, XLA_FLAGS, time and command line of this run, for its record."""
    import flax
    import jax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return dict(platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
                python=platform.python_version(), cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                time=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv))


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _step_knobs(r: dict) -> list[str]:
    """The train record's knobs beyond unroll and depthwise, where they are not the plain ones: "cast once",
    "remat convs", and the XLA options the step compiled with ("xla_gpu_...=False")."""
    return (["cast once"] if r.get("cast_params_once") else []) + (
        [f"remat {r['remat']}"] if r.get("remat", "none") != "none" else []) + [
        f"{k}={v}" for k, v in sorted(r.get("compiler_options", {}).items())]


def train_line(r: dict) -> str:
    """One printed line for a `bench_train_step` record."""
    return (f"train b{r['batch']} {r['patch']}x{r['patch']} x{r['scale']} {r['dtype']} unroll={r['scan_unroll']} "
            f"depthwise={r['depthwise']} chunks={r.get('batch_chunks', 1)}{''.join(' ' + k for k in _step_knobs(r))}: "
            f"{_fmt(r.get('step_ms'), '.2f')} ms/step "
            f"({_fmt(r.get('patches_per_s'), '.1f')} patches/s, {_fmt(r.get('tflops'), '.3f')} TFLOP/s of "
            f"{r['train_flop_per_step'] / 1e12:.4f} TFLOP), compile {r['lower_s']:.1f}+{r['compile_s']:.1f} s, "
            f"peak {_mib(r['peak_memory_bytes'])} (XLA plan), {r['hlo']['per_step']} kernel launches/step "
            f"({r['hlo']['static']} in the HLO)")


def forward_line(r: dict) -> str:
    """One printed line for a `bench_forward` record."""
    return (f"forward {r['lr_hw'][0]}x{r['lr_hw'][1]} -> {r['sr_hw'][0]}x{r['sr_hw'][1]} {r['dtype']} "
            f"unroll={r['scan_unroll']} depthwise={r['depthwise']}: {r['forward_ms']:.1f} ms "
            f"({r['tflops']:.3f} TFLOP/s), compile {r['compile_s']:.1f} s, peak {_mib(r['peak_memory_bytes'])}")


def peer_line(r: dict) -> str:
    """One printed line for a peer record (`bench_train_step`'s "peers")."""
    return (f"peer b{r['batch']} {r['patch']}x{r['patch']} {r['peer']} ({r['device']}, {r['threads']} threads): "
            f"{r['step_ms']:.2f} ms/step (windows {r['step_ms_min']:.2f}-{r['step_ms_max']:.2f})")


def table(paths: Sequence[str], peer_log: str = "") -> str:
    """Markdown rows: every train and forward record in `paths`, then the peer's SUMMARY from `peer_log`."""
    lines = ["| run | setting | dtype | knobs | ms/step | patches/s | TFLOP/s | compile s | peak GiB | launches/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    profiles = []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        env = res["env"]
        run = f"{env['device_kind']}, jax {env['jax']}"
        run += f", XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags") else ""
        for r in res.get("train", []):
            mem = r.get("device_peak_bytes_in_use") or r["peak_memory_bytes"]
            lines.append(f"| {run} | train b{r['batch']} {r['patch']}px x{r['scale']} | {r['dtype']} | "
                         f"{'/'.join([r['scan_unroll'], r['depthwise'], *_step_knobs(r)])} | "
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
                                f"{p['kernels_per_step']:.0f} kernels/step, "
                                f"{p['kernel_ms_per_step']:.1f} ms busy/step; top: {top}")
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
