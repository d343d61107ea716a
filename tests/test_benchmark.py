"""tools/benchmark.py: the --tiny run writes every field with a finite positive value; the FLOP count
(rnan_jax.bench) and the HLO and profile summaries (rnan_jax.profiling) agree with independent counts. No
timing is asserted."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile

import pytest

from rnan_jax import RNANConfig, bench, profiling

from conftest import PEERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(record, keys):
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_tiny_run_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--tiny", f"--output={out}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ms/step" in proc.stdout and "forward" in proc.stdout
    res = json.loads(out.read_text())
    assert res["env"]["platform"] == "cpu" and res["env"]["jax"]
    (train,) = res["train"]
    assert (train["model"], train["batch"], train["patch"], train["dtype"]) == ("tiny", 2, 12, "float32")
    assert train["nonfinite_steps"] == 0 and train["timed_steps"] == 6
    assert train["compiler_options"] == {}  # XLA's defaults: the fusion autotuner's switch is for GPUs alone
    _positive(train, ["step_ms", "step_ms_min", "step_ms_max", "patches_per_s", "tflops", "lower_s", "compile_s",
                      "train_flop_per_step", "xla_cost_flops", "peak_memory_bytes", "mean_loss", "params"])
    assert train["step_ms_min"] <= train["step_ms"] <= train["step_ms_max"]
    assert train["train_flop_per_step"] == bench.train_flops(RNANConfig(**bench.PRESETS["tiny"]), 2, 12)
    _positive(train["hlo"], ["static", "per_step", "convolutions"])
    (forward,) = res["forward"]
    assert (forward["lr_hw"], forward["sr_hw"]) == ([16, 24], [64, 96])
    _positive(forward, ["forward_ms", "compile_s", "tflops", "megapixels_per_s", "peak_memory_bytes", "flop"])

    if importlib.util.find_spec("torch") and os.path.isfile(os.path.join(PEERS, "rnan_torch.py")):
        # the PyTorch peer, timed in its own process in alternation with the step
        assert [r["peer"].rsplit(" ", 1)[1] for r in res["peer"]] == ["nchw", "channels_last"]
        for r in res["peer"]:
            assert r["timing"] == "alternating windows with rnan_jax's step" and r["batch"] == 2
            _positive(r, ["step_ms", "step_ms_min", "step_ms_max"])

    rows = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), f"--table={out}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert rows.returncode == 0, rows.stderr[-2000:]
    assert rows.stdout.count("\n| ") == 3  # separator, one train row, one forward row


def test_forward_is_measured_once_per_distinct_forward(tmp_path):
    """The forward depends on dtype, scan unroll and depthwise only: two remat settings share one forward."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--tiny", "--nopeer",
                           "--remat=none,convs", "--warmup=0", "--steps=1", "--repeats=1", f"--output={out}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["remat"] for r in res["train"]] == ["none", "convs"]
    (forward,) = res["forward"]
    assert (forward["dtype"], forward["lr_hw"]) == ("float32", [16, 24])
    assert proc.stdout.count("\nforward ") == 1 and proc.stdout.count("\ntrain ") == 2, proc.stdout
    cfg = RNANConfig(**bench.PRESETS["tiny"])
    assert bench.forward_knobs(cfg, "2", "shifted") == ("float32", "2", "shifted")
    assert bench.forward_knobs(cfg, "1:-1", "grouped") == ("float32", "1+full", "grouped")


def test_scan_unroll_values_name_both_scans():
    from rnan_jax.bench import _unroll_name, parse_unroll

    assert [parse_unroll(v) for v in ("0", "-1", "2", "1:-1", "2:5")] == [(0, 0), (-1, 0), (2, 0), (1, -1), (2, 5)]
    assert [_unroll_name(v) for v in (1, True, (1, True), (2, 5))] == ["1", "full", "1+full", "2+5"]
    with pytest.raises(ValueError):
        parse_unroll("1:x")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--scan_unroll=2,1:x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.splitlines()[-1] == (
        "benchmark: error: flag --scan_unroll=['2', '1:x']: each value must be an integer n or a pair n:m "
        "(see --helpshort)")


