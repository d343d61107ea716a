"""Training: the real experiment config shrunk, exact resume, preemption, NaN, init_from, devices, hosts."""
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from rnan_jax import checkpoint, load, metrics, trainer
from rnan_jax.api import apply
from rnan_jax.images import write_image
from rnan_jax.trainer import TrainingError, dry_run, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(features=8, num_groups=1, num_blocks=2, gc_reduction=2)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Six smooth 48x40 training images and one 36x36 validation image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for i in range(7):
        folder = root / ("val" if i == 6 else "train")
        h, w = (36, 36) if i == 6 else (48, 40)
        yy, xx = np.mgrid[0:h, 0:w] / 8.0
        img = np.stack([np.sin(xx * rng.rand() * 3 + c) * np.cos(yy * rng.rand() * 2) for c in range(3)], -1)
        write_image(folder / f"{i:04d}.png", ((img + 1) * 127.5).astype(np.uint8))
    return root


@pytest.fixture(scope="session")
def straight(images, tmp_path_factory):
    """x4_config(images) trained uninterrupted (6 steps, checkpoints at 3 and 6): the reference that the
    crash, damage, NaN, end-to-end and GCS tests compare against, trained once. Read it, do not write it."""
    workdir = tmp_path_factory.mktemp("straight")
    results = train_and_evaluate(x4_config(images), str(workdir))
    return workdir, results


def overrides(images, **extra):
    """The config changes that shrink experiments/x4.py to a test: tiny model, few steps, tiny images."""
    values = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    values.update({"total_steps": 6, "batch_size": 4, "log_every": 2, "eval_every": 3, "checkpoint_every": 3,
                   "data.source": "folder", "data.hr_dirs": str(images / "train"), "data.patch_size": 6,
                   "data.num_workers": 0, "data.val_source": "folder", "data.val_dir": str(images / "val"),
                   "data.cache_dir": str(images / "cache"), "optim.lr": 1e-3})
    values.update(extra)
    return values


def x4_config(images, **extra):
    config = runpy.run_path(os.path.join(REPO, "experiments", "x4.py"))["get_config"]()
    for key, value in overrides(images, **extra).items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _logged_loss(workdir) -> dict[int, float]:
    """{step: train/loss} as the run's TensorBoard files hold it."""
    from rnan_jax import scalars

    return {s: v for s, (v, _) in scalars.read_scalars(str(workdir / "tensorboard"))["train/loss"].items()}


def _flags(values):
    return [f"--config.{k}={v}" for k, v in values.items()]


def _equal_trees(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_x4_config_end_to_end_and_load_round_trip(images, straight):
    tmp_path, results = straight
    assert np.isfinite(results["loss"]) and results["loss"] > 0
    assert results["steps_per_s"] > 0 and results["patches_per_s"] == pytest.approx(4 * results["steps_per_s"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert os.listdir(tmp_path / "best")  # best by validation PSNR
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert (tmp_path / "config.json").read_text().count('"scale": 4') == 1
    assert (tmp_path / "git_revision.txt").read_text().strip()
    # load() gives back the parameters validation used at the last step: re-scoring reproduces its PSNR.
    params, config = load(str(tmp_path))
    assert config.scale == 4 and config.features == 8 and config.num_blocks == 2
    hr = np.asarray(__import__("rnan_jax.images", fromlist=["read_rgb"]).read_rgb(images / "val" / "0006.png"))
    from rnan_jax import degrade

    lr = degrade.bicubic_lr(hr, 4)
    sr = metrics.quantize(apply(params, lr.astype(np.float32) / 255.0))
    assert metrics.psnr_y(sr, degrade.modcrop(hr, 4), 4) == pytest.approx(results["val/psnr"], abs=1e-9)
    best_params, _ = load(str(tmp_path), which="best")
    assert jax.tree_util.tree_structure(best_params) == jax.tree_util.tree_structure(params)


def test_resume_after_a_crash_is_exact(images, straight, tmp_path):
    straight, crashed = straight[0], tmp_path / "crashed"
    # Crash after step 4: step 4 is lost, the run resumes from the step-3 checkpoint (data iterator too).
    train_and_evaluate(x4_config(images), str(crashed), stop_after=4)
    assert sorted(os.listdir(crashed / "checkpoints")) == ["3"]
    train_and_evaluate(x4_config(images), str(crashed))
    a, _ = load(str(straight))
    b, _ = load(str(crashed))
    assert _equal_trees(a, b)
    # train.log holds both runs' lines, each stamped, the second continuing the first
    lines = (crashed / "train.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", line) for line in lines)
    text = [line[21:] for line in lines]
    starts = [i for i, t in enumerate(text) if t.startswith("started: ")]
    assert len(starts) == 2 and text[starts[1] + 2] == f"resumed from {crashed}/checkpoints/3 (step 3)"
    # what a rerun needs to know: the stack's versions (jax's alone were said) and which images were trained on
    assert re.search(r", jax \S+, jaxlib \S+, flax \S+, optax \S+, orbax-checkpoint \S+, grain \S+, numpy \S+, "
                     r"Python 3\.\d+\.\d+, ", text[starts[1]]), text[starts[1]]
    assert re.fullmatch(r"training images: \d+ images, sha256 of names and sizes [0-9a-f]{16}", text[starts[1] + 1])
    assert "step 4/6" in " ".join(text[:starts[1]]) and text[-1].startswith("done: 6 steps; validation PSNR")
    assert not any(t.startswith("config changed") for t in text)  # the same config


def test_a_resumed_run_names_the_config_changes_since_the_workdir_began(images, tmp_path):
    from rnan_jax.rundir import config_changes

    config = x4_config(images)
    assert config_changes(str(tmp_path), config) == []  # no config.json: nothing to compare
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    assert config_changes(str(tmp_path), config) == []
    config.total_steps, config.optim.lr, config.data.val_max_images = 12, 5e-4, 0
    assert config_changes(str(tmp_path), config) == ["data.val_max_images 10 -> 0", "optim.lr 0.001 -> 0.0005",
                                                      "total_steps 6 -> 12"]
    # A workdir from before the package had a key: at its default the key is no change (the old run had the
    # default's behaviour), set otherwise it is one.
    saved = json.loads(config.to_json_best_effort())
    del saved["optim"]["loss"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert config_changes(str(tmp_path), config) == []
    config.optim.loss = "l2"
    assert config_changes(str(tmp_path), config) == ["optim.loss '(absent)' -> 'l2'"]


def test_run_log_takes_the_package_warnings_and_what_stopped_a_run(tmp_path):
    import logging

    from rnan_jax import summary

    path = tmp_path / "train.log"
    path.write_text("2026-01-01 00:00:00  an earlier run\n")
    with summary.RunLog(str(path)) as log:
        log.write("a\nb")
        logging.getLogger("rnan_jax.sources").warning("skipping %s", "x.png: cannot read image")
        logging.getLogger("rnan_jax.sources").info("not this")
        logging.getLogger("orbax").warning("nor this")
    logging.getLogger("rnan_jax.sources").warning("nor this, after the run")
    text = [line[21:] for line in path.read_text().splitlines()]
    assert text == ["an earlier run", "a", "b", "warning: skipping x.png: cannot read image"]


def test_nan_stops_the_run_and_keeps_the_checkpoint(images, straight, tmp_path):
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")  # a run at step 3
    before, _ = load(str(tmp_path))
    with pytest.raises(TrainingError, match=r"non-finite .* last good checkpoint \(step 3\) is intact"):
        train_and_evaluate(x4_config(images, **{"optim.lr": 1e30}), str(tmp_path))
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    assert re.fullmatch(r".{21}stopped: TrainingError: non-finite .* \(step 3\) is intact.*", last), last
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    after, _ = load(str(tmp_path))
    assert _equal_trees(before, after)
    # before any checkpoint: said so, not "the last good checkpoint (step None) is intact"
    with pytest.raises(TrainingError, match=r"up to step 2; stopped without saving: there is no checkpoint yet\. "
                       r"Lower optim.lr or set optim.grad_clip, then rerun to start afresh$"):
        train_and_evaluate(x4_config(images, total_steps=2, **{"optim.lr": 1e30}), str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / "checkpoints").exists() or not os.listdir(tmp_path / "fresh" / "checkpoints")


def test_a_validation_output_that_is_not_finite_stops_the_run_in_one_line(images, tmp_path, monkeypatch):
    """The model's validation outputs not finite (an overflow in model.dtype float16): the NaNs were clipped to
    black and scored, a PSNR logged and the run went on; with the output check, a ValueError traceback."""
    from rnan_jax import inference

    def overflowed(*args, **kwargs):
        raise inference.NonFiniteOutputError("the model's output holds 12 NaN or infinite value(s): its parameters "
                                             "are not finite, or its dtype overflowed")

    monkeypatch.setattr(inference, "upscale_image", overflowed)
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images, total_steps=3, eval_every=2), str(tmp_path))
    assert str(e.value) == (
        "validating step 2: the model's output holds 12 NaN or infinite value(s): its parameters are not finite, or "
        "its dtype overflowed (model.dtype float32); stopped without saving: there is no checkpoint yet. float16 "
        "overflows where bfloat16 and float32 do not; rerun to start afresh")


_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.\nBufferAssignment OOM Debugging."


def test_out_of_device_memory_is_one_line_saying_what_needs_less(images, straight, tmp_path, monkeypatch):
    """A device out of memory (RESOURCE_EXHAUSTED, which JAX raises on GPU/TPU) in the train step or in validation:
    one TrainingError line, where, what needs less and what was kept; it was a JaxRuntimeError traceback."""
    from rnan_jax import inference, step

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(_OOM)

    real = step.jit_train_step

    def oom_step(*args, **kwargs):
        _, replicated, batch_sharding = real(*args, **kwargs)
        return out_of_memory, replicated, batch_sharding

    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    with monkeypatch.context() as m:
        m.setattr(step, "jit_train_step", oom_step)
        with pytest.raises(TrainingError) as e:
            train_and_evaluate(x4_config(images), str(tmp_path))
    assert str(e.value) == (
        "out of cpu memory in the train step (global batch 4, 4 per device, of 6x6 LR patches, model.dtype float32, "
        "remat none): RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes. A smaller "
        "batch_size or data.patch_size, execution.batch_chunks=4 (gradients of 4 parts) or execution.remat=block "
        "needs less; the last good checkpoint (step 3) is intact: rerun to resume from it")
    assert (tmp_path / "train.log").read_text().splitlines()[-1][21:] == f"stopped: TrainingError: {e.value}"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]

    monkeypatch.setattr(inference, "upscale_image", out_of_memory)  # every fallback window ran out too
    with pytest.raises(TrainingError, match=r"^out of cpu memory validating step 3: RESOURCE_EXHAUSTED: .* bytes\. "
                       r"Fewer or smaller validation images \(data.val_max_images, data.val_source\) need less; "
                       r"there is no checkpoint yet: rerun to start afresh$"):
        train_and_evaluate(x4_config(images, **{"execution.remat": "block", "execution.batch_chunks": 4}),
                           str(tmp_path / "fresh"))


def test_a_disk_without_room_for_the_next_checkpoint_stops_the_run_in_one_line(images, straight, tmp_path,
                                                                               monkeypatch):
    """Checked before each save: a full disk made orbax's save threads print hundreds of lines of tracebacks
    (measured on a 3 MiB tmpfs) and left a partial step folder."""
    from rnan_jax import checkpoint, paths

    assert paths.free_bytes("gs://bucket/run") is None and paths.free_bytes(str(tmp_path)) > 0
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    monkeypatch.setattr(paths, "free_bytes", lambda path: 2**20 if path.endswith("best") else 2**17)
    with pytest.raises(TrainingError, match=rf"^no room for checkpoint 6 in {re.escape(str(tmp_path))}/checkpoints: "
                       r"it needs about 0\.2 MiB, 0\.1 MiB are free; the last good checkpoint \(step 3\) is intact: "
                       r"make room and rerun to resume from it$"):
        train_and_evaluate(x4_config(images), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert os.listdir(tmp_path / "best") == ["6"]  # there was room there
    monkeypatch.setattr(paths, "free_bytes", lambda path: 100)  # best/ first, at step 3 of a new run
    with pytest.raises(TrainingError, match=r"^no room for checkpoint 3 in .*/fresh/best: it needs about 0\.\d MiB, "
                       r"0\.0 MiB are free; there is no checkpoint yet: make room and rerun to start afresh$"):
        train_and_evaluate(x4_config(images), str(tmp_path / "fresh"))
    assert checkpoint.complete_steps(str(tmp_path / "fresh" / "checkpoints")) == []


def test_a_full_disk_under_the_logs_stops_the_run_in_one_line(images, tmp_path, monkeypatch):
    """train.log, metrics.jsonl or TensorBoard's files failing to be written (a full disk) ended the run with a
    bare "[Errno 28] No space left on device", naming neither the workdir nor what was kept."""
    from rnan_jax import summary

    real, calls = summary.Writer.scalars, []

    def scalars(self, step, values):
        calls.append(step)
        if len(calls) == 3:  # step 4's training line, after step 3's checkpoint
            raise OSError(28, "No space left on device")
        real(self, step, values)

    monkeypatch.setattr(summary.Writer, "scalars", scalars)
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images), str(tmp_path))
    assert str(e.value) == (f"cannot write in {tmp_path} (No space left on device) at step 4; the last good "
                            "checkpoint (step 3) is intact: make room and rerun to resume from it")
    assert (tmp_path / "train.log").read_text().splitlines()[-1][21:] == f"stopped: TrainingError: {e.value}"


def test_tensorboards_writer_thread_failing_is_raised_in_the_callers_thread_and_closing_never_hangs(tmp_path, capfd):
    """tensorboardX writes events from a thread of its own: its OSError printed a traceback there and ended it,
    and the run went on until its queue (10 events) filled and add_scalar waited forever."""
    from rnan_jax import summary

    writer = summary.Writer(str(tmp_path / "tb"))
    writer.scalars(1, {"a": 1.0})
    events = next(iter(writer._writer.all_writers.values())).event_writer

    def full_disk(event):
        raise OSError(28, "No space left on device")

    events._ev_writer.write_event = full_disk
    writer.scalars(2, {"a": 2.0})
    events._worker.join(timeout=30)
    assert not events._worker.is_alive()
    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device, writing TensorBoard events$"):
        writer.scalars(3, {f"k{i}": float(i) for i in range(5)})
    with pytest.raises(OSError, match="writing TensorBoard events"):
        writer.close()
    writer.close()  # closed: nothing more to do, nothing left for tensorboardX's own close at exit
    assert events._closed
    assert "Traceback" not in capfd.readouterr().err


def test_a_resumed_run_continues_the_metrics_lines_of_a_url_workdir(tmp_path, monkeypatch):
    """On a gs:// workdir the scalars' JSON lines are written locally and copied over tensorboard/metrics.jsonl
    there: a resumed run (a preempted TPU VM's rerun) replaced the earlier runs' lines with its own."""
    from rnan_jax import summary

    remote = tmp_path / "bucket" / "tensorboard"  # a local folder taken for a URL: epath writes it alike
    monkeypatch.setattr(summary.paths, "is_url", lambda p: str(p).startswith(str(tmp_path / "bucket")))
    remote.mkdir(parents=True)
    for s, loss in ((100, 0.5), (200, 0.25)):  # the first run, then the resumed one
        writer = summary.Writer(str(remote))
        writer.scalars(s, {"train/loss": loss})
        writer.close()
    lines = [json.loads(line) for line in (remote / summary.METRICS_FILE).read_text().splitlines()]
    assert lines == [{"step": 100, "train/loss": 0.5}, {"step": 200, "train/loss": 0.25}]


