"""A run over many resumes: what the workdir's logs say after each (TensorBoard, metrics.jsonl, the curve)."""
import json
import os

import pytest

from rnan_jax import figures, scalars
from rnan_jax.trainer import train_and_evaluate
from test_train import images, x4_config  # noqa: F401 (fixture)

# Execution knobs (the same function, another speed): one batch chunk and the rolled scan compile each run's train
# step about a third faster on CPU; these tests are about what the logs say, not about the step's knobs.
FAST = {"execution.batch_chunks": 1, "execution.scan_unroll": 1}


def test_a_resumed_run_drops_the_steps_trained_again_from_the_scalars_and_the_curve(images, tmp_path):  # noqa: F811
    """A run validated at step 6, then was killed before its next checkpoint (step 8); the rerun resumed from step
    4 with eval_every 5. Step 6's scores were of a trajectory that no longer exists, yet read_scalars, TensorBoard
    (no purge_step) and the curve kept them among the new run's: val/psnr at steps 2, 4, 5, 6, 10."""
    workdir = tmp_path / "run"
    first = x4_config(images, total_steps=10, log_every=1, eval_every=2, checkpoint_every=4, **FAST)
    train_and_evaluate(first, str(workdir), stop_after=7)  # logged 1-7, validated at 2, 4, 6; checkpoint 4
    killed = scalars.read_scalars(str(workdir / "tensorboard"))
    assert sorted(killed["val/psnr"]) == [2, 4, 6] and sorted(killed["train/loss"]) == list(range(1, 8))
    train_and_evaluate(x4_config(images, total_steps=10, log_every=1, eval_every=5, checkpoint_every=4, **FAST),
                       str(workdir))
    board = scalars.read_scalars(str(workdir / "tensorboard"))
    assert sorted(board["val/psnr"]) == [2, 4, 5, 10]
    assert sorted(board["train/loss"]) == list(range(1, 11))
    for s in (1, 2, 3, 4):  # before the resumed step: the first run's values, as logged
        assert board["train/loss"][s] == killed["train/loss"][s]
    lines = [json.loads(line) for line in (workdir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "resumed": True} in lines
    new = {r["step"]: r["val/psnr"] for r in lines[lines.index({"step": 4, "resumed": True}):] if "val/psnr" in r}
    steps, psnrs, _ = figures.read_validation(str(workdir))
    assert steps == [2, 4, 5, 10] and psnrs[2:] == [new[5], new[10]]
    assert psnrs[:2] == pytest.approx([killed["val/psnr"][2][0], killed["val/psnr"][4][0]], abs=1e-4)  # float32 there


def test_a_line_cut_short_by_a_killed_run_does_not_swallow_the_resumed_runs_first_record(images, tmp_path):  # noqa: F811
    """metrics.jsonl left by a run killed mid-line (a full disk, a kill -9 in a write): the resumed run's first record
    was appended to that line, and both were lost to every reader (here step 3's loss, logged again)."""
    workdir, config = tmp_path / "run", x4_config(images, total_steps=4, log_every=1, eval_every=2, checkpoint_every=2,
                                                 **FAST)
    train_and_evaluate(config, str(workdir), stop_after=3)  # logged 1-3, checkpoint 2
    jsonl = workdir / "tensorboard" / "metrics.jsonl"
    with open(jsonl, "a") as f:
        f.write('{"step": 4, "train/lo')
    train_and_evaluate(config, str(workdir))
    lines = jsonl.read_text().splitlines()
    cut = [i for i, line in enumerate(lines) if line == '{"step": 4, "train/lo']
    assert len(cut) == 1
    after = [json.loads(line) for line in lines[cut[0] + 1:]]
    assert [r["step"] for r in after if "train/loss" in r] == [3, 4] and after[0] == {"step": 2, "resumed": True}
    assert figures.read_validation(str(workdir))[0] == [2, 4]


def test_what_a_killed_run_logged_is_in_its_event_file_at_once(tmp_path):
    """tensorboardX wrote the event file every 30 s: a run killed outright (SIGKILL, a lost VM) after a checkpoint
    lost the values logged up to it from TensorBoard for good (the rerun resumes after them and does not log them
    again). What is on disk while the writer is open is what such a kill leaves."""
    import numpy as np

    from rnan_jax import summary

    writer = summary.Writer(str(tmp_path), resumed_from=0)
    try:
        for s in (1, 2, 3):
            writer.scalars(s, {"train/loss": 0.5 / s, "train/lr": 1e-3})
        writer.scalars(3, {"val/psnr": 31.25})
        writer.images(3, {"val/0": np.zeros((4, 16, 3), np.uint8)})
        on_disk = scalars.read_scalars(str(tmp_path))
        assert {s: v for s, (v, _) in on_disk["train/loss"].items()} == pytest.approx({1: 0.5, 2: 0.25, 3: 0.5 / 3})
        assert {s: v for s, (v, _) in on_disk["val/psnr"].items()} == {3: 31.25}
        writer.scalars(4, {"train/loss": 0.125})  # still writing after the waits
        assert scalars.read_scalars(str(tmp_path))["train/loss"][4][0] == 0.125
    finally:
        writer.close()
    assert sorted(scalars.read_scalars(str(tmp_path))["train/loss"]) == [1, 2, 3, 4]


def test_an_infinite_psnr_is_written_without_tensorboardx_s_nan_or_inf_warning(tmp_path, caplog):
    """A flat validation image's bicubic PSNR is inf from the first validation on (its model's too once it
    reproduces it): tensorboardX warned "NaN or Inf found in input tensor." at every validation."""
    import logging
    import math

    from rnan_jax import summary

    with caplog.at_level(logging.WARNING):
        writer = summary.Writer(str(tmp_path))
        writer.scalars(1, {"val/psnr": math.inf, "val/bicubic_psnr": math.inf})
        writer.close()
    assert "NaN or Inf" not in caplog.text
    assert scalars.read_scalars(str(tmp_path))["val/psnr"][1][0] == math.inf


def test_a_later_url_run_removes_the_local_copies_of_runs_killed_outright(tmp_path, monkeypatch):
    """A gs:// run keeps its TensorBoard folder and train.log in the temp folder while it runs; killed outright
    (SIGKILL, the OOM killer) it left them there for good (106 on one machine). Their names now say whose they
    are (host, pid), and a later run removes those of this host whose process is gone and whose lock nobody
    holds: not a live run's, not one of another host, not an old unnamed one."""
    import socket
    import subprocess
    import sys

    from rnan_jax import summary

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        (tmp_path / f"rnan_tensorboard.{host}.{dead_pid}.abc").mkdir()
        (tmp_path / f"rnan_tensorboard.{host}.{dead_pid}.abc" / "events.out").write_text("x")
        (tmp_path / f"rnan_train.{host}.{dead_pid}.def.log").write_text("x")
        kept = [f"rnan_train.{host}.{live.pid}.ghi.log", f"rnan_train.other-{host}.{dead_pid}.jkl.log",
                "rnan_train_legacy.log"]
        for name in kept:
            (tmp_path / name).write_text("x")
        summary._remove_dead_copies()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    finally:
        live.kill()
        live.wait()
    assert summary._local_copy_prefix("train") == f"rnan_train.{host}.{os.getpid()}."


def test_train_log_is_utf_8_whatever_the_locale(tmp_path):
    """Under LANG=C without Python's UTF-8 mode (PYTHONUTF8=0) train.log was opened in ASCII: a run whose workdir is
    named "données" stopped at its first line with "'ascii' codec can't encode characters"."""
    import subprocess
    import sys

    path = tmp_path / "données" / "train.log"
    path.parent.mkdir()
    code = ("import sys; from rnan_jax import summary\n"
            "with summary.RunLog(sys.argv[1]) as log:\n"
            "    log.write('workdir ' + sys.argv[1])\n")
    env = {**os.environ, "PYTHONUTF8": "0", "LANG": "C", "LC_ALL": "C"}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert path.read_text(encoding="utf-8").rstrip().endswith(f"workdir {path}")


def _recorded_batches(monkeypatch):
    """The LR patches of every batch the training iterators give, in order (one list for all the runs after it)."""
    from rnan_jax import loader

    taken, real = [], loader.BatchIterator.__next__

    def record(self):
        batch = real(self)
        taken.append(batch["lr"].copy())
        return batch

    monkeypatch.setattr(loader.BatchIterator, "__next__", record)
    return taken


def test_a_run_resumed_with_another_batch_size_goes_on_with_the_patches_it_has_not_trained_on(images, tmp_path,  # noqa: F811
                                                                                               monkeypatch):
    """Halving batch_size on a resume (less memory) had the run read global batch `step` of the new size: patches it
    had trained on in its last steps, the same crops in the same order (a larger batch skipped as many). The data now
    goes on at the first patch not trained on, and the line says so; the checkpoints record the position."""
    import numpy as np

    from rnan_jax import checkpoint, data
    from rnan_jax.configs import TrainConfig

    workdir = tmp_path / "run"
    taken = _recorded_batches(monkeypatch)
    train_and_evaluate(x4_config(images, total_steps=2, eval_every=2, checkpoint_every=2, **FAST), str(workdir))
    first = np.concatenate(taken)
    del taken[:]
    train_and_evaluate(x4_config(images, total_steps=4, eval_every=4, checkpoint_every=2, batch_size=2, **FAST),
                       str(workdir))
    resumed = np.concatenate(taken)
    cfg = TrainConfig.from_config(x4_config(images))
    it = data.train_iterator(cfg.data, global_batch_size=4, seed=cfg.seed)
    try:
        it.set_state({"next_batch": 2})  # patches 8..11: the next ones of the run at batch 4
        following = next(it)["lr"]
    finally:
        it.close()
    assert first.shape[0] == 8  # patches 0..7
    assert resumed.shape[0] == 4 and np.array_equal(resumed, following)
    assert not any(np.array_equal(p, q) for p in resumed for q in first)  # none trained on again
    assert [checkpoint.read_meta(str(workdir / "checkpoints"), s)["next_patch"] for s in (2, 4)] == [8, 12]
    log = (workdir / "train.log").read_text()
    assert ("batch_size changed from 4 to 2: the training data goes on at patch 8 (global batch 4 of 2), past the "
            "patches trained on") in log


def test_a_resume_with_another_architecture_is_refused_before_the_data_is_read(images, tmp_path):  # noqa: F811
    """model.scale=2 given by mistake to an x4 workdir was refused only after the training images were decoded into a
    cache for the new scale (many minutes and gigabytes for DIV2K): the refusal comes first now, and the workdir's
    checkpoint is kept as it was."""
    from rnan_jax import checkpoint

    workdir, cache = tmp_path / "run", tmp_path / "cache_x2"
    train_and_evaluate(x4_config(images, total_steps=1, eval_every=1, checkpoint_every=1, **FAST), str(workdir))
    with pytest.raises(ValueError, match=r"holds an x4 model .*; the config asks for an x2 model .* Use another "
                                         r"--workdir \(with --config.init_from="):
        train_and_evaluate(x4_config(images, total_steps=2, **{"model.scale": 2, "data.cache_dir": str(cache)},
                                     **FAST), str(workdir))
    assert not cache.exists()
    assert "decoding" not in (workdir / "train.log").read_text().split("started: ")[-1]
    assert checkpoint.complete_steps(str(workdir / "checkpoints")) == [1]


def test_a_resume_with_the_ema_switched_off_says_that_it_drops_it(images, tmp_path):  # noqa: F811
    """Switching the EMA on at a resume was said in a line; switching it off dropped the checkpoint's EMA without a
    word (validation and best/ then score the parameters, not the EMA), and the config line, which compares with
    the start's config.json, named no change when that start had it off too."""
    workdir = tmp_path / "run"
    train_and_evaluate(x4_config(images, total_steps=1, eval_every=1, checkpoint_every=1, **FAST), str(workdir))
    train_and_evaluate(x4_config(images, total_steps=2, eval_every=2, checkpoint_every=1,
                                 **{"optim.ema_decay": 0.5}, **FAST), str(workdir))
    train_and_evaluate(x4_config(images, total_steps=3, eval_every=3, checkpoint_every=1, **FAST), str(workdir))
    text = [line[21:] for line in (workdir / "train.log").read_text().splitlines()]
    third = text[max(i for i, t in enumerate(text) if t.startswith("started: ")):]
    assert f"{workdir}/checkpoints/2 holds an EMA, which optim.ema_decay 0 drops: validation and best/ score the " \
           "parameters from here" in third
    assert "ema" in os.listdir(workdir / "checkpoints" / "2") and "ema" not in os.listdir(workdir / "checkpoints" / "3")