def test_rows_name_the_xla_options_the_step_compiled_with():
    from rnan_jax.bench import _step_knobs

    off = {"xla_gpu_experimental_enable_fusion_autotuner": False}
    assert _step_knobs({"cast_params_once": True, "remat": "convs", "compiler_options": off}) == [
        "cast once", "remat convs", "xla_gpu_experimental_enable_fusion_autotuner=False"]
    assert _step_knobs({"cast_params_once": False, "remat": "none", "compiler_options": {}}) == []
    assert _step_knobs({"remat": "none"}) == []  # records written before the field


def _pb(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or length-delimited bytes (lengths under 128)."""
    if isinstance(payload, int):
        return bytes([number << 3, payload])
    return bytes([number << 3 | 2, len(payload)]) + payload


def _write_caches(tmp_path, caches, tar_name, prefix):
    """Each {folder: [(fingerprint, backend, settings)]} as a cache folder of .pb entries under tmp_path, and all of
    them in the tar `tar_name`, each member's path beginning with `prefix`."""
    for folder, entries in caches.items():
        (tmp_path / folder / "ed0e56ab8b2a0ecb").mkdir(parents=True)
        for i, (fingerprint, backend, settings) in enumerate(entries):
            (tmp_path / folder / "ed0e56ab8b2a0ecb" / f"{i}.pb").write_bytes(_cache_entry(fingerprint, backend, settings))
    with tarfile.open(tmp_path / tar_name, "w") as tar:
        for folder in caches:
            tar.add(tmp_path / folder, prefix + folder)


def _cache_entry(fingerprint: str, backend: int, settings: bytes) -> bytes:
    key = _pb(1, _pb(1, b"ed0e56ab8b2a0ecb") + _pb(3, fingerprint.encode())) + _pb(2, _pb(1, b"fe9062d0fff82a66"))
    return _pb(1, key) + _pb(2, _pb(1, _pb(1, backend) + _pb(2, settings)) + _pb(2, b"v1"))


def test_autotune_cache_counts_picks_per_backend_and_names_those_two_caches_disagree_on(tmp_path):
    """XLA's per-fusion autotuning cache files, as written on an H200 (key, then the pick: backend 1 a cuDNN
    algorithm with its tuning knobs, a map; 10 XLA's emitter): two knobs' map entries written in another order
    are the same pick; another engine, or another backend, is a different one."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import autotune_cache

    knobs = [_pb(4, _pb(1, 25) + _pb(2, 0)), _pb(4, _pb(1, 2) + _pb(2, 12))]
    conv = lambda engine, order: _pb(4, _pb(1, engine) + b"".join(knobs[i] for i in order) + _pb(6, b""))  # noqa: E731
    native = _pb(6, b"")
    caches = {"a": [("f" * 32, 1, conv(58, (0, 1))), ("e" * 32, 1, conv(39, (0, 1))), ("d" * 32, 10, native)],
              "b": [("f" * 32, 1, conv(58, (1, 0))), ("e" * 32, 1, conv(70, (0, 1))), ("d" * 32, 9, _pb(3, b"\x08\x04"))]}
    _write_caches(tmp_path, caches, "autotune.tar", "")
    got = autotune_cache.report(autotune_cache.read_folders([str(tmp_path / "autotune.tar")])).splitlines()
    assert got[:3] == ["a: 3 entries: 2 cuDNN conv, 1 XLA emitter", "b: 3 entries: 2 cuDNN conv, 1 Triton block-level",
                       "a against b: 3 keys in both, 2 picked differently"]
    assert [line.split(":")[0].strip() for line in got[3:]] == ["d" * 32, "e" * 32]
    assert "{1:39 6: 4:{1:2 2:12} 4:{1:25 2:0}}" in got[4] and "{1:70 " in got[4]
    assert got == autotune_cache.report(autotune_cache.read_folders([str(tmp_path / "a"), str(tmp_path / "b")])
                                        ).replace(str(tmp_path) + "/", "").splitlines()


def test_alternating_windows_take_turns():
    calls = []
    windows = [lambda n, k=k: calls.append((k, n)) for k in "ab"]
    times = bench.time_alternating(windows, warmup=2, steps=3, repeats=2, pause_s=0.0)
    assert calls == [("a", 2), ("b", 2), ("a", 3), ("b", 3), ("a", 3), ("b", 3)]
    assert [len(t) for t in times] == [2, 2] and all(x >= 0 for t in times for x in t)


def test_paper_train_step_is_3_918_tflop():
    # The paper setting (x4, batch 16 of 48x48 LR patches) by the peer's 6 x MACs convention: 3.918 TFLOP per step.
    assert bench.train_flops(RNANConfig(), 16, 48) == pytest.approx(3.9178e12, rel=1e-4)


@pytest.mark.parametrize("fields, h, w", [
    ({}, 6, 5),
    (dict(scale=3, features=32, num_groups=4, num_blocks=4, group_interval=2, block_interval=2), 6, 10),
    (dict(scale=2, features=16, num_groups=2, num_blocks=2), 5, 7),
])
def test_forward_macs_equal_the_peer_hook_count(torch_rnan, fields, h, w):
    """The PyTorch peer counts weight.numel() x output positions in a forward hook on every Conv2d."""
    torch = pytest.importorskip("torch")
    c = RNANConfig(**fields)
    model = torch_rnan(scale=c.scale, c=c.features, n_groups=c.num_groups, n_blocks=c.num_blocks,
                            group_interval=c.group_interval, block_interval=c.block_interval, r=c.gc_reduction)
    total = [0]

    def hook(m, i, o):
        total[0] += m.weight.numel() * o.shape[0] * o.shape[2] * o.shape[3]

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.rand(1, 3, h, w))
    assert bench.forward_macs(c, h, w) == total[0]


HLO = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(f32[4]{0} %p0)
}

%dynamic_slice.clone (p0: f32[8], p1: s32[]) -> f32[4] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %ds = f32[4]{0} dynamic-slice(f32[8]{0} %p0, s32[] %p1), dynamic_slice_sizes={4}
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %t), index=0
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %t), index=1
  %f = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_computation
  %w8 = f32[8]{0} constant({1, 2, 3, 4, 5, 6, 7, 8})
  %s = ((f32[8]{0}, s32[]), f32[4]{0}, u32[]) fusion-start(f32[8]{0} %w8, s32[] %i), kind=kLoop, calls=%dynamic_slice.clone
  %k = f32[4]{0} fusion-done(((f32[8]{0}, s32[]), f32[4]{0}, u32[]) %s)
  %c = f32[4]{0} custom-call(f32[4]{0} %f, f32[4]{0} %k), custom_call_target="__cudnn$convForward"
  %one = s32[] constant(1)
  %j = s32[] add(s32[] %i, s32[] %one)
  ROOT %r = (s32[], f32[4]{0}) tuple(s32[] %j, f32[4]{0} %c)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %t), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[4]{0}) tuple(s32[] %z, f32[4]{0} %a)
  %w = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  %g = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %w), index=1
  ROOT %out = f32[4]{0} convolution(f32[4]{0} %g, f32[4]{0} %g), dim_labels=b0f_0io->b0f
}
"""


def test_hlo_stats_counts_launches_through_loops():
    s = profiling.hlo_stats(HLO)
    # body: fusion, fusion-start, fusion-done, custom-call, add (5) x 10 trips; condition: compare x 11; entry:
    # convolution.
    assert s["static"] == 7 and s["per_step"] == 5 * 10 + 11 + 1
    assert s["opcodes_per_step"] == {"fusion": 10, "fusion-start": 10, "fusion-done": 10, "custom-call": 10,
                                     "add": 10, "compare": 11, "convolution": 1}
    assert s["async_fusion_roots_per_step"] == {"dynamic-slice": 10}
    assert s["fusion_kinds_per_step"] == {"kLoop": 10}
    assert s["custom_call_targets_per_step"] == {"__cudnn$convForward": 10}
    assert (s["while_loops"], s["unknown_trip_counts"], s["convolutions"]) == (1, 0, 1)


def test_profile_summary_reads_device_streams():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}}]
    spans = [{"ph": "X", "pid": 1, "tid": 1, "name": "host work", "ts": 0, "dur": 900.0},
             {"ph": "X", "pid": 2, "tid": 7, "name": "conv_kernel", "ts": 0, "dur": 300.0},
             {"ph": "X", "pid": 2, "tid": 7, "name": "conv_kernel", "ts": 400, "dur": 300.0},
             {"ph": "X", "pid": 2, "tid": 7, "name": "loop_fusion", "ts": 800, "dur": 100.0},
             {"ph": "X", "pid": 2, "tid": 8, "name": "fusion.1", "ts": 0, "dur": 700.0}]
    s = profiling.profile_summary({"traceEvents": meta + spans}, steps=2)
    assert s["device_events"] == 4
    assert s["kernels_per_step"] == 1.5 and s["kernel_ms_per_step"] == pytest.approx(0.35)
    assert s["top_kernels"][0] == {"name": "conv_kernel", "calls_per_step": 1.0, "ms_per_step": pytest.approx(0.3)}
    assert s["threads"]["/device:GPU:0 XLA Ops"]["busy_ms_per_step"] == pytest.approx(0.35)