def test_a_url_workdir_s_event_files_are_copied_at_most_once_a_minute_and_images_only_once(tmp_path, monkeypatch):
    """On a gs:// workdir the TensorBoard files are written locally and copied there whole. They were copied after
    every logged step, and every validation's image strips went into the one event file: over a 1M-step run
    hundreds of MB, copied again every 100 steps. Now a write of images ends its event file (copied then, once)
    and the rest is copied at most every mirror_every_s; TensorBoard reads the files in order, all values there."""
    from rnan_jax import scalars, summary

    remote = tmp_path / "bucket" / "tensorboard"  # a local folder taken for a URL: epath writes it alike
    monkeypatch.setattr(summary.paths, "is_url", lambda p: str(p).startswith(str(tmp_path / "bucket")))
    remote.mkdir(parents=True)
    copies = []
    write_bytes = summary.epath.Path.write_bytes
    monkeypatch.setattr(summary.epath.Path, "write_bytes",
                        lambda self, data: copies.append((self.name, len(data))) or write_bytes(self, data))
    strip = np.random.default_rng(0).integers(0, 256, (64, 256, 3), dtype=np.uint8)  # incompressible: 49 KiB
    writer = summary.Writer(str(remote))  # copies at most once a minute: only the first scalars, then images
    for s in range(1, 7):
        writer.scalars(s, {"train/loss": 1 / s})
        if s % 3 == 0:
            writer.images(s, {"val/strip": strip})
    writer.close()
    events = sorted(n for n in os.listdir(remote) if n.startswith("events.out.tfevents"))
    assert [n[-5:] for n in events] == [".0001", ".0002", ".0003"]  # begun at the start and after each images
    big = [(name, size) for name, size in copies if size > strip.size]
    assert sorted(big) == [(events[0], os.path.getsize(remote / events[0])),
                           (events[1], os.path.getsize(remote / events[1]))]  # each copied once, complete
    assert [name for name, _ in copies].count(summary.METRICS_FILE) == 3  # the first write, each images (not close)
    assert {s: round(v, 6) for s, (v, _) in scalars.read_scalars(str(remote))["train/loss"].items()} == {
        s: round(1 / s, 6) for s in range(1, 7)}
    lines = (remote / summary.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


_ORBAX_WRITE_FAILURE = (
    'RESOURCE_EXHAUSTED: Error writing "opt_state.1.1.count/0" in OCDBT database at local file "/w/checkpoints/6.'
    'orbax-checkpoint-tmp/opt.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/6.orbax-'
    'checkpoint-tmp/opt.orbax-checkpoint-tmp/ocdbt.process_0/d/3cce38": Failed to write 183120 bytes to file 13: No '
    "space left on device [os_error_code='28']")


def _a_failing_save_is_one_line(images, straight, tmp_path, monkeypatch, orbax_error):
    """A run resumed from step 3 whose next save raises ValueError(orbax_error) stops in one line, saying what is
    kept."""
    from rnan_jax import checkpoint

    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")

    def save_train_state(mngr, step, state, meta):
        raise ValueError(orbax_error)

    monkeypatch.setattr(checkpoint, "save_train_state", save_train_state)
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images), str(tmp_path))
    assert str(e.value) == (f"cannot save a checkpoint in {tmp_path} (No space left on device); the last good "
                            "checkpoint (step 3) is intact: make room and rerun to resume from it")


def test_a_checkpoint_that_fails_to_be_written_is_one_line_and_its_thread_reports_are_dropped(images, straight,
                                                                                              tmp_path, monkeypatch):
    """A save that the room check could not foresee (a user's quota): on a 3 MiB tmpfs orbax's save threads and
    tensorstore's callbacks printed 821 lines of tracebacks around "error: RESOURCE_EXHAUSTED: Error writing ..."
    (checked there: 16 lines now, ending in the one below)."""
    import logging

    from rnan_jax import checkpoint

    assert checkpoint.write_failure(ValueError(_ORBAX_WRITE_FAILURE)) == "No space left on device"
    assert checkpoint.write_failure(ValueError("RESOURCE_EXHAUSTED: Error writing x: quota")) == (
        "RESOURCE_EXHAUSTED: Error writing x: quota")
    assert checkpoint.write_failure(ValueError("a bad shape")) is None
    failure = (ValueError, ValueError(_ORBAX_WRITE_FAILURE), None)

    def record(pathname, msg, exc_info):
        return logging.LogRecord("absl", logging.ERROR, pathname, 1, msg, None, exc_info)

    orbax_thread = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
    assert not checkpoint._not_a_failed_write(record(orbax_thread, "_SignalingThread.run() raised", failure))
    assert not checkpoint._not_a_failed_write(record("/lib/asyncio/base_events.py", "_GatheringFuture exception "
                                                     "was never retrieved\nfuture: <...>", failure))
    assert checkpoint._not_a_failed_write(record(orbax_thread, "another error", (KeyError, KeyError("k"), None)))
    assert checkpoint._not_a_failed_write(record("/work/rnan_jax/trainer.py", "ours", failure))

    _a_failing_save_is_one_line(images, straight, tmp_path, monkeypatch, _ORBAX_WRITE_FAILURE)


def test_init_from_x2_to_x4(images, tmp_path, capsys, monkeypatch):
    x2 = x4_config(images, total_steps=2, **{"model.scale": 2})
    train_and_evaluate(x2, str(tmp_path / "x2"))
    source, _ = load(str(tmp_path / "x2"))
    # lr 0: the x4 run's parameters stay what init_from made them.
    x4 = x4_config(images, total_steps=1, init_from=str(tmp_path / "x2"),
                   **{"optim.lr": 0.0, "optim.schedule": "constant"})
    train_and_evaluate(x4, str(tmp_path / "x4"))
    out = capsys.readouterr().out
    assert "kept the fresh initialization for 2: ['up_1']['bias'], ['up_1']['kernel']" in out
    target, config = load(str(tmp_path / "x4"))
    assert config.scale == 4
    for name in ("head", "groups", "fuse1", "fuse3", "up_0", "tail"):  # x2's up_0 is C -> 4C, as x4's first
        assert _equal_trees(source[name], target[name]), name
    # both refused before the training data is read (a first DIV2K decode takes many minutes), init_from named
    monkeypatch.setattr(trainer.data, "train_iterator", lambda *a, **k: pytest.fail("the data was read first"))
    bad = x4_config(images, init_from=str(tmp_path / "x2"), **{"model.features": 16, "model.gc_reduction": 4})
    with pytest.raises(ValueError, match="differs beyond the scale .*features 8 vs 16"):
        train_and_evaluate(bad, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=f"^init_from: {tmp_path}/x3: no such file or folder$"):
        train_and_evaluate(x4_config(images, init_from=str(tmp_path / "x3")), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=f"{tmp_path}/no_val: no such"):  # so are missing validation images
        train_and_evaluate(x4_config(images, **{"data.val_dir": str(tmp_path / "no_val")}), str(tmp_path / "bad"))
    # a resumed run does not read it again (its source may be gone), and says so
    monkeypatch.undo()
    capsys.readouterr()
    train_and_evaluate(x4_config(images, total_steps=1, init_from=str(tmp_path / "x3")), str(tmp_path / "x4"))
    assert (f"init_from {tmp_path}/x3 not read: it starts a new run, and this one resumes its own checkpoint"
            in capsys.readouterr().out)


def test_init_from_a_run_with_ema_copies_its_ema(images, tmp_path, capsys):
    """The EMA is what an EMA run's validation scored and best/ holds; init_from copied the raw parameters."""
    train_and_evaluate(x4_config(images, total_steps=2, **{"model.scale": 2, "optim.ema_decay": 0.5}),
                       str(tmp_path / "x2"))
    ema, raw = load(str(tmp_path / "x2"), which="ema")[0], load(str(tmp_path / "x2"))[0]
    assert not _equal_trees(ema["head"], raw["head"])
    train_and_evaluate(x4_config(images, total_steps=1, init_from=str(tmp_path / "x2"),
                                 **{"optim.lr": 0.0, "optim.schedule": "constant"}), str(tmp_path / "x4"))
    assert f"init_from {tmp_path}/x2 (its EMA at step 2, x2 -> x4): copied " in capsys.readouterr().out
    target = load(str(tmp_path / "x4"))[0]
    for name in ("head", "groups", "fuse1", "fuse3", "up_0", "tail"):
        assert _equal_trees(ema[name], target[name]), name


def test_config_that_does_not_fit_fails_with_one_line(images, tmp_path):
    big = x4_config(images, **{"data.patch_size": 64})  # HR patch 256 > every image
    with pytest.raises(ValueError, match="no usable image"):
        train_and_evaluate(big, str(tmp_path / "big"))
    with pytest.raises(checkpoint.CheckpointError, match="not an rnan_jax checkpoint"):
        train_and_evaluate(x4_config(images, init_from=str(tmp_path)), str(tmp_path / "c"))


def _run_cli(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "rnan_jax.train", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600, **kw)


def test_cli_rejects_a_mistyped_config_key(images, tmp_path):
    r = _run_cli(["--config", "experiments/x4.py", "--workdir", str(tmp_path), "--config.optim.lrr=2e-4"])
    assert r.returncode != 0 and "lrr" in r.stderr
    r = _run_cli(["--config", "experiments/x4.py", "--workdir", str(tmp_path), "--config.totl_steps=10"])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        'error: --config.totl_steps: the config has no key \'totl_steps\'; did you mean "total_steps" instead of '
        '"totl_steps"? (python -m rnan_jax.train --config FILE --dry_run lists every key)']
    r = _run_cli(["--config", "experiments/x4.py", "--workdir", str(tmp_path),
                  *_flags(overrides(images, **{"data.hr_dirs": str(tmp_path / "missing")}))])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "missing" in r.stderr



def test_cli_rejects_a_config_file_it_cannot_read(tmp_path):
    """A wrong --config path (with or without overrides, which meet the load error while the flags are parsed)
    or a folder: one line naming why, and no workdir created."""
    workdir = tmp_path / "run"
    missing = f"[Errno 2] No such file or directory: 'experiments/x5.py' (a relative path: looked for in the current " \
              f"folder, {REPO})"
    for args, reason in ((["--config", "experiments/x5.py"], missing),
                         (["--config", "experiments/x5.py", "--config.total_steps=10"], missing),
                         (["--config", str(tmp_path)], f"[Errno 21] Is a directory: '{tmp_path}'")):
        r = _run_cli([*args, "--workdir", str(workdir)])
        assert (r.returncode, r.stderr.strip().splitlines()) == (1, [f"error: --config: {reason}"])
    # tools/compare_dtypes.py parses its --config the same way (rnan_jax.cli)
    r = subprocess.run([sys.executable, "tools/compare_dtypes.py", "--config", "experiments/x5.py", "--workdir",
                        str(workdir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr.strip().splitlines()) == (1, [f"error: --config: {missing}"])
    assert not workdir.exists()


def test_cli_names_the_fault_of_a_config_file_in_one_line(tmp_path):
    """A config file whose code fails (a syntax error, an exception in get_config, no get_config) or whose
    config does not fit the trainer's keys (a section missing, a key missing, a key nothing reads): one line
    naming the file, where each was a traceback through absl and ml_collections (30-60 lines)."""
    head = "from rnan_jax import configs\ndef get_config():\n    c = configs.default_config()\n"
    cases = {
        "def get_config(:\n    pass\n": ", line 1: SyntaxError: invalid syntax",
        "def get_config():\n    return 1 / 0\n": ", line 2: ZeroDivisionError: division by zero",
        "import no_such_module_here\n": ", line 1: ModuleNotFoundError: No module named 'no_such_module_here'",
        "x = 1\n": ": the file defines no get_config()",
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'lr': 1})\n":
            ": the config has no model, optim, data, execution sections: start it from "
            "rnan_jax.configs.default_config() (or paper_config(scale)), as experiments/*.py do",
        head + "    c.optim.wramup_steps = 10\n    return c\n":
            ": the config has a key that nothing reads: optim.wramup_steps (did you mean \"optim.warmup_steps\"?); "
            "python -m rnan_jax.train --config FILE --dry_run lists every key",
        head + "    del c['seed']\n    return c\n":
            ": the config lacks seed: start it from rnan_jax.configs.default_config() (or paper_config(scale)), "
            "as experiments/*.py do",
    }
    workdir = tmp_path / "run"
    for i, (text, line) in enumerate(cases.items()):
        path = tmp_path / f"cfg{i}.py"
        path.write_text(text)
        r = _run_cli(["--config", str(path), "--workdir", str(workdir), "--dry_run"])
        assert (r.returncode, r.stderr.strip().splitlines()) == (1, [f"error: --config {path}{line}"]), text
    assert not workdir.exists()


def test_cli_refuses_a_workdir_that_is_a_file(tmp_path):
    in_the_way = tmp_path / "run"
    in_the_way.write_text("notes")
    r = _run_cli(["--config", "experiments/x4.py", "--workdir", str(in_the_way)])
    assert (r.returncode, r.stderr.strip().splitlines()) == (
        1, [f"error: --workdir {in_the_way}: a file is in the way (the workdir is a folder)"])
    assert in_the_way.read_text() == "notes"


def test_a_second_run_in_a_workdir_where_one_trains_is_refused_in_one_line(images, tmp_path):
    """The same command started twice (another terminal, a stale process of an earlier attempt): both trained and
    wrote the same checkpoints and logs. The first holds workdir/train.lock (a flock, gone with its process)."""
    from rnan_jax import rundir

    workdir = tmp_path / "run"
    workdir.mkdir()
    with rundir.exclusive(str(workdir)):  # the first run, here in this process
        holder = (workdir / rundir.LOCK_FILE).read_text().strip()
        assert re.fullmatch(rf"pid {os.getpid()} on {re.escape(socket.gethostname())}, started .* UTC", holder)
        with pytest.raises(ValueError, match=re.escape(f"--workdir {workdir}: another run is training in it "
                                                       f"({holder}); let it finish or stop it first")):
            train_and_evaluate(x4_config(images, total_steps=1), str(workdir))
        assert sorted(os.listdir(workdir)) == [rundir.LOCK_FILE]  # nothing of the first run's touched
    train_and_evaluate(x4_config(images, total_steps=1), str(workdir))  # once it has ended
    assert os.listdir(workdir / "checkpoints") == ["1"]