def test_kernel_categories_group_device_kernels_per_step():
    from rnan_jax.profiling import kernel_categories

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    kernels = [("sm90_xmma_fprop_implicit_gemm_bf16", 300.0), ("conv2d_c1_k1_nhwc", 100.0), ("MemcpyD2D", 50.0),
               ("loop_dynamic_update_slice_fusion.3", 40.0), ("loop_convert_fusion", 20.0), ("loop_add_fusion", 10.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "dur": d} for n, d in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 1, "name": "MemcpyD2D", "dur": 1e6})  # a host event: left out
    got = kernel_categories({"traceEvents": events}, steps=2)
    assert {k: v["ms_per_step"] for k, v in got.items()} == {
        "1x1 and depthwise convolutions": 0.05, "3x3 convolutions (cuDNN fprop, dgrad, wgrad)": 0.15,
        "device-to-device copies": 0.025, "the scan's dynamic-(update-)slices": 0.02, "dtype converts": 0.01,
        "everything else": 0.005}
    assert sum(v["kernels_per_step"] for v in got.values()) == 3


TOOLS = ("benchmark", "export", "make_zoo", "compare_dtypes", "data_throughput", "trace_breakdown", "tiling_bound",
         "autotune_cache")


def _tool(name, *args, tmp_path):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_has_help(name, tmp_path):
    proc = _tool(name, "--help", tmp_path=tmp_path)
    # status 0 (absl's own --help exits with 1 after the text; cli.parse_flags makes it 0, as argparse's)
    assert proc.returncode == 0 and "--" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_compare_dtypes_stops_on_a_config_key_nothing_reads_and_fails_when_no_run_logged(tmp_path):
    """A key nothing reads stopped each dtype's run alike, then an empty table and exit status 0."""
    (tmp_path / "bad.py").write_text("from rnan_jax import configs\ndef get_config():\n"
                                     "    c = configs.default_config()\n    c.patch_size = 3\n    return c\n")
    proc = _tool("compare_dtypes", "--config=bad.py", "--workdir=w", tmp_path=tmp_path)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (1, (
        'error: --config bad.py: the config has a key that nothing reads: patch_size (did you mean '
        '"data.patch_size"?); python -m rnan_jax.train --config FILE --dry_run lists every key'))
    assert not (tmp_path / "w").exists()
    proc = _tool("compare_dtypes", f"--config={ROOT}/experiments/demo.py", "--config.data.source=folder",
                 "--config.data.hr_dirs=nope", "--workdir=w", "--dtypes=float32", tmp_path=tmp_path)
    assert "float32 stopped: training images: nope: no such folder" in proc.stdout, proc.stdout + proc.stderr
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (
        1, "error: no run logged a value to compare (each one's reason is above)")


@pytest.mark.parametrize("name,args,says", [
    ("benchmark", ["--table=nope.json"], "--table: cannot read"),
    ("benchmark", ["--tiny", "--steps=0"], "--steps"),
    ("benchmark", ["--tiny", "--scale=5"], "--scale"),
    ("benchmark", ["--tiny", "--output=/dev/null/b.json"], "cannot write --output"),
    ("trace_breakdown", ["list.json"], "not a Perfetto trace"),
    ("trace_breakdown", ["list.json", "--steps=0"], "--steps must be at least 1"),
    ("data_throughput", ["--source=demo", "--repeats=0"], "--repeats"),
    ("make_zoo", ["--workdir=nope", "--name=../../x"], "--name"),
    ("compare_dtypes", ["--config=nope.py", "--workdir=w", "--dtypes=int8"], "--dtypes"),
    ("export", ["--checkpoint=zoo:small_x2", "--output=.", "--platforms=cpu"], "is a folder"),
    ("export", ["--checkpoint=zoo:small_x2", "--output=a.jaxexport", "--platforms=gpu"], "cuda"),
    ("tiling_bound", ["--images=baboon"], "<set>/<name>"),
    ("autotune_cache", ["nope"], "autotune_cache: nope: no such file or folder"),
    ("autotune_cache", ["list.json"], "neither a folder nor a tar file"),
    ("tiling_bound", ["--checkpoint=zoo:small_x2", "--images=Set5/nope", "--sizes=8", "--data_dir=."], "no such"),
])
def test_tool_misuse_is_one_line(name, args, says, tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    proc = _tool(name, *args, tmp_path=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("I1", "W1", "WARNING"))
             and "libtpu" not in line and line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert says in proc.stderr + proc.stdout and len(lines) <= 2, proc.stderr[-3000:]


def test_autotune_cache_reads_a_dot_prefixed_tar_and_names_a_file_it_cannot_read(tmp_path):
    """`tar -cf autotune.tar -C /tmp ./rnan_autotune_a ./rnan_autotune_c` (or `-C dir .`): every member's top folder
    was ".", so the caches merged into one, the later one's picks over the earlier's, and nothing was compared. A
    file that is no cache entry was told as "autotune_cache: wire type 4", naming no file; an empty one counted as
    a pick of "backend None"; an empty folder was left out without a word."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import autotune_cache

    conv = lambda engine: _pb(4, _pb(1, engine) + _pb(6, b""))  # noqa: E731
    caches = {"a": [("f" * 32, 1, conv(58)), ("d" * 32, 10, _pb(6, b""))],
              "b": [("f" * 32, 1, conv(70)), ("d" * 32, 10, _pb(6, b"")), ("c" * 32, 10, _pb(6, b""))]}
    _write_caches(tmp_path, caches, "dot.tar", "./")
    got = autotune_cache.report(autotune_cache.read_folders([str(tmp_path / "dot.tar")])).splitlines()
    assert got[:3] == ["a: 2 entries: 1 cuDNN conv, 1 XLA emitter", "b: 3 entries: 2 XLA emitter, 1 cuDNN conv",
                       "a against b: 2 keys in both, 1 picked differently"]
    assert got[3].startswith("  " + "f" * 32 + ": cuDNN conv {1:1 2:{4:{1:58 6:}}} | cuDNN conv {1:1 2:{4:{1:70 6:}}}")
    (tmp_path / "empty").mkdir()
    got = autotune_cache.report(autotune_cache.read_folders([str(tmp_path / "empty"), str(tmp_path / "a")]))
    assert got.splitlines()[0] == f"{tmp_path / 'empty'}: 0 entries (no cache files)"

    for name, content in (("notes.txt", b"hello world, these are notes"), ("empty.pb", b""),
                          ("cut.pb", _cache_entry("e" * 32, 1, conv(58))[:30])):
        bad = tmp_path / f"bad_{name}"
        bad.mkdir()
        (bad / name).write_bytes(content)
        proc = _tool("autotune_cache", str(bad), tmp_path=tmp_path)
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"autotune_cache: {bad / name}: not an XLA autotuning cache entry ("), proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    with tarfile.open(tmp_path / "nothing.tar", "w"):
        pass
    proc = _tool("autotune_cache", "nothing.tar", tmp_path=tmp_path)
    assert (proc.returncode, proc.stderr) == (1, "autotune_cache: nothing.tar: the tar file holds no files\n")


def _gpu_trace(kernels, other_threads=()):
    """A trace as jax.profiler writes one of a GPU run: a host process, a device process whose "Stream" threads
    hold `kernels` [(name, us)] and whose `other_threads` [(thread name, [(name, us)])] hold their own events."""
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14(Memset,Compute)"}}]
    events = [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": 0, "dur": d} for n, d in kernels]
    for tid, (thread, spans) in enumerate(other_threads, 100):
        meta.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": thread}})
        events += [{"ph": "X", "pid": 1, "tid": tid, "name": n, "ts": 0, "dur": d} for n, d in spans]
    events.append({"ph": "X", "pid": 2, "tid": 1, "name": "host work", "ts": 0, "dur": 5000.0})
    return {"traceEvents": meta + events}


def test_kernel_categories_count_the_streams_kernels_once():
    """A trace that also holds the device's "XLA Ops" and "XLA Modules" lines (the same work, per HLO op and per
    program) had them counted as more kernels: twice the kernel time, and the whole step in "everything else"."""
    kernels = [("sm90_xmma_fprop_implicit_gemm", 300.0), ("loop_convert_fusion", 100.0)]
    trace = _gpu_trace(kernels, [("XLA Ops", [("convolution.3", 300.0), ("loop_convert_fusion", 100.0)]),
                                 ("XLA Modules", [("jit_train_step", 450.0)])])
    got = profiling.kernel_categories(trace, steps=2)
    assert got == profiling.kernel_categories(_gpu_trace(kernels), steps=2)
    assert sum(v["ms_per_step"] for v in got.values()) == pytest.approx(
        profiling.profile_summary(trace, steps=2)["kernel_ms_per_step"]) == pytest.approx(0.2)
    assert got["3x3 convolutions (cuDNN fprop, dgrad, wgrad)"] == {"ms_per_step": 0.15, "kernels_per_step": 0.5}
    assert got["everything else"] == {"ms_per_step": 0.0, "kernels_per_step": 0.0}


def test_trace_breakdown_tells_traces_of_one_name_apart_and_stops_on_one_without_device_kernels(tmp_path):
    """jax.profiler names every trace perfetto_trace.json.gz: two of them were two columns of that one name. A
    trace of a CPU run (no device process) printed a table of zeros, status 0."""
    import gzip

    for run, ms in (("train_b16_bfloat16", 2.0), ("train_b16_float32", 3.0)):
        folder = tmp_path / "p" / run / "plugins" / "profile" / "2026_11_29_10_00_00"
        folder.mkdir(parents=True)
        with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
            json.dump(_gpu_trace([("sm90_xmma_fprop_implicit_gemm", ms * 1e3)] * 3), f)
    traces = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("p/*/plugins/profile/*/*.gz"))
    proc = _tool("trace_breakdown", *traces, "--steps=3", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("| per step | train_b16_bfloat16/plugins/profile/2026_11_29_10_00_00/perfetto_trace.json.gz | "
                        "train_b16_float32/plugins/profile/2026_11_29_10_00_00/perfetto_trace.json.gz |")
    assert lines[2] == "| all kernels | 2.0 ms, 1 | 3.0 ms, 1 |"

    (tmp_path / "cpu.json").write_text(json.dumps({"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 701, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 701, "tid": 1, "name": "jit_train_step", "ts": 0, "dur": 900.0}]}))
    proc = _tool("trace_breakdown", traces[0], "cpu.json", tmp_path=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr == ("cpu.json: no device kernels in the trace (no /device: process with events: a trace of a "
                           "run on the CPU?)\n")


def test_autotune_cache_into_a_closed_pipe_is_no_error(tmp_path):
    """`autotune_cache.py x.tar | head -3`: the reader leaving early was told as "autotune_cache: [Errno 32] Broken
    pipe", status 1 (which fails a pipeline under `set -o pipefail`)."""
    (tmp_path / "a" / "ed0e56ab8b2a0ecb").mkdir(parents=True)
    (tmp_path / "a" / "ed0e56ab8b2a0ecb" / "0.pb").write_bytes(_cache_entry("f" * 32, 10, _pb(6, b"")))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "autotune_cache.py"), "a"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")