def test_a_file_where_the_run_writes_a_folder_is_refused_before_training(images, tmp_path):
    """A file at workdir/checkpoints (or a workdir under a file) used to fail at the first save, steps into the
    run, with a traceback from orbax's save thread."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("notes")
    with pytest.raises(ValueError, match=f"^--workdir {tmp_path}/run: a file is in the way at {tmp_path}/run/"
                       "checkpoints \\(the run writes a folder there\\)$"):
        train_and_evaluate(x4_config(images), str(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints").read_text() == "notes"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]  # nothing trained or written
    with pytest.raises(ValueError, match=f"^--workdir {tmp_path}/run/checkpoints/sub: cannot create it "
                       "\\(Not a directory\\)$"):
        train_and_evaluate(x4_config(images), str(tmp_path / "run" / "checkpoints" / "sub"))


@pytest.mark.parametrize("signum,workers", [(signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_sigterm_or_ctrl_c_saves_a_checkpoint(images, tmp_path, signum, workers):
    """SIGTERM (a preemption notice) or a terminal's Ctrl-C (SIGINT to the whole process group, grain's worker
    processes included): a checkpoint of the step reached, one line saying where, exit 128 + the signal."""
    args = ["--config", "experiments/x4.py", "--workdir", str(tmp_path),
            *_flags(overrides(images, total_steps=100000, log_every=1, eval_every=100000,
                              checkpoint_every=100000, **{"data.num_workers": workers}))]
    proc = subprocess.Popen([sys.executable, "-m", "rnan_jax.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(600, proc.kill)  # a run that hangs fails the test rather than the whole suite
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                os.killpg(proc.pid, signum)
                break
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 128 + signum, out
    finally:
        watchdog.cancel()
        proc.kill()
    name = signal.Signals(signum).name
    step = int(out.split(f"{name}: saved a checkpoint at step ")[1].split()[0])
    assert step >= 2 and os.listdir(tmp_path / "checkpoints") == [str(step)]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "leaked shared_memory" not in out, out  # batches still queued at exit: unlinked, not worth a warning
    assert ("Ctrl-C: saving a checkpoint after this step" in out) == (signum == signal.SIGINT)
    _, config = load(str(tmp_path))
    assert config.scale == 4



def _spawned_children(pid):
    """The multiprocessing "spawn" children of process `pid` (grain's worker processes), once they have exec'd."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == pid and spawned:
            found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker processes in /proc")
@pytest.mark.parametrize("when", ["starting", "training"])
def test_a_data_worker_that_dies_stops_the_run_in_one_line_and_the_step_reached_is_saved(tmp_path, when):
    """A grain worker killed (as the out-of-memory killer does) while it starts, before it has read its share of
    the demo images from the pipe, hung the run forever at "compiling the train step" (CPython's gh-118981),
    deaf to SIGTERM; killed while training, the run stopped without saving the steps since the last checkpoint.
    Now both are one line naming the signal, with a checkpoint of the step reached (the batch it died at)."""
    values = {**{f"model.{k}": v for k, v in TINY_MODEL.items()}, "total_steps": 100000, "log_every": 1,
              "eval_every": 100000, "checkpoint_every": 100000, "data.patch_size": 8, "data.num_workers": 2}
    proc = subprocess.Popen([sys.executable, "-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir",
                             str(tmp_path), *_flags(values)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = []

    def kill_a_worker():
        while proc.poll() is None and not killed:
            if workers := _spawned_children(proc.pid):
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
            time.sleep(0.005)

    try:
        if when == "starting":  # the moment it exists: it then imports for seconds before reading its work
            threading.Thread(target=kill_a_worker, daemon=True).start()
        else:
            for line in proc.stdout:
                if line.startswith("step 3/"):
                    kill_a_worker()
                    break
        out = proc.communicate(timeout=150)[0]  # a hang fails here
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    assert killed and proc.returncode == 1, out
    assert "Traceback" not in out, out
    error = [line for line in out.splitlines() if line.startswith("error: ")]
    match = re.fullmatch(r"error: a data worker process died at batch (\d+) \(killed by SIGKILL, as the kernel's "
                         r"out-of-memory killer does\); rerun to resume from the last checkpoint, with a lower "
                         r"data.num_workers or data.worker_buffer_size if memory ran out; (.*)", error[-1])
    assert len(error) == 1 and match, out
    reached = int(match.group(1))  # batch n is step n + 1's: n steps were trained
    assert reached >= 3 if when == "training" else reached <= 1
    if reached == 0:
        assert match.group(2) == "there is no checkpoint yet: a rerun starts afresh"
        assert not os.listdir(tmp_path / "checkpoints")
    else:
        assert match.group(2) == f"the last checkpoint is step {reached}, saved now, in {tmp_path}/checkpoints"
        assert os.listdir(tmp_path / "checkpoints") == [str(reached)]
        assert checkpoint.read_meta(str(tmp_path / "checkpoints"), reached)["step"] == reached


def test_distributed_misuse_is_one_line_and_a_silent_coordinator_times_out(tmp_path):
    """--num_processes without --distributed was ignored (each process trained alone); a --process_id out of
    range was JAX's traceback; a coordinator that never answers aborted the process (SIGABRT, a C++ stack
    trace) after 300 s. Each is one line, exit status 1, and no workdir."""
    workdir, port = tmp_path / "run", _free_port()
    base = ["--config", "experiments/x4.py", "--workdir", str(workdir), "--dry_run"]
    env = {"JAX_PLATFORMS": "cpu"}
    r = _run_cli([*base, "--num_processes=2"], env=env)
    assert (r.returncode, r.stderr.strip().splitlines()) == (
        1, ["train: error: --num_processes without --distributed: add it (a multi-host run) (see --helpshort)"])
    r = _run_cli([*base, "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  "--process_id=2"], env=env)
    assert (r.returncode, r.stderr.strip().splitlines()) == (
        1, ["error: --process_id 2 is not one of the 2 processes' indices (0 to 1)"])
    r = _run_cli([*base, "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  "--process_id=1", "--distributed_timeout=2"], env=env)
    assert (r.returncode, r.stderr.strip().splitlines()) == (1, [
        f"error: --distributed: not every process joined the coordinator 127.0.0.1:{port} within 2 s (is process "
        "0 running there and reachable, and was every process started with the same --num_processes? "
        "--distributed_timeout sets the wait)"]), r.stderr[-3000:]
    assert not workdir.exists()


_SIGTERM_WHILE_RESUMING = """
import os, runpy, signal, sys
from rnan_jax import checkpoint
real = checkpoint.restore_train_state

def restore(*args):  # a preemption notice in the middle of the resume, before any step
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)

checkpoint.restore_train_state = restore
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("rnan_jax.train", run_name="__main__")
"""


def test_sigterm_before_the_first_step_stops_in_one_line_and_keeps_the_checkpoint(images, straight, tmp_path):
    """SIGTERM during the set-up (here: while the checkpoint is restored) killed the process outright: no line,
    nothing in train.log. Now: one line, status 143, train.log's last line says so, and the checkpoint is not
    taken for a damaged one (Preempted raised inside the restore is no Exception); the rerun resumes from it."""
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    args = ["--config", "experiments/x4.py", "--workdir", str(tmp_path), *_flags(overrides(images))]
    r = subprocess.run([sys.executable, "-c", _SIGTERM_WHILE_RESUMING, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    line = ("SIGTERM before the first step: nothing trained, nothing to save; rerun the same command to start (or "
            "resume from the latest checkpoint)")
    assert (r.returncode, r.stdout.strip().splitlines()[-1]) == (143, line), r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert (tmp_path / "train.log").read_text().splitlines()[-1][21:] == f"stopped: Preempted: {line}"
    assert os.listdir(tmp_path / "checkpoints") == ["3"] and not (tmp_path / "checkpoints_damaged").exists()
    train_and_evaluate(x4_config(images, total_steps=4), str(tmp_path))
    assert f"resumed from {tmp_path}/checkpoints/3 (step 3)" in (tmp_path / "train.log").read_text()



_SIGTERM_TWICE_WHILE_VALIDATING = """
import os, runpy, signal, sys
from rnan_jax import validation
real = validation.Validator.__call__

def validate(self, *args):  # two preemption notices in the middle of the step-3 validation
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *args)

validation.Validator.__call__ = validate
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("rnan_jax.train", run_name="__main__")
"""


def test_a_set_up_signal_whose_exception_was_ignored_still_stops_the_run_before_the_first_step():
    """SIGTERM during the set-up raises Preempted from the handler; landing inside JAX's garbage-collection
    callback, the exception was ignored ("Exception ignored in: <function _xla_gc_callback>") and the run trained
    to the end (2 of 10 tries). The signal is now also a flag, which ends the set-up the same way."""
    from rnan_jax import preemption

    for signum, stop in ((signal.SIGTERM, preemption.Preempted), (signal.SIGINT, KeyboardInterrupt)):
        with preemption.Preemption() as signals:
            signals.before_training = "start (or resume from the latest checkpoint)"
            try:
                signals._handle(signum, None)  # what the callback's caller then ignores
            except BaseException as e:
                assert isinstance(e, stop)
            with pytest.raises(stop) as raised:
                signals.training_begins()
            if stop is preemption.Preempted:
                assert str(raised.value) == ("SIGTERM before the first step: nothing trained, nothing to save; "
                                             "rerun the same command to start (or resume from the latest checkpoint)")
        with preemption.Preemption() as signals:  # no signal: training begins
            signals.before_training = "start"
            signals.training_begins()
            assert signals.before_training is None and not signals.requested


def test_a_second_ctrl_c_interrupts_also_after_a_sigterm_requested_the_stop():
    """After SIGTERM, every Ctrl-C only printed "Ctrl-C again: stop now" again: nothing but kill -9 stopped a run
    that hung between steps (a data worker dead at start-up)."""
    from rnan_jax import preemption

    for first in (signal.SIGTERM, signal.SIGINT):
        with preemption.Preemption() as signals:
            signals._handle(first, None)
            if first == signal.SIGTERM:
                signals._handle(signal.SIGINT, None)  # the first Ctrl-C: a message, the stop already requested
            with pytest.raises(KeyboardInterrupt):
                signals._handle(signal.SIGINT, None)
            assert signals.requested and signals.signum == first  # what the save's line then names


def test_sigterm_twice_while_validating_saves_that_step_and_resumes_exactly(images, straight, tmp_path):
    """The step-3 validation is stopped (its scores are no one's), step 3 saved, and the rerun validates step 3 first:
    the curve has the uninterrupted run's values. In the last step too: the run is not complete until validated (it
    ended with status 0 after the whole validation, which may outlast a preemption notice)."""
    from rnan_jax import figures

    args = ["--config", "experiments/x4.py", "--workdir", str(tmp_path), *_flags(overrides(images))]
    r = subprocess.run([sys.executable, "-c", _SIGTERM_TWICE_WHILE_VALIDATING, *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    line = (f"SIGTERM while validating step 3: saved a checkpoint at step 3 in {tmp_path}/checkpoints; rerun the "
            "same command to validate it and resume")
    assert (r.returncode, r.stdout.strip().splitlines()[-1]) == (143, line), r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "train.log").read_text().splitlines()[-1][21:] == f"stopped: Preempted: {line}"
    assert os.listdir(tmp_path / "checkpoints") == ["3"] and "validation PSNR" not in r.stdout
    train_and_evaluate(x4_config(images), str(tmp_path))
    assert _equal_trees(load(str(straight[0]))[0], load(str(tmp_path))[0])
    assert figures.read_validation(str(tmp_path)) == figures.read_validation(str(straight[0]))  # steps 3 and 6
    # in the last step: saved, and the rerun validates it and ends as a complete run
    args = ["--config", "experiments/x4.py", "--workdir", str(tmp_path / "last"), *_flags(overrides(images)),
            "--config.total_steps=3"]
    r = subprocess.run([sys.executable, "-c", _SIGTERM_TWICE_WHILE_VALIDATING, *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    line = (f"SIGTERM while validating step 3: saved a checkpoint at step 3 in {tmp_path}/last/checkpoints; rerun "
            "the same command to validate it")
    assert (r.returncode, r.stdout.strip().splitlines()[-1]) == (143, line), r.stdout[-2000:] + r.stderr[-2000:]
    assert os.listdir(tmp_path / "last" / "checkpoints") == ["3"]
    assert checkpoint.complete_steps(str(tmp_path / "last" / "best")) == []
    assert (f"workdir: {tmp_path}/last (exists; a stop ended the validation of its step 3: the run validates it, "
            "then is done); dry run") in dry_run(x4_config(images, total_steps=3), str(tmp_path / "last"))
    results = train_and_evaluate(x4_config(images, total_steps=3), str(tmp_path / "last"))
    steps, psnrs, _ = figures.read_validation(str(straight[0]))
    assert results["val/psnr"] == psnrs[steps.index(3)]
    assert figures.read_validation(str(tmp_path / "last"))[:2] == ([3], [psnrs[steps.index(3)]])
    assert checkpoint.complete_steps(str(tmp_path / "last" / "best")) == [3]
    log = (tmp_path / "last" / "train.log").read_text()
    assert "done: 3 steps;" in log and "nothing to do" not in log


def test_the_logged_learning_rate_is_the_one_the_step_applied(images, tmp_path, monkeypatch):
    """Skipped steps (loss spikes) do not advance the optimizer's schedule: the logged lr was the schedule at
    the step number, ahead of the rate applied by every step skipped."""
    from rnan_jax import step

    monkeypatch.setattr(step, "_SKIP_WARMUP", 0)  # every step a spike: the running loss starts at 0
    config = x4_config(images, total_steps=4, eval_every=4, checkpoint_every=4, **{
        "optim.skip_threshold": 2.0, "optim.decay_every": 1, "optim.decay_factor": 0.5})
    results = train_and_evaluate(config, str(tmp_path))
    assert results["skipped"] == 2  # steps 3 and 4, both skipped: no update applied yet
    assert results["lr"] == pytest.approx(1e-3)  # the schedule at count 0, not 1e-3 * 0.5**3


def test_the_logged_speed_leaves_out_validation_and_checkpoint_saves(images, tmp_path, monkeypatch):
    """steps/s (and patches/s, ETA) is the train step's: the log after a validation and a checkpoint save counted
    them as training time (the demo's 15-23 steps/s read 4.2 after each validation)."""
    import time

    from rnan_jax import trainer

    def slow_validation(*args):
        time.sleep(2.0)
        return real(*args)

    real = trainer._validate
    monkeypatch.setattr(trainer, "_validate", slow_validation)
    config = x4_config(images, total_steps=4, log_every=2, eval_every=2, checkpoint_every=2)
    train_and_evaluate(config, str(tmp_path))
    logs = [json.loads(line) for line in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    rate = {log["step"]: log["train/steps_per_s"] for log in logs if "train/steps_per_s" in log}
    assert sorted(rate) == [2, 4] and rate[4] > 1.5  # steps 3 and 4 in well under a second; with the 2 s: < 1


_SECOND_CTRL_C = """
import os, runpy, signal, sys
from rnan_jax import checkpoint
real, calls = checkpoint.save_train_state, []

def save(*args):  # Ctrl-C after the save at step 3 (asks for a checkpoint), again right after the one it asks for
    real(*args)
    calls.append(args[1])
    os.kill(os.getpid(), signal.SIGINT)

checkpoint.save_train_state = save
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("rnan_jax.train", run_name="__main__")
"""


def test_a_second_ctrl_c_while_saving_stops_at_once_in_one_line(images, straight, tmp_path):
    """Ctrl-C, then Ctrl-C again while the checkpoint it asked for is being written: the run stops without
    waiting for the save, in one line with status 130, none of orbax's errors from its interrupted wait or
    from its save threads at exit; a partial step folder left behind goes when a run next opens the workdir."""
    args = ["--config", "experiments/x4.py", "--workdir", str(tmp_path / "run"),
            *_flags(overrides(images, total_steps=100, eval_every=100))]
    r = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"train: interrupted: stopped without a checkpoint of the step reached; rerun the same command to resume "
        f"from the latest complete one in {tmp_path}/run/checkpoints"), r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
    assert not re.search(r"^[EW]\d{4} ", r.stdout + r.stderr, re.M), r.stderr[-3000:]  # absl's error lines
    # A save cut short leaves <step>.orbax-checkpoint-tmp: the next run removes it and resumes from step 6.
    workdir = tmp_path / "partial"
    shutil.copytree(straight[0], workdir)
    shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / "9.orbax-checkpoint-tmp")
    os.remove(workdir / "checkpoints" / "9.orbax-checkpoint-tmp" / "params" / "_METADATA")
    train_and_evaluate(x4_config(images, total_steps=6), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir, values, *, stderr=subprocess.STDOUT):
    """Two CPU processes of one --distributed run of experiments/x4.py with `values`, their output piped."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return [subprocess.Popen([sys.executable, "-m", "rnan_jax.train", "--config", "experiments/x4.py",
                              "--workdir", str(workdir), "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                              "--num_processes=2", f"--process_id={i}", *_flags(values)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
            for i in range(2)]


def _two_processes(images, workdir, total_steps):
    procs = _start_two_processes(workdir, overrides(images, **_elastic_values(total_steps)))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append(p.communicate()[0] + "\n[killed after 240 s]")
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    return outs[0]


def _elastic_values(total_steps):
    return dict(total_steps=total_steps, batch_size=8, checkpoint_every=2, eval_every=2, log_every=1)


def _close(a, b):
    """Equal up to the reduction order of sharded sums: after 4 Adam steps that differs by up to 2.1e-6 on
    an Intel Xeon (1e-6 on an AMD EPYC), while a lost step or a wrong batch moves parameters by about the
    learning rate, 1e-3."""
    leaves = list(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    return len(leaves) > 0 and all(np.allclose(x, y, atol=1e-5, rtol=0) for x, y in leaves)


def test_elastic_resume_from_one_process_to_two(images, straight_b8, tmp_path):
    """Checkpointed by one process at step 2, resumed by two processes (2 devices) to step 4: the same
    global batches, so the parameters of an uninterrupted one-process run (up to the reduction order)."""
    straight, elastic = straight_b8, tmp_path / "elastic"
    shutil.copytree(straight / "checkpoints" / "2", elastic / "checkpoints" / "2")
    out = _two_processes(images, elastic, total_steps=4)
    assert "on 2 cpu device(s), 2 process(es)" in out and "resumed from" in out and "step 4/4" in out, out[-3000:]
    assert sorted(os.listdir(elastic / "checkpoints")) == ["2", "4"]
    assert _close(load(str(straight))[0], load(str(elastic))[0])


@pytest.fixture(scope="module")
def straight_b8(images, tmp_path_factory):
    """One device, batch 8, 4 steps with checkpoints at 2 and 4: the elastic tests' reference."""
    workdir = tmp_path_factory.mktemp("straight_b8")
    train_and_evaluate(x4_config(images, **_elastic_values(4)), str(workdir))
    return workdir



def test_a_process_that_dies_ends_the_others_in_one_line(images, tmp_path):
    """One of two processes killed mid-run: the other printed JAX's traceback of the failed collective, then
    waited in jax.distributed.shutdown for the lost process until its heartbeat timeout and aborted there
    (status 134, a C++ stack trace), 90 s later. Now: one line, status 1, at once."""
    values = overrides(images, total_steps=100000, batch_size=8, log_every=1, eval_every=100000,
                       checkpoint_every=100000)
    procs = _start_two_processes(tmp_path, values, stderr=subprocess.PIPE)
    try:
        for line in procs[0].stdout:
            if line.startswith("step 3/"):
                procs[1].kill()
                break
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    lines = err.strip().splitlines()
    assert procs[0].returncode == 1 and "Traceback" not in out + err, err[-3000:]
    assert lines[-1].startswith("error: ") and lines[-1].endswith(
        "(a collective with the other processes failed: did one of them stop? The latest complete checkpoint is "
        "kept; rerun every process to resume from it)"), err[-3000:]
    last = (tmp_path / "train.log").read_text().splitlines()[-1][21:]
    assert re.match(r"stopped: (JaxRuntimeError|ValueError): [A-Z_]+: ", last), last  # where the collective failed


def test_processes_that_read_different_training_images_stop_in_one_line(images, tmp_path):
    """Process 1 given a folder with one image more: each process cut its part of every global batch from its
    own list of images, so the global batches were no one sequence, and nothing said so (both trained to the
    end). Now: one line in each process, status 1, before any checkpoint."""
    more, workdir = tmp_path / "more", tmp_path / "run"
    shutil.copytree(images / "train", more)
    shutil.copy(images / "val" / "0006.png", more / "0006.png")  # 36x36: usable at x4 with 6-pixel LR patches
    values = overrides(images, total_steps=2, batch_size=8, log_every=1, eval_every=2, checkpoint_every=2)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs, logs = [], [tmp_path / f"process{i}.log" for i in range(2)]
    for i, hr_dirs in enumerate([images / "train", more]):
        with open(logs[i], "w") as log:  # files, not pipes: one process's full pipe cannot stall the other
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rnan_jax.train", "--config", "experiments/x4.py", "--workdir", str(workdir),
                 "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *_flags({**values, "data.hr_dirs": hr_dirs})],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outs = [log.read_text() for log in logs]
    line = ("error: the processes' training images differ (process 0: 6 images, process 1: 7): every process must "
            "read the same images (a copy that differs, or an image one of them skipped: see its warnings)")
    assert codes == [1, 1] and all("Traceback" not in out for out in outs), "\n----\n".join(o[-3000:] for o in outs)
    assert [out.strip().splitlines()[-1] for out in outs] == [line, line], "\n----\n".join(o[-3000:] for o in outs)
    assert [checkpoint.complete_steps(str(workdir / d)) for d in (checkpoint.CHECKPOINTS, checkpoint.BEST)] == [[], []]


_ELASTIC_DEVICES = """
import sys, jax
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_train import x4_config, _elastic_values
from rnan_jax.trainer import train_and_evaluate
train_and_evaluate(x4_config(Path({images!r}), **_elastic_values({steps})), {workdir!r})
print("devices", jax.device_count())
if jax.device_count() == 8:
    try:
        train_and_evaluate(x4_config(Path({images!r}), batch_size=12), {workdir!r} + "_odd")
    except ValueError as e:
        print("error:", e)
"""


_TWO_DEVICES = """
import sys, jax
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_train import x4_config
from rnan_jax import init, upscalers, validation
from rnan_jax.configs import TrainConfig
from rnan_jax.trainer import train_and_evaluate
config = x4_config(Path({images!r}))
validator = validation.Validator(TrainConfig.from_config(config))
params = init(jax.random.key(0), TrainConfig.from_config(config).model)
mesh = jax.make_mesh((2,), ("data",))
replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
seen, model_upscaler = [], upscalers.model_upscaler
def spy(p, *args, **kwargs):
    seen.append(sorted({{len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(p)}}))
    return model_upscaler(p, *args, **kwargs)
upscalers.model_upscaler = spy
print("validation", seen if validator(replicated, 0)[0] == validator(params, 0)[0] else "differs", flush=True)
train_and_evaluate(x4_config(Path({images!r}), total_steps=1, init_from={source!r},
                             **{{"optim.lr": 0.0, "optim.schedule": "constant"}}), {workdir!r})
print("devices", jax.device_count())
"""


def test_two_devices_validate_on_one_and_start_from_init_from(images, straight, tmp_path):
    """With parameters replicated over the devices, validation upscaled every image on each device; and a run
    started with init_from on 2 devices failed at once ("Received incompatible devices for jitted computation")."""
    script = _TWO_DEVICES.format(tests=os.path.dirname(__file__), images=str(images), source=str(straight[0]),
                                 workdir=str(tmp_path / "run"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert "validation [[1], [1]]" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0 and "devices 2" in r.stdout, r.stderr[-3000:]
    assert _equal_trees(load(str(tmp_path / "run"))[0], load(str(straight[0]))[0])  # lr 0: init_from's


def test_eight_devices_then_two_give_the_parameters_of_one(images, straight_b8, tmp_path):
    """Two steps on 8 devices equal two on one (the batch sharded, the state replicated); resumed on 2
    devices to step 4 (elastic resume), they equal an uninterrupted one-device run. A batch that does not
    split over the devices fails at start-up in one line."""
    elastic = tmp_path / "elastic"
    for devices, steps in ((8, 2), (2, 4)):
        script = _ELASTIC_DEVICES.format(tests=os.path.dirname(__file__), images=str(images), steps=steps,
                                         workdir=str(elastic))
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_PLATFORMS": "cpu"}
        r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0 and f"devices {devices}" in r.stdout, r.stderr[-3000:]
        if devices == 8:
            assert "error: batch_size 12 is not divisible by the 8 devices" in r.stdout
            assert _close(load(str(straight_b8 / "checkpoints" / "2"))[0], load(str(elastic))[0])
    assert "resumed from" in r.stdout + r.stderr
    assert _close(load(str(straight_b8))[0], load(str(elastic))[0])


def test_dry_run_prints_the_config_and_count_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    r = _run_cli(["--config", "experiments/x4.py", "--workdir", str(workdir), "--dry_run"])
    assert r.returncode == 0, r.stderr
    assert "model: RNAN x4, 17,303,749 parameters" in r.stdout
    assert "  optim.lr = 0.0001" in r.stdout and "  data.patch_size = 48" in r.stdout
    assert re.search(r"global batch 16 \(16 per device(, in \d chunk\(s\))?\) of 48x48", r.stdout), r.stdout
    assert "1 process(es)" in r.stdout
    assert f"workdir: {workdir} (not created yet; a run creates it)" in r.stdout
    assert not workdir.exists()
    # A file where the workdir would be: the dry run says the run would stop there (as the run does).
    workdir.write_text("notes")
    out = dry_run(runpy.run_path(os.path.join(REPO, "experiments", "small291.py"))["get_config"](), str(workdir))
    assert f"workdir: {workdir} (a file is in the way (the workdir is a folder): the run would stop)" in out
    assert workdir.read_text() == "notes"
    # a batch split the step cannot make: the dry run said nothing, the run stopped at once
    odd = runpy.run_path(os.path.join(REPO, "experiments", "small291.py"))["get_config"]()
    odd.batch_size, odd.execution.batch_chunks = 2, 3
    assert ("global batch 2 (2 per device; execution.batch_chunks 3 does not divide the per-device batch 2: the "
            "run would stop)") in dry_run(odd, str(tmp_path / "odd"))
    # ... or where the run writes a folder; and a workdir with checkpoints says which step the run resumes from
    config = runpy.run_path(os.path.join(REPO, "experiments", "small291.py"))["get_config"]()
    workdir.unlink()
    (workdir / "checkpoints" / "1200" / "params").mkdir(parents=True)
    (workdir / "checkpoints" / "3400" / "params").mkdir(parents=True)
    (workdir / "checkpoints" / "3600.orbax-checkpoint-tmp-17").mkdir()  # an interrupted save
    assert f"workdir: {workdir} (exists; the run resumes from its step 3400)" in dry_run(config, str(workdir))
    (workdir / "best").write_text("")
    assert (f"workdir: {workdir} (a file is in the way at {workdir}/best (the run writes a folder there): the run "
            "would stop)") in dry_run(config, str(workdir))


def _damage(workdir, step, name):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "params", name))


@pytest.mark.parametrize("missing", ["_METADATA", "manifest.ocdbt"])
def test_a_damaged_latest_step_is_named_and_training_resumes_before_it(images, straight, tmp_path, missing, capsys):
    straight, damaged = straight[0], tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    _damage(damaged, 6, missing)
    # load (and so evaluate, upscale, export) names the step and the one to use instead, in one line.
    with pytest.raises(checkpoint.CheckpointError) as e:
        load(str(damaged))
    assert str(e.value) == (f"{damaged}/checkpoints/6: damaged checkpoint ({damaged}/checkpoints/6/params: "
                            f"{missing} missing); the steps before it: 3 (pass {damaged}/checkpoints/3 to use "
                            "the newest)")
    r = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--checkpoint", str(damaged), "--datasets",
                        "Set5", "--data_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"evaluate: cannot load --checkpoint: {e.value}"], r.stderr
    # Training resumes from step 3, keeps the damaged step aside, and ends where a straight run does.
    capsys.readouterr()
    train_and_evaluate(x4_config(images), str(damaged))
    out = capsys.readouterr().out
    assert f"moved it to {damaged}/checkpoints_damaged/6; trying the step before it" in out
    assert f"resumed from {damaged}/checkpoints/3" in out
    assert os.listdir(damaged / "checkpoints_damaged" / "6" / "params")
    assert _equal_trees(load(str(straight))[0], load(str(damaged))[0])


def test_unretrieved_failed_reads_are_dropped_from_asyncio_s_log_and_nothing_else():
    """A damaged checkpoint's late read failures, as asyncio reports them when the task is collected: orbax's
    async_deserialize(), or, as the timing falls, the _wrap_awaitable() around a tensorstore read (seen once in
    CI: the test below then got 8 lines, not 1). Any other task's failure is still reported."""
    import logging

    from rnan_jax.checkpoint import _not_an_unretrieved_read

    spec = "[tensorstore_spec='{\"driver\":\"zarr\"}']"
    read = ValueError(f'NOT_FOUND: Error opening "zarr" driver: Error reading "up_1.bias/.zarray" {spec}')

    def record(coro, error):
        msg = f"Task exception was never retrieved\nfuture: <Task finished name='Task-70' coro=<{coro}() done>"
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1771, msg, None,
                                 (type(error), error, None))

    assert not _not_an_unretrieved_read(record("async_deserialize", read))
    assert not _not_an_unretrieved_read(record("_wrap_awaitable", read))
    assert _not_an_unretrieved_read(record("_wrap_awaitable", RuntimeError("boom")))
    assert _not_an_unretrieved_read(record("fetch_page", read))
    assert _not_an_unretrieved_read(logging.LogRecord("asyncio", logging.ERROR, "x.py", 1, "Executing <Task> took "
                                                      "0.2 seconds", None, None))
    # orbax 0.12's per-shard read: dropped when it says so, reported otherwise
    shard = ValueError(f"Encountered error while reading array index: (slice(None),). {read}")
    assert not _not_an_unretrieved_read(record("_read_array_index_and_device_put", shard))
    assert _not_an_unretrieved_read(record("_read_array_index_and_device_put", RuntimeError("boom")))


def test_a_damaged_step_s_line_gives_the_read_s_reason_not_orbax_s_wrapper(tmp_path):
    """orbax 0.12 wraps a failed shard read in "Encountered error while reading array index: (slice(None),
    ...). <bound method ...>", cut off at 200 characters before the reason, which is its cause."""
    from rnan_jax.checkpoint import damaged

    reason = ValueError('OUT_OF_RANGE: Error reading "groups.fuse3.kernel/c/0": unexpected end of file')
    try:
        try:
            raise reason
        except ValueError as e:
            raise ValueError("Encountered error while reading array index: (slice(None, None, None),). "
                             + "<bound method pybind11_detail_function_record ..." * 8) from e
    except ValueError as wrapped:
        line = str(damaged(str(tmp_path / "checkpoints"), 6, wrapped))
    assert line == (f"{tmp_path}/checkpoints/6: damaged checkpoint (ValueError: OUT_OF_RANGE: Error reading "
                    '"groups.fuse3.kernel/c/0": unexpected end of file)')


def test_orbax_s_abandoned_read_coroutines_closed_when_collected_are_not_reported():
    """After a damaged checkpoint's read failed, orbax 0.12's per-shard read coroutines left unawaited are closed
    when collected; their `except BaseException` re-raises the GeneratorExit as an Exception, which Python
    printed as "Exception ignored in: <coroutine object _read_array_index_and_device_put>" with a 60-line
    TensorStore spec (1,172-1,681 lines over three resumed runs). Others' unraisables are still reported."""
    import types

    from rnan_jax.checkpoint import _closed_loop_callback

    def unraisable(filename, cause):
        error = ValueError("Encountered error while reading array index")
        error.__cause__ = cause
        code = compile("pass", filename, "exec")
        return types.SimpleNamespace(exc_value=error, object=types.SimpleNamespace(cr_code=code))

    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    assert _closed_loop_callback(unraisable(orbax_file, GeneratorExit()))
    assert not _closed_loop_callback(unraisable(orbax_file, KeyError("x")))  # a real failure
    assert not _closed_loop_callback(unraisable(os.path.join(os.sep, "mine", "reader.py"), GeneratorExit()))
    assert _closed_loop_callback(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None))


def test_checkpoints_with_their_array_data_gone_are_reported_in_one_line_each(images, straight, tmp_path):
    """Every step's params/d (the arrays' data files) deleted: orbax fails inside its reads, whose late callbacks
    would print dozens of 'Event loop is closed' tracebacks; evaluate says one line, and training names each
    damaged step, keeps it aside and starts afresh."""
    damaged = tmp_path / "damaged"
    shutil.copytree(straight[0], damaged)
    for step in (3, 6):
        shutil.rmtree(damaged / "checkpoints" / str(step) / "params" / "d")
    r = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--checkpoint", str(damaged), "--datasets",
                        "Set5", "--data_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"evaluate: cannot load --checkpoint: {damaged}/checkpoints/6: damaged checkpoint (")
    r = _run_cli(["--config", "experiments/x4.py", "--workdir", str(damaged), *_flags(overrides(images))])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Event loop is closed" not in out and "Traceback" not in out, out
    assert f"; moved it to {damaged}/checkpoints_damaged/6; trying the step before it" in out
    assert f"; moved it to {damaged}/checkpoints_damaged/3; no checkpoint before it: training starts afresh" in out
    assert sorted(os.listdir(damaged / "checkpoints")) == ["3", "6"]
    assert _equal_trees(load(str(straight[0]))[0], load(str(damaged))[0])


def test_a_workdir_of_another_architecture_is_refused_in_one_line(images, tmp_path):
    train_and_evaluate(x4_config(images, total_steps=3, **{"model.scale": 2}), str(tmp_path))
    with pytest.raises(ValueError) as e:
        train_and_evaluate(x4_config(images, total_steps=6, **{"model.scale": 3}), str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"{tmp_path} holds an x2 model (features 8, 1 groups x 2 blocks") and "\n" not in message
    assert "the config asks for an x3 model (features 8" in message and "strict" not in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # nothing lost


def test_switching_ema_on_at_resume_starts_it_from_the_checkpoint(images, straight, tmp_path, capsys):
    """A run saved without EMA, resumed with optim.ema_decay > 0: its checkpoints were taken for damaged
    (no ema item), moved aside and training silently started again from step 0."""
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    capsys.readouterr()
    train_and_evaluate(x4_config(images, total_steps=4, **{"optim.ema_decay": 0.5}), str(tmp_path))
    out = capsys.readouterr().out
    assert f"{tmp_path}/checkpoints/3 holds no EMA (saved with optim.ema_decay 0): the EMA starts from its " \
        "parameters" in out
    assert f"resumed from {tmp_path}/checkpoints/3 (step 3)" in out
    assert not (tmp_path / "checkpoints_damaged").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]
    at3, _ = load(str(straight[0] / "checkpoints" / "3"))
    params, _ = load(str(tmp_path))
    ema, _ = load(str(tmp_path), which="ema")
    # One step of EMA 0.5 from the step-3 parameters: halfway between them and the step-4 parameters.
    for e, p, q in zip(*(jax.tree_util.tree_leaves(t) for t in (ema, params, at3))):
        np.testing.assert_allclose(e, 0.5 * p + 0.5 * q, rtol=1e-6, atol=1e-7)


def test_the_best_checkpoint_of_an_ema_run_loads_the_parameters_that_scored_best(images, tmp_path):
    """With EMA on, validation scores the EMA and best/ is picked by its PSNR: load(which="best") (evaluate and
    upscale --which best) gave the raw parameters of that step, which score otherwise."""
    from rnan_jax import degrade
    from rnan_jax.images import read_rgb

    results = train_and_evaluate(x4_config(images, total_steps=2, eval_every=2, checkpoint_every=2,
                                           **{"optim.ema_decay": 0.5}), str(tmp_path))
    best, _ = load(str(tmp_path), which="best")
    assert _equal_trees(best, load(str(tmp_path), which="ema")[0])
    assert not _equal_trees(best, load(str(tmp_path))[0])
    hr = read_rgb(images / "val" / "0006.png")
    sr = metrics.quantize(apply(best, degrade.bicubic_lr(hr, 4).astype(np.float32) / 255.0))
    psnr = metrics.psnr_y(sr, degrade.modcrop(hr, 4), 4)
    assert psnr == pytest.approx(results["val/psnr"], abs=1e-9)
    assert psnr == pytest.approx(checkpoint.read_meta(str(tmp_path / "best"), 2)["val_psnr"], abs=1e-9)


def _set_meta(step_dir, **values):
    path = step_dir / "meta" / "metadata"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_best_is_chosen_afresh_when_a_resumed_run_validates_on_other_images(images, straight, tmp_path):
    """Resumed with another validation set (here noisier images, so lower PSNRs), every new score lost to the
    old set's best PSNR and best/ kept the parameters chosen on the old set, silently. Now a line says so and
    the first validation on the new set replaces best/."""
    shutil.copytree(straight[0], tmp_path / "run")
    noisy = tmp_path / "noisy"
    rng = np.random.RandomState(1)
    write_image(noisy / "a.png", rng.randint(0, 256, (36, 36, 3)).astype(np.uint8))
    old_best = checkpoint.read_meta(str(tmp_path / "run" / "best"), int(os.listdir(tmp_path / "run" / "best")[0]))
    results = train_and_evaluate(x4_config(images, total_steps=9, **{"data.val_dir": str(noisy)}),
                                 str(tmp_path / "run"))
    assert results["val/psnr"] < old_best["val_psnr"] - 1  # never a new best by the old measure
    assert os.listdir(tmp_path / "run" / "best") == ["9"]
    meta = checkpoint.read_meta(str(tmp_path / "run" / "best"), 9)
    assert meta["val_psnr"] == results["val/psnr"] and meta["validation"].startswith("1 image(s), bicubic PSNR ")
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"validation changed since {tmp_path}/run/best was chosen (on {old_best['validation']}): the next " \
        "validation replaces it" in log
    assert old_best["validation"].startswith("1 image(s), bicubic PSNR ")
    assert old_best["validation"] != meta["validation"]


def test_a_stale_best_from_a_lost_run_is_replaced_by_a_better_one(images, straight, tmp_path):
    """best/4 left by a run that validated at step 4 and was lost before its step-4 checkpoint; resumed from
    step 3, the new step 4 scores higher: orbax skipped the save (step 4 already there), so best/ kept the
    stale parameters while the run recorded the new PSNR as its best."""
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    _set_meta(tmp_path / "checkpoints" / "3", best_psnr=0.0)
    shutil.copytree(straight[0] / "checkpoints" / "6", tmp_path / "best" / "4")  # other parameters
    shutil.rmtree(tmp_path / "best" / "4" / "opt")
    _set_meta(tmp_path / "best" / "4", step=4, val_psnr=-1.0)
    results = train_and_evaluate(x4_config(images, total_steps=4, eval_every=4), str(tmp_path))
    assert os.listdir(tmp_path / "best") == ["4"]
    assert checkpoint.read_meta(str(tmp_path / "best"), 4)["val_psnr"] == results["val/psnr"]
    assert _equal_trees(load(str(tmp_path), which="best")[0], load(str(tmp_path))[0])
    # A stale best that scores higher than anything this run reaches is kept (nothing better replaces it).
    _set_meta(tmp_path / "best" / "4", val_psnr=1000.0)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    train_and_evaluate(x4_config(images, total_steps=4, eval_every=4), str(tmp_path))
    assert checkpoint.read_meta(str(tmp_path / "best"), 4)["val_psnr"] == 1000.0



def test_a_resume_without_best_writes_best_at_its_next_validation(images, straight, tmp_path):
    """A workdir resumed without its best/ (deleted, or only checkpoints/ copied) kept the checkpoint's recorded
    best PSNR: best/ was written only by a validation above it, and stayed empty for the rest of the run."""
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    _set_meta(tmp_path / "checkpoints" / "3", best_psnr=1000.0)
    results = train_and_evaluate(x4_config(images, total_steps=4, eval_every=4), str(tmp_path))
    assert os.listdir(tmp_path / "best") == ["4"]
    assert checkpoint.read_meta(str(tmp_path / "best"), 4)["val_psnr"] == results["val/psnr"] < 1000.0
    assert "holds no checkpoint (removed, or not copied with the run)" in (tmp_path / "train.log").read_text()

def test_no_complete_checkpoint_yet(tmp_path):
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints: no complete checkpoint yet"):
        load(str(tmp_path))
    (tmp_path / "best" / "3.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="best: no complete checkpoint yet"):
        load(str(tmp_path), which="best")


_CACHED_RUN = """
import sys, jax
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_train import x4_config
from rnan_jax import env
from rnan_jax.trainer import train_and_evaluate
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
env.enable_compilation_cache({cache!r})
train_and_evaluate(x4_config(Path({images!r}), total_steps={steps}), {workdir!r})
print("cache hits", len(hits))
"""


def test_a_second_process_runs_the_cached_train_step(images, tmp_path):
    """The persistent compilation cache: the second process loads the train step the first one compiled, and
    runs it. (XLA:CPU crashed loading the fully unrolled paper-size step, so the CPU default keeps deep
    networks rolled and `enable_compilation_cache(safe=False)` leaves the cache off: see api.default_knobs.)"""
    cache = tmp_path / "xla"
    outs = []
    for i, steps in enumerate((3, 6)):
        code = _CACHED_RUN.format(tests=os.path.dirname(__file__), cache=str(cache), images=str(images),
                                  workdir=str(tmp_path / "run"), steps=steps)
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-3000:]
        outs.append(r.stdout)
    assert any(f.startswith("jit_train_step") for f in os.listdir(cache))
    assert "resumed from" in outs[1] and "step 6: validation PSNR" in outs[1]
    assert int(outs[1].split("cache hits ")[1].split()[0]) >= 1
    from rnan_jax import env

    assert env.enable_compilation_cache(str(tmp_path / "off"), safe=False) is None
    assert not (tmp_path / "off").exists()


def test_logged_validation_psnr_is_what_evaluate_prints(images, tmp_path, data_dir):
    """Set14 (with its gray image, bridge) and Set5 validated during training and scored by `python -m
    rnan_jax.evaluate --checkpoint` afterwards: one scoring path, so the same numbers. The first set of
    data.val_set is val/psnr (which picks best/), a further one val/<set>/psnr, both on the log's lines."""
    import json

    workdir, out = tmp_path / "run", tmp_path / "eval"
    values = {"total_steps": 2, "eval_every": 2, "checkpoint_every": 2, "data.val_source": "benchmark",
              "data.val_set": "Set14,Set5", "data.val_dir": os.path.join(data_dir, "benchmark"),
              "data.val_max_images": 0}
    results = train_and_evaluate(x4_config(images, **values), str(workdir))
    r = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--checkpoint", str(workdir), "--datasets",
                        "Set14,Set5", "--data_dir", data_dir, "--output", str(out), "--noprogress"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((out / "results.json").read_text())
    scored, set5 = scores["Set14"]["x4"], scores["Set5"]["x4"]
    assert (scored["images"], set5["images"]) == (14, 5)
    assert results["val/psnr"] == pytest.approx(scored["psnr"], abs=1e-3)
    assert results["val/ssim"] == pytest.approx(scored["ssim"], abs=1e-5)
    assert results["val/Set5/psnr"] == pytest.approx(set5["psnr"], abs=1e-3)
    assert results["val/Set5/ssim"] == pytest.approx(set5["ssim"], abs=1e-5)
    assert 10 < scored["psnr"] < 40 and 10 < set5["psnr"] < 40 and abs(scored["psnr"] - set5["psnr"]) > 0.01
    log = (workdir / "train.log").read_text()
    assert re.search(r"validation: Set14 14 image\(s\), bicubic PSNR 2\d\.\d{3} dB; Set5 5 image\(s\), bicubic PSNR "
                     r"28\.419 dB\n", log)  # Table 1's Bicubic x4 row: 28.42 on Set5
    assert re.search(rf"step 2: validation PSNR {results['val/psnr']:.3f} dB, SSIM {results['val/ssim']:.4f} "
                     rf"\(bicubic {results['val/bicubic_psnr']:.3f} dB\); Set5 {results['val/Set5/psnr']:.3f} dB, "
                     rf"SSIM {results['val/Set5/ssim']:.4f} \(bicubic 28\.419 dB\)\n", log)
    metrics = [json.loads(line) for line in (workdir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("val/Set5/psnr") == results["val/Set5/psnr"] for m in metrics)
    with pytest.raises(ValueError, match=r"data.val_set must name one set or several, comma-separated and each "
                                         r"once; got 'Set5,,Set14'"):
        train_and_evaluate(x4_config(images, **{**values, "data.val_set": "Set5,,Set14"}), str(tmp_path / "x"))


def test_a_url_workdir_s_train_log_is_copied_at_most_once_a_minute_and_at_close(tmp_path, monkeypatch):
    """On a gs:// workdir train.log was copied there whole after every line: N lines uploaded ~N^2/2 lines' bytes
    (40 logged steps: 47 uploads, 147 kB for a 5.9 kB log), each in the step loop."""
    from rnan_jax import summary

    remote = tmp_path / "bucket"  # a local folder taken for a URL: epath writes it alike
    monkeypatch.setattr(summary.paths, "is_url", lambda p: str(p).startswith(str(remote)))
    remote.mkdir()
    (remote / "train.log").write_text("2025-01-01 00:00:00  an earlier run's line\n")
    copies = []
    write_text = summary.paths.write_text
    monkeypatch.setattr(summary.paths, "write_text", lambda p, t: copies.append(len(t)) or write_text(p, t))
    with summary.RunLog(str(remote / "train.log")) as log:
        for i in range(100):
            log.write(f"step {i}")
        assert len(copies) == 1  # the first line, at once; the rest within a minute, or at close
    lines = (remote / "train.log").read_text().splitlines()
    assert len(copies) == 2 and copies[-1] == len("\n".join(lines)) + 1
    assert lines[0].endswith("an earlier run's line") and [line[21:] for line in lines[1:]] == [
        f"step {i}" for i in range(100)]


_TENSORSTORE_DATA_WRITE_FAILURE = (  # an array's data file, as a 520 KiB tmpfs made orbax's commit thread raise it
    'RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/3.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/d/934d7d":'
    " Failed to write 5482 bytes to file 15: No space left on device [os_error_code='28']")


def test_a_full_disk_under_orbax_s_metadata_and_data_files_is_one_line_too(images, straight, tmp_path, monkeypatch):
    """On tmpfs disks of 420-700 KiB (the room check passed: the tiny state's files take twice its bytes) a save
    failed in orbax's commit and metadata threads, not in tensorstore's "Error writing": as "Failed writing" (an
    array's data file) or a bare OSError [Errno 28] (its _METADATA, _CHECKPOINT_METADATA). Their absl reports
    (E lines with tracebacks: "Failed to run 5 Handler Commit operations", "_SignalingThread.run() raised an
    exception", "Save Finalize thread (save_finalize) failed") were printed above the run's one line, and the
    "Failed writing" raised by the save ended the run with orbax's text alone, nothing about what was kept."""
    import errno
    import logging

    from rnan_jax import checkpoint

    assert checkpoint.write_failure(ValueError(_TENSORSTORE_DATA_WRITE_FAILURE)) == "No space left on device"
    assert checkpoint.write_failure(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert checkpoint.write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
    assert checkpoint.write_failure(OSError(errno.ENOENT, "No such file or directory")) is None
    orbax = "/venv/site-packages/orbax/checkpoint/_src/"
    for where, error in [("checkpoint/async_checkpointer.py", ValueError(_TENSORSTORE_DATA_WRITE_FAILURE)),
                         ("futures/future.py", OSError(errno.ENOSPC, "No space left on device")),
                         ("checkpoint_manager.py", OSError(errno.ENOSPC, "No space left on device"))]:
        record = logging.LogRecord("absl", logging.ERROR, orbax + where, 1, "failed", None,
                                   (type(error), error, None))
        assert not checkpoint._not_a_failed_write(record), where
    _a_failing_save_is_one_line(images, straight, tmp_path, monkeypatch, _TENSORSTORE_DATA_WRITE_FAILURE)


def test_a_step_damaged_again_is_moved_beside_the_earlier_ones_whatever_names_are_taken(images, straight, tmp_path):
    """move_aside named the second copy of a step `<step>.<entries in checkpoints_damaged>`: with 6 and 6.2 there
    (6.2 named when a third entry was there, since deleted) the next damaged 6 went to 6.2 again, the rename
    failed ("[Errno 39] Directory not empty") and the run stopped without resuming."""
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    _damage(workdir, 6, "_METADATA")
    for earlier in ("6", "6.2"):
        (workdir / "checkpoints_damaged" / earlier).mkdir(parents=True)
        (workdir / "checkpoints_damaged" / earlier / "note").write_text(earlier)
    train_and_evaluate(x4_config(images), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints_damaged")) == ["6", "6.1", "6.2"]
    assert [(workdir / "checkpoints_damaged" / n / "note").read_text() for n in ("6", "6.2")] == ["6", "6.2"]
    assert "_METADATA" not in os.listdir(workdir / "checkpoints_damaged" / "6.1" / "params")
    assert _equal_trees(load(str(straight[0]))[0], load(str(workdir))[0])


def test_a_workdir_that_is_a_symbolic_link_to_nothing_is_named_in_one_line(images, tmp_path):
    """A workdir linked to a disk not mounted (or a folder not made yet) failed as "--workdir W: cannot create it
    (File exists)"; dry run said "not created yet; a run creates it"."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "scratch" / "run")
    line = f"--workdir {link}: a symbolic link to {tmp_path}/scratch/run, which does not exist"
    with pytest.raises(ValueError) as e:
        train_and_evaluate(x4_config(images), str(link))
    assert str(e.value) == line
    assert f"workdir: {link} ({line.split(': ', 1)[1]}: the run would stop)" in dry_run(x4_config(images), str(link))
    (tmp_path / "scratch" / "run").mkdir(parents=True)  # once it is there, the run trains in it
    assert "exists, no checkpoint yet" in dry_run(x4_config(images), str(link))


def test_a_workdir_of_another_width_is_refused_without_init_from_advice_that_would_fail(images, straight, tmp_path):
    """The refusal of a workdir of another architecture advised --config.init_from=WORKDIR whatever differed; for
    another width or depth init_from refuses it in turn ("its architecture differs beyond the scale")."""
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    with pytest.raises(ValueError) as e:
        train_and_evaluate(x4_config(images, **{"model.features": 16}), str(workdir))
    assert str(e.value) == (f"{workdir} holds an x4 model (features 8, 1 groups x 2 blocks, intervals 1/1, GC "
                            "reduction 2); the config asks for an x4 model (features 16, 1 groups x 2 blocks, "
                            "intervals 1/1, GC reduction 2). Use another --workdir")
    with pytest.raises(ValueError) as e:  # another scale: init_from takes it
        train_and_evaluate(x4_config(images, **{"model.scale": 2}), str(workdir))
    assert str(e.value).endswith(f". Use another --workdir (with --config.init_from={workdir} to start from its "
                                 "matching parameters)")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # nothing lost


def test_dry_run_says_when_the_run_would_do_nothing_or_refuse_the_workdir(images, straight):
    """The dry run said "the run resumes from its step 6" of a workdir at total_steps (the run: "nothing to do")
    and of one holding another architecture (the run: refused)."""
    from rnan_jax.configs import TrainConfig

    workdir = str(straight[0])
    assert f"workdir: {workdir} (already at step 6 of total_steps 6: the run would do nothing (raise " \
           "--config.total_steps to train on)); dry run" in dry_run(x4_config(images), workdir)
    assert f"workdir: {workdir} (exists; the run resumes from its step 6)" in dry_run(
        x4_config(images, total_steps=12), workdir)
    wider = x4_config(images, **{"model.features": 2 * TINY_MODEL["features"]})
    saved = checkpoint.config_from_meta(checkpoint.read_meta(os.path.join(workdir, "checkpoints"), 6))
    wide = TrainConfig.from_config(wider).model
    assert (f"workdir: {workdir} (holds an {checkpoint.describe(saved)}, the config an {checkpoint.describe(wide)}: "
            "the run would stop)") in dry_run(wider, workdir)


def test_a_workdir_that_cannot_be_written_is_one_line_naming_it(images, tmp_path, monkeypatch):
    """A run resumed in a workdir on a read-only mount stopped with "[Errno 30] Read-only file system:
    '.../train.lock'", naming neither the workdir nor what to do."""
    import errno

    from rnan_jax import rundir

    workdir = tmp_path / "run"
    workdir.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if os.fspath(path).endswith(rundir.LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    with pytest.raises(ValueError) as e:
        train_and_evaluate(x4_config(images, total_steps=1), str(workdir))
    assert str(e.value) == f"--workdir {workdir}: cannot write in it (Read-only file system)"


def test_a_resumed_runs_first_log_at_its_first_step_gives_no_compile_bound_speed_or_eta(images, straight, tmp_path):
    """Resumed from step 3 with log_every 2, the first log (step 4) timed the run's first step alone, compile
    included: a real run read "0.14 steps/s ... ETA 5:51:46" where it went on at 135 steps/s (ETA 0:00:22). That
    log now leaves the speed and ETA to the next one, whose steps ran compiled."""
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    results = train_and_evaluate(x4_config(images, total_steps=8, eval_every=8, checkpoint_every=8), str(tmp_path))
    logs = {r["step"]: r for r in map(json.loads, (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}
    assert sorted(logs) == [4, 6, 8]
    assert not {"train/steps_per_s", "train/patches_per_s", "train/eta_s"} & set(logs[4])
    assert logs[4]["train/loss"] > 0 and logs[4]["train/lr"] > 0
    for s in (6, 8):  # the steps after it, timed without the compile
        assert logs[s]["train/patches_per_s"] == pytest.approx(4 * logs[s]["train/steps_per_s"])
    assert logs[6]["train/eta_s"] == pytest.approx(2 / logs[6]["train/steps_per_s"])
    assert logs[8]["train/eta_s"] == 0 and results["steps_per_s"] == logs[8]["train/steps_per_s"]
    line = next(x for x in (tmp_path / "train.log").read_text().splitlines() if "  step 4/8  " in x)
    assert line.endswith("steps/s and ETA at the next log (this step compiled)") and "ETA 0:" not in line


def test_adding_a_further_validation_set_at_resume_keeps_the_best_chosen_on_the_first(images, tmp_path):
    """val/psnr, which picks best/, is the first set's. A run on set A resumed with data.val_set=A,B (as a
    researcher adds Set14 to Set5) dropped best/'s PSNR as "of other images" and the next validation replaced
    best/, however much worse. Now only a first set that differs resets it (B,A here)."""
    bench = tmp_path / "bench"
    shutil.copytree(images / "val", bench / "A" / "HR")
    shutil.copytree(images / "train", bench / "B" / "HR")
    workdir = tmp_path / "run"

    def run(total, val_set):
        return train_and_evaluate(x4_config(images, total_steps=total, eval_every=3, **{
            "data.val_source": "benchmark", "data.val_dir": str(bench), "data.val_set": val_set}), str(workdir))

    run(3, "A")
    _set_meta(workdir / "best" / "3", val_psnr=99.0)  # a best/ that nothing trained here will beat
    results = run(6, "A,B")
    assert "val/B/psnr" in results and results["val/psnr"] < 99.0
    assert os.listdir(workdir / "best") == ["3"] and checkpoint.read_meta(str(workdir / "best"), 3)["val_psnr"] == 99.0
    assert "validation changed" not in (workdir / "train.log").read_text()
    results = run(9, "B,A")  # another first set: its PSNRs are of other images, and the next validation replaces it
    assert os.listdir(workdir / "best") == ["9"]
    assert checkpoint.read_meta(str(workdir / "best"), 9)["val_psnr"] == results["val/psnr"]
    assert (workdir / "train.log").read_text().count("validation changed since") == 1


def test_the_run_log_records_a_command_that_reruns_as_given(images, tmp_path, monkeypatch):
    """train.log's "started:" line joined the arguments with spaces: a folder with a space in its name (or a
    list value in Python's syntax) came back as other arguments when the line was pasted into a shell."""
    import shlex

    argv = ["rnan_jax/train.py", "--config", "experiments/x4.py", "--config.data.hr_dirs=/my data/T91",
            "--config.data.val_set=['Set5','Set14']"]
    monkeypatch.setattr(sys, "argv", argv)
    train_and_evaluate(x4_config(images, total_steps=1), str(tmp_path))
    line = next(x for x in (tmp_path / "train.log").read_text().splitlines() if "  started: " in x)
    assert shlex.split(line.split("  started: ", 1)[1].rsplit(" (rnan_jax ", 1)[0]) == argv


def test_the_revision_is_unknown_for_a_package_that_the_repository_around_it_does_not_track(tmp_path):
    """rnan_jax installed into a virtual environment inside the user's own git project (.venv ignored there):
    git_revision.txt and train.log recorded that project's commit as the code's revision."""
    from rnan_jax import summary

    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*args):
        subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "code.py").write_text("")
    git("add", ".gitignore", "mine/code.py")
    git("commit", "-qm", "the user's project")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    installed = tmp_path / ".venv" / "lib" / "rnan_jax"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert summary.git_revision(str(installed)) == "unknown"
    assert summary.git_revision(str(tmp_path / "mine")) == head  # tracked code: its revision, as before


def test_a_stop_between_two_logs_logs_the_steps_since_the_last_one(images, straight, tmp_path, monkeypatch):
    """SIGTERM at a step that is no log step (here in the step-3 validation, log_every 2): the checkpoint of step 3
    was saved and the rerun resumed after it, but step 3's loss was never logged (a real run stopped at step 393
    of log_every 50 had no record of steps 351-393). It is now logged at step 3, once, and resuming writes no step
    twice; the checkpoint keeps its sums, so the rerun's step-4 record is the uninterrupted run's."""
    from rnan_jax import preemption, validation

    real = validation.Validator.__call__

    def validate(self, *args):
        monkeypatch.setattr(validation.Validator, "__call__", real)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args)

    monkeypatch.setattr(validation.Validator, "__call__", validate)
    with pytest.raises(preemption.Preempted, match="saved a checkpoint at step 3 "):
        train_and_evaluate(x4_config(images), str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    train_and_evaluate(x4_config(images), str(tmp_path))
    loss = _logged_loss(tmp_path)
    assert sorted(loss) == [2, 3, 4, 6]
    straight_loss = _logged_loss(straight[0])
    assert loss[4] == pytest.approx(straight_loss[4], rel=1e-5)
    assert loss[2] == pytest.approx(straight_loss[2], rel=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 3, 4, 6] and train[1]["train/steps_per_s"] > 0


def test_a_resume_on_other_training_images_says_so(images, tmp_path):
    """Images added to the training folder before a resume changed the batches from there on, without a word."""
    folder = tmp_path / "train"
    shutil.copytree(images / "train", folder)
    config = x4_config(images, **{"data.hr_dirs": str(folder)})
    train_and_evaluate(config, str(tmp_path / "run"), stop_after=4)
    before = checkpoint.read_meta(str(tmp_path / "run" / "checkpoints"), 3)["training_images"]
    extra = sorted(folder.iterdir())[0]
    shutil.copy(extra, folder / ("zz_" + extra.name))
    train_and_evaluate(config, str(tmp_path / "run"))
    text = [line[21:] for line in (tmp_path / "run" / "train.log").read_text().splitlines()]
    after = next(t for t in reversed(text) if t.startswith("training images: ")).removeprefix("training images: ")
    assert before != after and before.split()[0] == str(int(after.split()[0]) - 1)
    assert (f"the training images changed since step 3 was saved ({before} then, {after} now): the batches from "
            "here are not those the run would have had") in text


def test_a_data_worker_that_dies_between_two_logs_logs_the_steps_since_the_last_one(images, straight, tmp_path,
                                                                                        monkeypatch):
    """A worker that died at the batch of step 6 (log_every 2): step 5 was saved and the rerun resumed after it, but
    its loss was never logged (a SIGTERM's stop logs it). It is now logged at step 5, once, and the rerun's step-6
    record is the uninterrupted run's (the checkpoint keeps the sums logged at step 5)."""
    from rnan_jax import loader, sources

    real, calls = loader.BatchIterator.__next__, []

    def dying(self):
        calls.append(1)
        if len(calls) == 6:
            raise sources.DataError("a data worker process died at batch 5 (killed by SIGKILL)")
        return real(self)

    monkeypatch.setattr(loader.BatchIterator, "__next__", dying)
    with pytest.raises(sources.DataError, match="the last checkpoint is step 5, saved now,"):
        train_and_evaluate(x4_config(images), str(tmp_path))
    monkeypatch.undo()
    train_and_evaluate(x4_config(images), str(tmp_path))
    loss = _logged_loss(tmp_path)
    assert sorted(loss) == [2, 4, 5, 6]
    straight_loss = _logged_loss(straight[0])
    assert loss[6] == pytest.approx(straight_loss[6], rel=1e-5)
    assert loss[4] == pytest.approx(straight_loss[4], rel=1e-6)


def test_a_flat_validation_image_reproduced_exactly_ends_with_a_gain_not_nan(images, tmp_path, monkeypatch, capsys):
    """A flat validation image: bicubic reproduces it exactly (PSNR inf, mse 0), and so does a model that learned
    it; the last line said "validation PSNR inf dB vs bicubic inf dB (+nan dB)". inf stays the value, in the log,
    the scores and best/, whose first inf is kept (a tie)."""
    from rnan_jax import upscalers

    val = tmp_path / "flat"
    write_image(val / "flat.png", np.full((36, 36, 3), 128, np.uint8))
    monkeypatch.setattr(upscalers, "model_upscaler", lambda params, config, **kw: upscalers.bicubic_upscaler)
    results = train_and_evaluate(x4_config(images, total_steps=4, eval_every=2, checkpoint_every=2,
                                           **{"data.val_dir": str(val)}), str(tmp_path / "run"))
    assert results["val/psnr"] == results["val/bicubic_psnr"] == float("inf")
    out = capsys.readouterr().out
    assert "step 4: validation PSNR inf dB, SSIM 1.0000 (bicubic inf dB)" in out
    assert (f"done: 4 steps; validation PSNR inf dB vs bicubic inf dB (+0.000 dB); checkpoints in "
            f"{tmp_path}/run/checkpoints") in out
    assert os.listdir(tmp_path / "run" / "best") == ["2"]
    assert checkpoint.best_psnr(str(tmp_path / "run" / "best"))[0] == float("inf")


def test_the_eta_includes_the_validations_and_saves_still_to_come_at_their_measured_cost(images, tmp_path,
                                                                                           monkeypatch):
    """The ETA was the steps left at the train step's speed alone: low by every validation and save still to come
    (a paper run validating Set5 every 5000 of 1M steps: 200 of them). Each now counts at its last measured cost:
    here a validation and a save of at least 1 s each, with validations at 2, 4, 6, 8 and saves at 4, 8."""
    real_validate, real_save = trainer._validate, trainer._save_step

    def slow_validation(*args):
        time.sleep(1.0)
        return real_validate(*args)

    def slow_save(*args, **kwargs):
        time.sleep(1.0)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "_validate", slow_validation)
    monkeypatch.setattr(trainer, "_save_step", slow_save)
    train_and_evaluate(x4_config(images, total_steps=8, log_every=1, eval_every=2, checkpoint_every=4),
                       str(tmp_path))
    logs = [json.loads(line) for line in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    eta = {log["step"]: log["train/eta_s"] for log in logs if "train/eta_s" in log}
    assert eta[5] >= 3.0  # validations at 6 and 8, the save at 8
    assert eta[7] >= 2.0 and eta[8] >= 2.0  # the last step's own validation and save follow its log
    assert eta[3] >= 2.0  # validations at 4, 6, 8 (no save measured yet)


def test_a_run_resumed_after_a_crash_between_two_logs_logs_what_the_uninterrupted_run_did(images, straight, tmp_path):
    """Checkpoint at step 3, log_every 2, a crash after step 4: the rerun resumed from step 3 and its step-4 loss was
    the mean of step 4 alone (the first run's mean of steps 3 and 4 is dropped from the scalars as a step after the
    resumed one), and step 3's loss was in no record. The checkpoint now keeps the sums since the last log."""

    train_and_evaluate(x4_config(images), str(tmp_path), stop_after=4)
    train_and_evaluate(x4_config(images), str(tmp_path))
    loss, straight_loss = _logged_loss(tmp_path), _logged_loss(straight[0])
    assert sorted(loss) == [2, 4, 6]
    for s in (2, 4, 6):
        assert loss[s] == pytest.approx(straight_loss[s], rel=1e-6), s
    assert checkpoint.read_meta(str(tmp_path / "checkpoints"), 3)["since_last_log"]["steps"] == 1
    assert checkpoint.read_meta(str(tmp_path / "checkpoints"), 6)["since_last_log"]["steps"] == 0


def _three_validation_images(images, folder):
    """The validation image and two training images (48x40: usable at x4) in `folder`."""
    folder.mkdir()
    for source in (images / "val" / "0006.png", images / "train" / "0000.png", images / "train" / "0001.png"):
        shutil.copy(source, folder / source.name)
    return str(folder)


def test_a_stop_during_validation_ends_it_at_the_next_image_and_the_rerun_validates_that_step(images, straight,
                                                                                              tmp_path, monkeypatch):
    """SIGTERM in the step-3 validation's second image of three: the stop waited for the whole validation (a paper
    model's DIV2K or Urban100 validation outlasts a TPU VM's preemption notice, and the steps since the last
    checkpoint were lost). It now ends before the third image; nothing of it is logged or taken for best/, step 3
    is saved, and the rerun validates step 3 before it trains on (stopped there again, it keeps the checkpoint)."""
    from rnan_jax import figures, preemption, upscalers, validation
    from rnan_jax.configs import TrainConfig

    config = x4_config(images, **{"data.val_dir": _three_validation_images(images, tmp_path / "val")})
    workdir, real, upscaled = tmp_path / "run", upscalers.model_upscaler, []

    def signal_at(image):
        def upscaler(params, model_config, **kw):
            upscale = real(params, model_config, **kw)

            def counted(pair):
                upscaled.append(pair.name)
                if len(upscaled) == image:
                    os.kill(os.getpid(), signal.SIGTERM)
                return upscale(pair)
            return counted
        upscaled.clear()
        monkeypatch.setattr(upscalers, "model_upscaler", upscaler)

    signal_at(2)
    with pytest.raises(preemption.Preempted) as stopped:
        train_and_evaluate(config, str(workdir))
    assert len(upscaled) == 2  # the third image not begun
    assert str(stopped.value) == (f"SIGTERM while validating step 3: saved a checkpoint at step 3 in {workdir}/"
                                  "checkpoints; rerun the same command to validate it and resume")
    assert f"workdir: {workdir} (exists; a stop ended the validation of its step 3: the run validates it, then " \
           "resumes from it); dry run" in dry_run(config, str(workdir))
    assert os.listdir(workdir / "checkpoints") == ["3"] and checkpoint.complete_steps(str(workdir / "best")) == []
    assert checkpoint.read_meta(str(workdir / "checkpoints"), 3)["validation_stopped"] is True
    assert "val/psnr" not in (workdir / "tensorboard" / "metrics.jsonl").read_text()
    signal_at(1)  # stopped again, in the rerun's validation of step 3: nothing new to save, the checkpoint kept
    with pytest.raises(preemption.Preempted, match=f"^SIGTERM while validating step 3: its checkpoint in {workdir}/"
                       "checkpoints is kept; rerun the same command to validate it and resume$"):
        train_and_evaluate(config, str(workdir))
    assert len(upscaled) == 1 and os.listdir(workdir / "checkpoints") == ["3"]
    assert checkpoint.read_meta(str(workdir / "checkpoints"), 3)["validation_stopped"] is True
    signal_at(0)
    results = train_and_evaluate(config, str(workdir))
    assert len(upscaled) == 6  # steps 3 and 6, three images each
    assert _equal_trees(load(str(straight[0]))[0], load(str(workdir))[0])
    validator = validation.Validator(TrainConfig.from_config(config))
    at_3 = validator(load(str(workdir / "checkpoints" / "3"))[0], 0)[0]["val/psnr"]
    steps, psnrs, _ = figures.read_validation(str(workdir))
    assert steps == [3, 6] and psnrs == [at_3, results["val/psnr"]]
    best, best_psnr = max(zip(psnrs, steps))[1], max(psnrs)
    assert checkpoint.complete_steps(str(workdir / "best")) == [best]
    assert checkpoint.best_psnr(str(workdir / "best"))[0] == best_psnr
    assert "validation_stopped" not in checkpoint.read_meta(str(workdir / "checkpoints"), 6)


_SIGTERM_TO_ONE_PROCESS_WHILE_VALIDATING = """
import os, runpy, signal, sys
from rnan_jax import upscalers
real, upscaled = upscalers.model_upscaler, []

def upscaler(*args, **kwargs):  # process 1 alone gets SIGTERM, in its second image of three
    upscale = real(*args, **kwargs)
    def counted(pair):
        upscaled.append(pair.name)
        if len(upscaled) == 2 and "--process_id=1" in sys.argv:
            os.kill(os.getpid(), signal.SIGTERM)
        return upscale(pair)
    return counted

upscalers.model_upscaler = upscaler
sys.argv = ["train", *sys.argv[1:]]
try:
    runpy.run_module("rnan_jax.train", run_name="__main__")
finally:
    print("upscaled", len(upscaled), flush=True)
"""


def test_two_processes_stop_their_validation_at_the_same_image(images, tmp_path):
    """Two processes, SIGTERM to process 1 alone in its step-2 validation's second image of three: both end the
    validation before the third image (one decision per image), save step 2 and exit 143, and the rerun (here one
    process) validates step 2 before training on."""
    from rnan_jax import figures

    values = overrides(images, **_elastic_values(4), **{"data.val_dir": _three_validation_images(images,
                                                                                                  tmp_path / "val")})
    workdir, port = tmp_path / "run", _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # as _start_two_processes, through the wrapper
    procs = [subprocess.Popen([sys.executable, "-c", _SIGTERM_TO_ONE_PROCESS_WHILE_VALIDATING, "--config",
                               "experiments/x4.py", "--workdir", str(workdir), "--distributed",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                               *_flags(values)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    report = "\n----\n".join(o[-3000:] for o in outs)
    line = (f"SIGTERM while validating step 2: saved a checkpoint at step 2 in {workdir}/checkpoints; rerun the same "
            "command to validate it and resume")
    assert [p.returncode for p in procs] == [143, 143], report
    assert [o.strip().splitlines()[-2:] for o in outs] == [[line, "upscaled 2"]] * 2, report
    assert os.listdir(workdir / "checkpoints") == ["2"] and "val/psnr" not in (
        workdir / "tensorboard" / "metrics.jsonl").read_text()
    assert checkpoint.read_meta(str(workdir / "checkpoints"), 2)["validation_stopped"] is True
    results = train_and_evaluate(x4_config(images, **_elastic_values(4), **{"data.val_dir": str(tmp_path / "val")}),
                                 str(workdir))
    steps, psnrs, _ = figures.read_validation(str(workdir))
    assert steps == [2, 4] and psnrs[1] == results["val/psnr"] and np.isfinite(psnrs[0])


def test_processes_whose_validation_images_differ_in_number_keep_the_stop_for_after_the_validation(monkeypatch,
                                                                                                    capsys):
    """The validation's stop check is a collective per image: it must be asked as often in every process, so with
    validation images that differ in number (a copy that differs between hosts) there is none, as before; with the
    same number it is one decision for all processes."""
    from types import SimpleNamespace

    from jax.experimental import multihost_utils

    from rnan_jax import preemption

    others = {}  # what the other process gives to each gather
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, others[x.dtype.kind]]))
    with preemption.Preemption() as signals:
        others.update(i=np.array([3], np.int32), b=np.array([False]))
        check = trainer._stop_check(SimpleNamespace(count=3), signals)
        assert check() is False
        others["b"] = np.array([True])  # the other process's stop request: this one's too
        assert check() is True
        signals.requested, others["b"] = True, np.array([False])
        assert check() is True
        others["i"] = np.array([4], np.int32)
        assert trainer._stop_check(SimpleNamespace(count=3), signals) is None
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "the processes' validation images differ in number (3, 4): a stop request during a validation waits for its "
        "end")


def test_a_checkpoint_of_another_versions_state_is_refused_not_moved_aside(images, tmp_path, monkeypatch):
    """A checkpoint whose optimizer state has another structure than this code builds (written by a newer version,
    read by an older one after a downgrade; or the layout of an old one no longer read) failed to restore, was
    called damaged and moved aside, and so was every step before it: the run started again from step 0. It is now
    refused in one line, and the checkpoints are left where they are."""
    import optax

    from rnan_jax import step as step_module

    workdir = tmp_path / "run"
    train_and_evaluate(x4_config(images, total_steps=3), str(workdir))
    adam_only = step_module.optimizer
    monkeypatch.setattr(step_module, "optimizer", lambda cfg: optax.chain(optax.identity(), adam_only(cfg)))
    with pytest.raises(ValueError) as e:
        train_and_evaluate(x4_config(images, total_steps=6), str(workdir))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{workdir}/checkpoints/3: its saved training state has another structure than this "
                              "version of rnan_jax builds (")
    assert message.endswith("it is not damaged and was left as it is: resume it with the version that wrote it "
                            "(its git_revision.txt), or use another --workdir (--config.init_from=WORKDIR copies "
                            "its parameters)")
    assert not (tmp_path / "run" / "checkpoints_damaged").exists()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]


def _fail_save_at(tmp_path, monkeypatch, at, error):
    """The save of step `at` fails in orbax's async part, ended before the next step: its wait raises `error` once
    (as orbax's does), the step's folder not made."""
    real = checkpoint.save_train_state

    def save_train_state(mngr, step, state, meta):
        real(mngr, step, state, meta)
        if step == at:
            wait = mngr.wait_until_finished
            wait()  # ended (failed) before the next step

            def failed():
                wait()
                mngr.wait_until_finished = wait
                shutil.rmtree(tmp_path / "checkpoints" / str(at))
                raise error

            mngr.wait_until_finished = failed

    monkeypatch.setattr(checkpoint, "save_train_state", save_train_state)


def test_a_save_failing_in_its_async_part_stops_the_run_at_once_worded_by_its_errno(images, tmp_path, monkeypatch):
    """checkpoints/ made read-only during a run: the failed save at step 100 printed ~200 lines of orbax's reports,
    training went on to the next save (100 steps more), and the run ended with "cannot write in W (Permission
    denied) at step 200; there is no checkpoint yet: make room and rerun" though best/200 was there."""
    import errno

    tmp = str(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp")
    _fail_save_at(tmp_path, monkeypatch, 3, PermissionError(errno.EACCES, "Permission denied", tmp))
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images, log_every=1), str(tmp_path))
    assert str(e.value) == (f"cannot save a checkpoint in {tmp_path} (Permission denied); there is no checkpoint to "
                            f"resume from yet ({tmp_path}/best/3 holds the parameters that validated best): make "
                            f"{tmp_path}/checkpoints writable and rerun to start afresh")
    log = (tmp_path / "train.log").read_text()
    assert "step 3/6" in log and "step 4/6" not in log  # stopped at the first step after the save ended

    run = tmp_path / "run"  # a full disk, after a good checkpoint: the last save fails, found by the final wait
    monkeypatch.undo()
    _fail_save_at(run, monkeypatch, 6, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images), str(run))
    assert str(e.value) == (f"cannot save a checkpoint in {run} (No space left on device); the last good checkpoint "
                            "(step 3) is intact: make room and rerun to resume from it")
    assert checkpoint.complete_steps(str(run / "checkpoints")) == [3]


def test_a_checkpoints_folder_that_cannot_be_written_stops_the_run_before_orbax_s_save(images, tmp_path, monkeypatch):
    """A read-only checkpoints/ failed orbax's making of the step's folder, and its other save threads waited 300 s
    for it (the process hung that long after the run's error) before printing their tracebacks."""
    import errno

    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.path.basename(os.path.dirname(path)) == "checkpoints":
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_mkdir(path, *args, **kwargs)

    assert checkpoint.write_problem("gs://bucket/run/checkpoints") is None
    monkeypatch.setattr(os, "mkdir", mkdir)
    assert checkpoint.write_problem(str(tmp_path)) is None
    assert checkpoint.write_problem(str(tmp_path / "checkpoints")).errno == errno.EROFS
    assert checkpoint.write_failure(PermissionError(errno.EACCES, "Permission denied")) == "Permission denied"
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images), str(tmp_path))
    assert str(e.value) == (f"cannot save a checkpoint in {tmp_path} (Read-only file system); there is no checkpoint "
                            f"to resume from yet ({tmp_path}/best/3 holds the parameters that validated best): make "
                            f"{tmp_path}/checkpoints writable and rerun to start afresh")
    assert os.listdir(tmp_path / "checkpoints") == []


def test_the_write_probe_is_named_by_host_and_process_and_a_leftover_is_no_error(tmp_path):
    """The probe before each save was named by process id alone: two hosts of one run (their ids the same in
    containers) probing a shared folder removed each other's, and one of them stopped with "No such file"."""
    import socket

    from rnan_jax import checkpoint

    other_host = tmp_path / f".rnan_jax_write_probe.other-{socket.gethostname()}.{os.getpid()}"
    other_host.mkdir()  # another host's probe, in flight
    leftover = tmp_path / f".rnan_jax_write_probe.{socket.gethostname()}.{os.getpid()}"
    leftover.mkdir()  # this process's, left by a kill between its mkdir and rmdir
    assert checkpoint.write_problem(str(tmp_path)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_host.name]


def test_init_from_names_the_step_and_which_parameters_it_copied(images, straight, tmp_path, capsys):
    """init_from's line said it took the run's parameters, not which step's (the newest in the folder named) or
    which of them (the raw parameters or the EMA)."""
    config = x4_config(images, total_steps=1, **{"optim.lr": 0.0, "optim.schedule": "constant"})
    for source, at in ((straight[0], 6), (straight[0] / "checkpoints" / "3", 3)):
        config.init_from = str(source)
        capsys.readouterr()
        train_and_evaluate(config, str(tmp_path / f"from_{at}"))
        assert f"init_from {source} (its parameters at step {at}, x4 -> x4): copied 32 parameter arrays" in \
            capsys.readouterr().out
        copied = load(str(tmp_path / f"from_{at}"))[0]
        assert _equal_trees(copied, load(str(source))[0])


def test_a_data_error_before_any_checkpoint_names_the_best_one_there(images, tmp_path, monkeypatch):
    """A run whose only step is in best/ (validated, then lost before its checkpoint) and whose data stops before
    a checkpoint: "there is no checkpoint yet", as if best/ held nothing."""
    from rnan_jax import loader, sources

    train_and_evaluate(x4_config(images, eval_every=1), str(tmp_path), stop_after=2)
    assert os.listdir(tmp_path / "checkpoints") == [] and os.listdir(tmp_path / "best") == ["2"]

    def dying(self):
        raise sources.DataError("a data worker process died at batch 0 (killed by SIGKILL)")

    monkeypatch.setattr(loader.BatchIterator, "__next__", dying)
    with pytest.raises(sources.DataError) as e:
        train_and_evaluate(x4_config(images, eval_every=1), str(tmp_path))
    assert str(e.value) == (f"a data worker process died at batch 0 (killed by SIGKILL); there is no checkpoint to "
                            f"resume from yet ({tmp_path}/best/2 holds the parameters that validated best): a rerun "
                            "starts afresh")


def test_a_step_saved_by_a_stop_whose_validation_is_not_finite_is_moved_aside_not_validated_forever(
        images, straight, tmp_path, monkeypatch):
    """Step 6 saved by a stop in its validation, with parameters that are not finite (diverged between two logs):
    each rerun validated it, met the NaN output, and stopped with "the last good checkpoint (step 6) is intact ...
    rerun to resume from it", for ever. Now the first rerun moves it aside and names the step before it, from which
    the next rerun trains on; an overflow of float16 keeps it, and says to validate it in bfloat16."""
    import jax.numpy as jnp

    from rnan_jax import inference

    for at in (3, 6):
        shutil.copytree(straight[0] / "checkpoints" / str(at), tmp_path / "checkpoints" / str(at))
    _set_meta(tmp_path / "checkpoints" / "6", validation_stopped=True)
    real = checkpoint.restore_train_state

    def diverged(mngr, at, target):
        state, meta = real(mngr, at, target)
        return state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params)), meta

    monkeypatch.setattr(checkpoint, "restore_train_state", diverged)
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images), str(tmp_path))
    assert re.fullmatch(
        r"validating step 6: the model's output holds \d+ NaN or infinite value\(s\): its parameters are not finite, "
        r"or its dtype overflowed \(model\.dtype float32\); the run diverged before the stop that saved this step: "
        f"moved its checkpoint to {re.escape(str(tmp_path))}/checkpoints_damaged/6; the last good checkpoint "
        r"\(step 3\) is intact: lower optim\.lr or set optim\.grad_clip, then rerun to resume from it", str(e.value))
    assert os.listdir(tmp_path / "checkpoints") == ["3"] and os.listdir(tmp_path / "checkpoints_damaged") == ["6"]
    monkeypatch.undo()
    train_and_evaluate(x4_config(images), str(tmp_path))  # from step 3, as the uninterrupted run did
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert _equal_trees(load(str(tmp_path))[0], load(str(straight[0]))[0])

    # float16's overflow: the parameters are finite, the step kept, and the line says how to validate it
    _set_meta(tmp_path / "checkpoints" / "6", validation_stopped=True)

    def overflowed(*args, **kwargs):
        raise inference.NonFiniteOutputError("the model's output holds 12 NaN or infinite value(s): its parameters "
                                             "are not finite, or its dtype overflowed")

    monkeypatch.setattr(inference, "upscale_image", overflowed)
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(x4_config(images, **{"model.dtype": "float16"}), str(tmp_path))
    assert str(e.value).endswith(f"(model.dtype float16, which overflows where bfloat16 and float32 do not); its "
                                 f"checkpoint in {tmp_path}/checkpoints is kept: rerun with "
                                 "--config.model.dtype=bfloat16 to validate it and resume")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    monkeypatch.undo()
    results = train_and_evaluate(x4_config(images, **{"model.dtype": "bfloat16"}), str(tmp_path))
    assert np.isfinite(results["val/psnr"]) and sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def _events_at(logdir, step):
    """The tags of every value that the TensorBoard event files in `logdir` hold at `step`, repeats included."""
    from tensorboardX.proto import event_pb2

    tags = []
    for path in sorted((logdir).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset + 12 <= len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            tags += [v.tag for v in event.summary.value if event.step == step]
    return sorted(tags)


def test_a_step_saved_by_a_stop_is_validated_into_tensorboard_once_across_reruns(images, straight, tmp_path):
    """Step 3 saved by a stop in its validation; the rerun validated it, then was lost before its next checkpoint;
    the next rerun validated step 3 again and wrote its scores and images a second time at that step (TensorBoard
    drew two points there, metrics.jsonl held two lines)."""
    shutil.copytree(straight[0] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    _set_meta(tmp_path / "checkpoints" / "3", validation_stopped=True)
    train_and_evaluate(x4_config(images), str(tmp_path), stop_after=4)
    once = _events_at(tmp_path / "tensorboard", 3)
    assert [t for t in once if t.startswith("val/")] == ["val/0006__LR___bicubic___SR___HR_", "val/bicubic_psnr",
                                                         "val/psnr", "val/ssim"]
    results = train_and_evaluate(x4_config(images), str(tmp_path))
    assert _events_at(tmp_path / "tensorboard", 3) == once
    lines = [json.loads(x) for x in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val/psnr" in r] == [3, 6]
    assert results["val/psnr"] == pytest.approx(straight[1]["val/psnr"], abs=1e-9)
    log = (tmp_path / "train.log").read_text()
    assert log.count("step 3: validation PSNR") == 1  # validated by the first rerun, which dropped the flag


def test_a_data_worker_s_death_leaves_the_wait_to_notice_it_out_of_the_logged_speed(images, tmp_path, monkeypatch):
    """A worker that died at the batch of step 6 (log_every 4): the steps since the last log are logged at step 5,
    and their steps/s counted the seconds that noticing the death took (2 steps/s and an ETA of 13 hours where the
    run trained 300 steps/s). Here noticing it takes 1000 s of a clock the trainer reads."""
    from rnan_jax import loader, sources

    class Clock:
        offset = 0.0

        def time(self):
            return time.time() + self.offset

    clock, real, calls = Clock(), loader.BatchIterator.__next__, []

    def dying(self):
        calls.append(1)
        if len(calls) == 6:
            clock.offset += 1000.0
            raise sources.DataError("a data worker process died at batch 5 (killed by SIGKILL)")
        return real(self)

    monkeypatch.setattr(trainer, "time", clock)
    monkeypatch.setattr(loader.BatchIterator, "__next__", dying)
    with pytest.raises(sources.DataError, match="the last checkpoint is step 5, saved now,"):
        train_and_evaluate(x4_config(images, log_every=4, eval_every=10, checkpoint_every=10, total_steps=10),
                           str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    speed = {r["step"]: r["train/steps_per_s"] for r in lines if "train/steps_per_s" in r}
    assert sorted(speed) == [4, 5] and speed[5] > 0.01  # one step: 0.001 steps/s with the 1000 s counted


@pytest.fixture(scope="module")
def straight_log4(images, tmp_path_factory):
    """x4_config(images) of 8 steps, log_every 4, trained uninterrupted: its logged loss at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("straight_log4")
    train_and_evaluate(x4_config(images, total_steps=8, log_every=4, eval_every=8, checkpoint_every=8), str(workdir))
    return _logged_loss(workdir)


@pytest.mark.parametrize("how", ["sigterm", "worker"])
def test_a_rerun_after_a_stop_between_two_logs_logs_the_uninterrupted_runs_means(images, straight_log4, tmp_path,
                                                                                monkeypatch, how):
    """A stop at step 7 of log_every 4 (SIGTERM, or a data worker dying at the batch of step 8): the stop logs steps
    5-7 at step 7, but its checkpoint kept no sums, so the rerun's step-8 record was the loss of step 8 alone where
    the uninterrupted run's was the mean of steps 5-8 (0.2479 against 0.2434: a dip at every resume point, which
    pieces of one step each hid). The checkpoint now keeps the sums the stop logged."""
    from rnan_jax import loader, preemption, sources

    real, calls = loader.BatchIterator.__next__, []

    def stopping(self):
        calls.append(1)
        if how == "sigterm" and len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # a flag until step 7 is trained
        if how == "worker" and len(calls) == 8:
            raise sources.DataError("a data worker process died at batch 7 (killed by SIGKILL)")
        return real(self)

    config = x4_config(images, total_steps=8, log_every=4, eval_every=8, checkpoint_every=8)
    monkeypatch.setattr(loader.BatchIterator, "__next__", stopping)
    with pytest.raises(preemption.Preempted if how == "sigterm" else sources.DataError, match="checkpoint.* step 7"):
        train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    train_and_evaluate(config, str(tmp_path))
    loss = _logged_loss(tmp_path)
    assert sorted(loss) == [4, 7, 8]
    assert loss[4] == pytest.approx(straight_log4[4], rel=1e-6)
    assert loss[8] == pytest.approx(straight_log4[8], rel=1e-5)
    assert checkpoint.read_meta(str(tmp_path / "checkpoints"), 7)["since_last_log"]["steps"] == 3


def test_the_eta_leaves_the_first_validations_compile_out_of_the_validations_to_come(images, tmp_path, monkeypatch):
    """The ETA counted every validation still to come at the latest one's cost, and the first one's was mostly its
    compile (15 s of 16 in a run of eval_every 100, whose ETA at step 150 said 0:00:51 and which ended 11 s later; the
    paper's 200 validations: hours too many until the second). Here that compile takes 1000 s of the trainer's clock,
    reported as JAX reports a compile; the validator measures what its calls compile, for real too."""
    from rnan_jax import configs, upscalers, validation

    class Clock:
        offset = 0.0

        def time(self):
            return time.time() + self.offset

    clock, real, compiled = Clock(), upscalers.model_upscaler, []

    def compiling(params, config, **kwargs):
        upscale = real(params, config, **kwargs)

        def first_compiles(pair):
            if not compiled:
                compiled.append(1)
                clock.offset += 1000.0
                jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 1000.0)
            return upscale(pair)

        return first_compiles

    monkeypatch.setattr(trainer, "time", clock)
    monkeypatch.setattr(upscalers, "model_upscaler", compiling)
    train_and_evaluate(x4_config(images, total_steps=8, log_every=1, eval_every=2, checkpoint_every=4), str(tmp_path))
    logs = [json.loads(line) for line in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    eta = {log["step"]: log["train/eta_s"] for log in logs if "train/eta_s" in log}
    assert compiled and eta[3] < 1000.0  # validations at 4, 6 and 8: 3000 s with the compile counted for each
    monkeypatch.undo()

    validator = validation.Validator(configs.TrainConfig.from_config(x4_config(images, **{"model.features": 4})))
    params = jax.tree_util.tree_map(np.asarray, trainer.init(jax.random.key(0), validator.config))
    began = time.time()
    validator(params, 0)
    took = time.time() - began
    assert 0.0 < validator.compile_s <= took  # a size (and a model) it had not upscaled before
    validator(params, 0)
    assert validator.compile_s == 0.0


def test_a_finished_run_whose_last_validation_a_stop_ended_is_validated_once(images, straight, tmp_path, monkeypatch,
                                                                             capsys):
    """SIGTERM in the validation of the last step: its checkpoint, flagged validation_stopped in its meta, is saved,
    and the rerun validates it and ends. The flag stayed (orbax cannot save a step again), so every later rerun
    validated that step again rather than saying there is nothing to do. It is now dropped from the step's meta once
    validated, the rest of the record (its SHA-256s) as it was; also on a gs:// workdir, where it is one upload."""
    from rnan_jax import preemption, validation

    real, calls = validation.Validator.__call__, []

    def validate(self, *args):
        calls.append(1)
        if len(calls) == 2:  # step 6's
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args)

    monkeypatch.setattr(validation.Validator, "__call__", validate)
    with pytest.raises(preemption.Preempted, match="while validating step 6: saved a checkpoint at step 6"):
        train_and_evaluate(x4_config(images), str(tmp_path))
    monkeypatch.undo()
    directory = str(tmp_path / "checkpoints")
    before = checkpoint.read_meta(directory, 6)
    assert before["validation_stopped"] is True and set(before["sha256"]) == {"params", "opt"}
    results = train_and_evaluate(x4_config(images), str(tmp_path))
    assert results["val/psnr"] == pytest.approx(straight[1]["val/psnr"], abs=1e-9)
    after = checkpoint.read_meta(directory, 6)
    assert after == {k: v for k, v in before.items() if k != "validation_stopped"}
    assert "a stop ended the validation" not in dry_run(x4_config(images), str(tmp_path))
    capsys.readouterr()
    assert train_and_evaluate(x4_config(images), str(tmp_path)) == {}
    assert f"nothing to do: {tmp_path} is already at step 6 of total_steps 6" in capsys.readouterr().out
    assert (tmp_path / "train.log").read_text().count("step 6: validation PSNR") == 1
    assert sorted(os.listdir(tmp_path / "checkpoints" / "6" / "meta")) == ["commit_success.txt", "metadata"]

    bucket = tmp_path / "bucket"
    shutil.copytree(tmp_path / "checkpoints" / "6" / "meta", bucket / "6" / "meta")
    (bucket / "6" / "meta" / "metadata").write_text(json.dumps(before))
    monkeypatch.setattr(checkpoint.paths, "is_url", lambda p: str(p).startswith(str(bucket)))
    checkpoint.drop_from_meta(str(bucket), 6, "validation_stopped")
    assert json.loads((bucket / "6" / "meta" / "metadata").read_text()) == after


def test_init_from_names_the_step_it_read_while_its_run_saves_a_newer_one(images, straight, tmp_path, monkeypatch,
                                                                          capsys):
    """init_from's line named the newest step in the folder once the parameters were read: a run still training
    there that saved step 9 meanwhile had it name step 9 for the parameters of step 6."""
    source = tmp_path / "source"
    shutil.copytree(straight[0], source)
    real = checkpoint._read

    def saving_meanwhile(directory, at, which):
        read = real(directory, at, which)
        if not (source / "checkpoints" / "9").exists():
            shutil.copytree(source / "checkpoints" / "6", source / "checkpoints" / "9")
        return read

    monkeypatch.setattr(checkpoint, "_read", saving_meanwhile)
    config = x4_config(images, total_steps=1, **{"optim.lr": 0.0, "optim.schedule": "constant"})
    config.init_from = str(source)
    train_and_evaluate(config, str(tmp_path / "run"))
    assert f"init_from {source} (its parameters at step 6, x4 -> x4): copied 32" in capsys.readouterr().out


def test_validation_scores_each_set_on_rounded_y_shaved_by_the_scale_and_keeps_the_first_sets_images(images,
                                                                                                     tmp_path):
    """The validator's numbers against a direct numpy/scikit-image reading of the rule (the model's output clipped,
    x255 and rounded; MATLAB's Y, rounded; `scale` pixels shaved; the mean of the images' PSNRs), per set: the
    first set's val/*, a further set's val/<set>/* with its own bicubic PSNR; the image strips of the first set
    only; and `same_first_set` true of the run's own `describe()`, which names both sets."""
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio

    from rnan_jax import upscalers, validation
    from rnan_jax.configs import TrainConfig

    bench = tmp_path / "bench"
    shutil.copytree(images / "val", bench / "A" / "HR")
    shutil.copy(images / "train" / "0003.png", bench / "A" / "HR")  # two: one strip of the two logged
    (bench / "B" / "HR").mkdir(parents=True)
    for i in range(3):  # three: a median is not their mean
        shutil.copy(images / "train" / f"000{i}.png", bench / "B" / "HR")
    config = x4_config(images, **{"model.features": 4, "data.val_source": "benchmark", "data.val_dir": str(bench),
                                  "data.val_set": "A,B"})
    validator = validation.Validator(TrainConfig.from_config(config))
    params = jax.tree_util.tree_map(np.asarray, trainer.init(jax.random.key(0), validator.config))
    scores, strips = validator(params, 1)

    def y(rgb):
        return np.round(rgb2ycbcr(rgb.astype(np.float64) / 255.0)[..., 0])

    def reference_psnr(sr, hr):
        return peak_signal_noise_ratio(y(hr)[4:-4, 4:-4], y(sr)[4:-4, 4:-4], data_range=255)

    for vset, prefix in zip(validator.sets, ("val/", "val/B/")):
        srs = [np.floor(np.clip(np.asarray(apply(params, p.lr.astype(np.float32) / 255.0), np.float64), 0, 1) * 255
                        + 0.5).astype(np.uint8) for p in vset.pairs]
        bicubic = [upscalers.bicubic_upscaler(p) for p in vset.pairs]
        assert scores[prefix + "psnr"] == pytest.approx(
            np.mean([reference_psnr(s, p.hr) for s, p in zip(srs, vset.pairs)]), abs=1e-6)
        assert scores[prefix + "bicubic_psnr"] == pytest.approx(
            np.mean([reference_psnr(b, p.hr) for b, p in zip(bicubic, vset.pairs)]), abs=1e-6)
    assert [len(s.pairs) for s in validator.sets] == [2, 3]
    assert scores["val/bicubic_psnr"] != scores["val/B/bicubic_psnr"]
    assert list(strips) == ["val/0003 (LR | bicubic | SR | HR)"]  # A's first image alone
    assert validator.same_first_set(validator.describe())
    other = validation.Validator(TrainConfig.from_config(x4_config(images, **{
        "model.features": 4, "data.val_source": "benchmark", "data.val_dir": str(bench), "data.val_set": "B,A"})))
    assert not validator.same_first_set(other.describe()) and not other.same_first_set(validator.describe())


def _recording_steps(monkeypatch):
    """Wraps the trainer's jitted train step: the list it returns gets each step's own loss and gradient norm (the
    step's addition to the running sums, read before and after it)."""
    from rnan_jax import step

    real, steps = step.jit_train_step, []

    def jit_train_step(spec, mesh):
        f, replicated, batch = real(spec, mesh)

        def recorded(state, b, acc):
            before = {k: float(v) for k, v in jax.device_get(acc).items()}  # read before the step donates it
            state, acc = f(state, b, acc)
            after = jax.device_get(acc)
            steps.append({k: float(after[k]) - before[k] for k in ("loss", "grad_norm", "steps")})
            return state, acc

        return recorded, replicated, batch

    monkeypatch.setattr(step, "jit_train_step", jit_train_step)
    return steps


def test_logs_validations_and_checkpoints_follow_their_schedules_and_the_logged_means_are_the_steps_since_the_last_log(
        images, tmp_path, monkeypatch):
    """A run of 5 steps, log_every 2, eval_every 3, checkpoint_every 2: logs at 2, 4 and the last step 5, each the mean
    of its own steps' losses and gradient norms (as the step computed them, recorded apart); validations at 3 and 5,
    checkpoints at 2, 4 and 5; the results are the last log's and the last validation's."""
    steps = _recording_steps(monkeypatch)
    results = train_and_evaluate(x4_config(images, total_steps=5, log_every=2, eval_every=3, checkpoint_every=2),
                                 str(tmp_path))
    assert len(steps) == 5 and all(s["steps"] == 1 for s in steps)
    losses = [s["loss"] for s in steps]
    assert len(set(losses)) == 5 and all(0 < x < 1 for x in losses)
    lines = [json.loads(x) for x in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in lines if "train/loss" in r}
    assert sorted(train) == [2, 4, 5]
    for at, ran in ((2, steps[0:2]), (4, steps[2:4]), (5, steps[4:5])):
        assert train[at]["train/loss"] == pytest.approx(np.mean([s["loss"] for s in ran]), rel=1e-5), at
        assert train[at]["train/grad_norm"] == pytest.approx(np.mean([s["grad_norm"] for s in ran]), rel=1e-5), at
    assert results["loss"] == pytest.approx(steps[4]["loss"], rel=1e-5)
    assert results["grad_norm"] == pytest.approx(steps[4]["grad_norm"], rel=1e-5)
    val = {r["step"]: r["val/psnr"] for r in lines if "val/psnr" in r}
    assert sorted(val) == [3, 5] and results["val/psnr"] == val[5]
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2", "4", "5"]


def test_a_resume_with_a_batch_size_that_does_not_divide_the_patches_trained_goes_on_past_all_of_them():
    """8 patches trained at batch 4, resumed at batch 3: global batch 3 (patches 9-11) is the first that holds none
    trained on; batch 2 (patches 6-8) trained on 6 and 7 again. A meta without the record resumes at the step."""
    assert trainer._next_batch({"next_patch": 8, "batch_size": 4}, 2, 3) == (3, 4)
    assert trainer._next_batch({"next_patch": 8, "batch_size": 4}, 2, 2) == (4, 4)
    assert trainer._next_batch({"next_patch": 8, "batch_size": 4}, 2, 8) == (1, 4)
    assert trainer._next_batch({}, 5, 3) == (5, 3)


def test_a_single_non_finite_step_since_the_last_log_stops_the_run(images, tmp_path):
    """log_every 1: each log holds one step, and its one non-finite step stops the run there, saving nothing."""
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient in 1 step\(s\) up to step 1; stopped without "
                                            r"saving: there is no checkpoint yet"):
        train_and_evaluate(x4_config(images, total_steps=2, log_every=1, eval_every=2, checkpoint_every=1,
                                     **{"optim.lr": 1e30}), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
    # a checkpoint step before the log step: the save checks the steps since the last log too, and saves nothing
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient in 1 step\(s\) up to step 1; "):
        train_and_evaluate(x4_config(images, total_steps=2, log_every=2, eval_every=2, checkpoint_every=1,
                                     **{"optim.lr": 1e30}), str(tmp_path / "saving"))
    assert not (tmp_path / "saving" / "checkpoints").exists() or not os.listdir(tmp_path / "saving" / "checkpoints")


def test_a_stop_at_a_log_step_logs_that_step_once_and_saves_no_sums(images, tmp_path, monkeypatch):
    """SIGTERM while step 4 (a log step of log_every 2) trains: step 4's log is the mean of steps 3 and 4, written
    once (no second record of the emptied sums), and its checkpoint keeps no steps for the rerun's next log."""
    from rnan_jax import loader, preemption

    steps = _recording_steps(monkeypatch)
    real, calls = loader.BatchIterator.__next__, []

    def stopping(self):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # a flag until step 4 is trained
        return real(self)

    monkeypatch.setattr(loader.BatchIterator, "__next__", stopping)
    with pytest.raises(preemption.Preempted, match="saved a checkpoint at step 4 "):
        train_and_evaluate(x4_config(images, eval_every=6, checkpoint_every=6), str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4] and len(steps) == 4
    assert train[1]["train/loss"] == pytest.approx((steps[2]["loss"] + steps[3]["loss"]) / 2, rel=1e-5)
    assert checkpoint.read_meta(str(tmp_path / "checkpoints"), 4)["since_last_log"]["steps"] == 0
