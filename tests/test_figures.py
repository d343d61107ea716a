"""The MODEL_ZOO.md pictures: a training curve from metrics.jsonl and Figure 3-style crops."""
import io
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from rnan_jax import RNANConfig, figures, init
from rnan_jax.upscalers import bicubic_upscaler, model_upscaler
from test_gcs import gcs  # noqa: F401 (fixture)

pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[figures]')")


def test_curve_reads_the_validation_records(tmp_path):
    log = tmp_path / "run" / "tensorboard"
    log.mkdir(parents=True)
    records = [{"step": 200, "train/loss": 0.1}, {"step": 1000, "val/psnr": 35.0, "val/bicubic_psnr": 33.6},
               {"step": 2000, "val/psnr": 36.0, "val/bicubic_psnr": 33.6},
               {"step": 1000, "val/psnr": 35.5, "val/bicubic_psnr": 33.6}]  # a resumed run's repeat wins
    (log / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert figures.read_validation(str(tmp_path / "run")) == ([1000, 2000], [35.5, 36.0], 33.6)
    out = tmp_path / "curve.png"
    figures.training_curve(str(tmp_path / "run"), str(out), references={"FSRCNN (paper)": 37.05})
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    with pytest.raises(figures.FigureError, match="no such file"):
        figures.read_validation(str(tmp_path / "nope"))


def test_curve_skips_a_line_cut_short_by_a_killed_run_and_says_so(tmp_path, caplog):
    """A run killed mid-write leaves a partial line (a resumed run appends after it); the curve failed on it with
    a JSON error naming no file ("figures: Expecting ':' delimiter: line 1 column 24 (char 23)"), and on a record
    without a step with a KeyError traceback."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 100, "val/psnr": 30.5, "val/bicubic_psnr": 29.0}\n{"step": 200, "val/ps'
                    '{"step": 150, "train/loss": 0.1}\n{"step": 200, "val/psnr": 31.0}\n\n{"val/psnr": 99.0}\n'
                    '{"step": 300, "val/psnr": 31.5}\n{"st')
    assert figures.read_validation(str(path)) == ([100, 200, 300], [30.5, 31.0, 31.5], 29.0)
    assert caplog.messages == [f"{path}: skipped line(s) 2, 5, 7, not a JSON record with a step"]


def test_cli_writes_the_figure_at_the_output_path_and_refuses_a_folder(tmp_path, capsys):
    """An --output without extension was written as <output>.png while the tool said "wrote <output>"; an --output
    that is a folder ended in an IsADirectoryError traceback after the work."""
    workdir = tmp_path / "run" / "tensorboard"
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 100, "val/psnr": 30.5}\n')
    out = tmp_path / "figs" / "curve"
    assert figures.main(["curve", "--workdir", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert os.listdir(out.parent) == ["curve"]
    with Image.open(out) as im:
        assert im.format == "PNG"
    folder = tmp_path / "figs" / "curve.png"
    folder.mkdir()
    assert figures.main(["curve", "--workdir", str(tmp_path / "run"), "--output", str(folder)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"figures: --output {folder}: is a folder (give the figure's "
                                                    "file name)"]
    assert os.listdir(folder) == []


def test_comparison_scores_each_panel_as_evaluate(tmp_path):
    hr_dir = tmp_path / "benchmark" / "Mine" / "HR"
    hr_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48] / 6.0
    hr = np.stack([np.sin(xx + c) * np.cos(yy) for c in range(3)], -1) * 100 + 128 + rng.normal(0, 3, (40, 48, 3))
    Image.fromarray(np.clip(hr, 0, 255).astype(np.uint8)).save(hr_dir / "pic.png")
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
    upscalers = {"Bicubic": bicubic_upscaler, "RNAN": model_upscaler(init(jax.random.key(0), config), config)}
    out = tmp_path / "fig.png"
    scores = figures.comparison(upscalers, "Mine/pic", (8, 6, 20), str(out), scale=2, data_dir=str(tmp_path))
    assert set(scores) == {"Bicubic", "RNAN"} and os.path.isfile(out)
    from rnan_jax.evaluate import evaluate_bicubic

    bicubic = evaluate_bicubic(["Mine"], (2,), data_dir=str(tmp_path), progress=False).scores[0]
    assert scores["Bicubic"] == pytest.approx((bicubic.psnr, bicubic.ssim))
    with pytest.raises(figures.FigureError, match="does not fit"):
        figures.comparison(upscalers, "Mine/pic", (40, 30, 20), str(out), scale=2, data_dir=str(tmp_path))
    hr = str(hr_dir)
    for image, error in (("pic", "--image takes SET/NAME, e.g. Set14/barbara, got 'pic'"),
                         ("mine/pic", f"{tmp_path}/benchmark/mine/HR: no such folder; did you mean Mine?"),
                         ("Other/pic", f"{tmp_path}/benchmark/Other/HR: no such folder; the sets in "
                                       f"{tmp_path}/benchmark: Mine"),
                         ("Mine/Pic", f"{hr}: no image named Pic; did you mean Mine/pic?"),
                         ("Mine/nope", f"{hr}: no image named nope; it holds pic")):
        with pytest.raises(figures.FigureError) as e:
            figures.comparison(upscalers, image, (8, 6, 20), str(out), scale=2, data_dir=str(tmp_path))
        assert str(e.value) == error


def test_cli_refuses_bad_flags_in_one_line_before_any_work(tmp_path, capsys):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    cases = ((["curve", "--workdir", str(tmp_path), "--output", str(in_the_way / "f.png")],
              f"figures: --output's folder {in_the_way}: is a file, not a folder"),
             (["curve", "--workdir", str(tmp_path), "--output", str(tmp_path / "f.png"), "--reference", "37.05"],
              "figures: --reference takes NAME=DB, e.g. 'FSRCNN (paper)=37.05', got '37.05'"),
             (["compare", "--checkpoint", str(tmp_path / "nope"), "--image", "Set5/baby", "--box", "1,2,x",
               "--output", str(tmp_path / "c.png")], "figures: --box takes x,y,size (integers), got '1,2,x'"),
             # --output=$OUT with OUT unset: the figure was drawn, then "[Errno 2] No such file or directory:
             # '/tmp/..host.123.456.partial' -> ''"
             (["curve", "--workdir", str(tmp_path), "--output", ""],
              "figures: --output : empty (an unset variable?): name where to write (. is the current folder)"))
    for argv, line in cases:
        assert figures.main(argv) == 1
        assert capsys.readouterr().err.splitlines() == [line]
    usage = (([], "figures: error: the following arguments are required: command (see python -m rnan_jax.figures "
                  "--help)"),
             (["curve", "--workdir", str(tmp_path)], "figures: error: the following arguments are required: "
                                                     "--output (see python -m rnan_jax.figures curve --help)"),
             (["plot"], "figures: error: argument command: invalid choice: 'plot' (choose from 'curve', 'compare') "
                        "(see python -m rnan_jax.figures --help)"))
    for argv, line in usage:  # argparse's misuse: one line and status 1 as well, not its usage text and 2
        with pytest.raises(SystemExit) as e:
            figures.main(argv)
        assert e.value.code == line and capsys.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_comparison_table_leaves_out_the_time_between_a_killed_run_and_its_resume(tmp_path):
    """A run logged steps 1-5 over 100 s and was killed; resumed from step 3 an hour later, it logged steps 4-8
    over 200 s. The table said "4200 s from the first to the last logged value": the downtime counted as
    training time. Each run's file begins with a START (summary.Writer's purge_step), which parts the runs."""
    from tensorboardX import SummaryWriter

    from rnan_jax import scalars

    log = tmp_path / "tensorboard"
    for suffix, purge, steps, t0, dt in ((".a", 1, range(1, 6), 1000.0, 25.0), (".b", 4, range(4, 9), 5000.0, 50.0)):
        writer = SummaryWriter(str(log), filename_suffix=suffix, purge_step=purge)
        for i, s in enumerate(steps):
            writer.add_scalar("train/loss", 1.0 / s + (purge > 1), s, walltime=t0 + dt * i)
        writer.close()
    run = scalars.read_scalars(str(log))
    assert {s: round(v, 4) for s, (v, _) in run["train/loss"].items()} == {1: 1.0, 2: 0.5, 3: 0.3333, 4: 1.25,
                                                                            5: 1.2, 6: 1.1667, 7: 1.1429, 8: 1.125}
    assert run.sessions == [(1000.0, 1100.0), (5000.0, 5200.0)]
    last = scalars.comparison_table({"float32": run}).splitlines()[-1]
    assert last == ("float32: 300 s from the first to the last logged value of each of its 2 runs "
                    "(the 3900 s between them left out)")
    one = {"train/loss": {s: (1.0, 10.0 * s) for s in (1, 2, 3)}}  # plain mappings, as before: first to last value
    assert scalars.comparison_table({"a": one}).splitlines()[-1] == "a: 20 s from the first to the last logged value"


def test_read_scalars_reads_a_gs_logdir(gcs, tmp_path):  # noqa: F811
    """tools/compare_dtypes.py on a gs:// workdir (a TPU VM's) trained both runs, then read their scalars with a glob
    of the URL's text, which found nothing: an empty table, "error: no run logged a value to compare"."""
    from etils import epath
    from tensorboardX import SummaryWriter

    from rnan_jax import scalars

    local = tmp_path / "tensorboard"
    for suffix, purge, steps in ((".0001", 1, (1, 2, 3)), (".0002", 3, (3, 4))):  # a run, then its resume
        writer = SummaryWriter(str(local), filename_suffix=suffix, purge_step=purge)
        for s in steps:
            writer.add_scalar("train/loss", s + purge / 10, s, walltime=100.0 * purge + s)
        writer.close()
    for path in local.iterdir():
        epath.Path("gs://bucket/compare/float32/tensorboard", path.name).write_bytes(path.read_bytes())
    run = scalars.read_scalars("gs://bucket/compare/float32/tensorboard")
    assert {s: round(v, 4) for s, (v, _) in run["train/loss"].items()} == {1: 1.1, 2: 2.1, 3: 3.3, 4: 4.3}
    assert run == scalars.read_scalars(str(local)) and run.sessions == [(101.0, 103.0), (303.0, 304.0)]
    # a logdir whose name holds glob characters (runs/x4[a]) was globbed as a pattern: nothing found
    bracketed = tmp_path / "x4[a]" / "tensorboard"
    bracketed.mkdir(parents=True)
    for path in local.iterdir():
        (bracketed / path.name).write_bytes(path.read_bytes())
        epath.Path("gs://bucket/runs/x4[a]/tensorboard", path.name).write_bytes(path.read_bytes())
    assert scalars.read_scalars(str(bracketed)) == run
    assert scalars.read_scalars("gs://bucket/runs/x4[a]/tensorboard") == run


def test_compare_dtypes_reads_back_a_workdir_given_with_a_tilde(tmp_path):
    """--workdir=~/dt (no shell expands a ~ after "="): the trainer trained in $HOME/dt, then the tool read the scalars
    of ./~/dt/float32/tensorboard, found none, and ended with "error: no run logged a value to compare", status 1."""
    from rnan_jax import env, native

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    caches = {variable: env.cache_folder(name, variable)  # this HOME's: the compiled kernels reused
              for name, variable in (("xla", "RNAN_JAX_CACHE"), ("native", native.NATIVE_CACHE_ENV))}
    r = subprocess.run([sys.executable, os.path.join(repo, "tools", "compare_dtypes.py"),
                        f"--config={repo}/experiments/demo.py", "--workdir=~/dt", "--dtypes=float32",
                        "--config.total_steps=2", "--config.log_every=1", "--config.eval_every=2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu", **caches})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and re.fullmatch(r"\| 2 \| \d\.\d{5} \| \d\d\.\d{3} \|", rows[0]), r.stdout
    assert sorted(os.listdir(tmp_path)) == ["home"] and os.listdir(tmp_path / "home" / "dt") == ["float32"]


def test_curve_takes_the_workdirs_tensorboard_folder_and_titles_the_run(tmp_path, monkeypatch):
    """`figures curve --workdir RUN/tensorboard` (the folder TensorBoard's --logdir names) looked for
    RUN/tensorboard/tensorboard/metrics.jsonl ("no such file"); given that folder or the file itself, the curve
    was titled "tensorboard: ..." or "metrics.jsonl: ...", not with the run's name."""
    log = tmp_path / "x2" / "tensorboard"
    log.mkdir(parents=True)
    (log / "metrics.jsonl").write_text('{"step": 100, "val/psnr": 30.5, "val/bicubic_psnr": 29.0}\n'
                                       '{"step": 200, "val/psnr": 31.25, "val/bicubic_psnr": 29.0}\n')
    titles = []
    monkeypatch.setattr(figures, "_save", lambda fig, output: titles.append(fig.axes[0].get_title()))
    for workdir in (tmp_path / "x2", log, f"{log}/", log / "metrics.jsonl"):
        assert figures.read_validation(str(workdir)) == ([100, 200], [30.5, 31.25], 29.0), workdir
        figures.training_curve(str(workdir), str(tmp_path / "c.png"))
    assert titles == ["x2: last 31.250 dB"] * 4


@pytest.mark.parametrize("command", ["curve", "compare"])
def test_help_describes_every_flag(command, capsys):
    """`figures curve --help` listed --output and --title with no word on them (what file, which format, what title
    by default); every option of both commands says what it takes."""
    with pytest.raises(SystemExit) as e:
        figures.main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    options = out.split("options:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options.strip("\n"))[1:]  # one per option, its wrapped lines joined
    flags = [entry.split()[0].rstrip(",") for entry in entries]
    assert "--output" in flags and len(flags) == (5 if command == "curve" else 8), out
    for entry in entries:
        name, *rest = re.split(r"\s{2,}", " ".join(entry.split("\n")).strip(), maxsplit=1)
        assert rest and rest[0].strip(), f"{name} has no description:\n{out}"
    assert "--output OUTPUT the figure's file: PNG, or the format its extension names" in " ".join(out.split()), out


def test_curve_reads_a_gs_workdir(gcs, tmp_path, monkeypatch):  # noqa: F811
    """A TPU VM's run keeps its workdir in a bucket (README): `figures curve --workdir gs://BUCKET/runs/x4` said
    "gs://BUCKET/runs/x4/tensorboard/metrics.jsonl: no such file" of the file that is there (os.path looked for it)."""
    from etils import epath

    text = ('{"step": 100, "val/psnr": 30.5, "val/bicubic_psnr": 29.0}\n{"step": 200, "val/psnr": 31.0}\n'
            '{"step": 100, "resumed": true}\n{"step": 200, "val/psnr": 31.25}\n')
    epath.Path("gs://bucket/runs/x4/tensorboard/metrics.jsonl").write_text(text)
    titles = []
    monkeypatch.setattr(figures, "_save", lambda fig, output: titles.append(fig.axes[0].get_title()))
    for workdir in ("gs://bucket/runs/x4", "gs://bucket/runs/x4/tensorboard", "gs://bucket/runs/x4/tensorboard/"
                    "metrics.jsonl"):
        assert figures.read_validation(workdir) == ([100, 200], [30.5, 31.25], 29.0), workdir
        figures.training_curve(workdir, str(tmp_path / "c.png"))
    assert titles == ["x4: last 31.250 dB"] * 3
    with pytest.raises(figures.FigureError, match="^gs://bucket/runs/x5/tensorboard/metrics.jsonl: no such file"):
        figures.read_validation("gs://bucket/runs/x5")


def test_compare_reads_by_default_the_parameters_validation_scored(tmp_path, capsys):
    """`figures compare --checkpoint RUN` of a run trained with EMA scored (and drew) its raw parameters, while
    evaluate, upscale and the run's own validation use the EMA (--which auto): the figure's PSNR was not the run's.
    It takes --which as the other CLIs do, auto by default."""
    from test_cli import _tiny_ema_run

    from rnan_jax.evaluate import evaluate_model

    workdir, config, (params, ema) = _tiny_ema_run(tmp_path)

    def scored(p):
        score = evaluate_model(p, config, ["Mine"], data_dir=str(tmp_path), progress=False).scores[0]
        return f"RNAN {score.psnr:.2f} dB / {score.ssim:.4f}"

    assert scored(ema) != scored(params)
    for which, expected in ((None, ema), ("ema", ema), ("latest", params)):
        argv = ["compare", "--checkpoint", str(workdir), "--image", "Mine/pic", "--box", "8,6,20",
                "--output", str(tmp_path / "c.png"), "--data_dir", str(tmp_path)] + ["--which", which] * bool(which)
        assert figures.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"wrote {tmp_path / 'c.png'}: Bicubic ") and out.endswith(f", {scored(expected)}\n"), \
            (which, out)


def test_curve_of_a_folder_inside_the_workdir_names_the_workdir_to_give(tmp_path, capsys, monkeypatch):
    """`figures curve --workdir RUN/checkpoints` (or RUN/best/4) said "metrics.jsonl: no such file (written by the
    trainer since metrics.jsonl was added)", as if the run were too old, not that RUN was the folder to give."""
    run = tmp_path / "x2"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "metrics.jsonl").write_text('{"step": 100, "val/psnr": 30.5}\n')
    (run / "checkpoints" / "100" / "params").mkdir(parents=True)
    (run / "best" / "100" / "params").mkdir(parents=True)
    out = str(tmp_path / "c.png")
    for given in (run / "checkpoints", run / "best" / "100", f"{run}/checkpoints/"):
        assert figures.main(["curve", "--workdir", str(given), "--output", out]) == 1
        assert capsys.readouterr().err == (f"figures: {os.path.join(str(given), 'tensorboard', 'metrics.jsonl')}: no "
                                           f"such file: {given} is inside the training workdir {run}; give --workdir "
                                           f"{run}\n")
    monkeypatch.chdir(tmp_path)  # a relative path is answered with one
    assert figures.main(["curve", "--workdir", "x2/checkpoints", "--output", out]) == 1
    assert capsys.readouterr().err.endswith(": x2/checkpoints is inside the training workdir x2; give --workdir x2\n")
    (tmp_path / "other").mkdir()  # a folder of no run: the message as it was
    assert figures.main(["curve", "--workdir", str(tmp_path / "other"), "--output", out]) == 1
    assert capsys.readouterr().err.endswith("no such file (written by the trainer since metrics.jsonl was added)\n")


def test_a_checkpoints_folder_of_no_run_above_the_workdir_given_is_not_named_the_workdir(tmp_path, capsys,
                                                                                        monkeypatch):
    """Any folder holding a checkpoints/ up to three levels up was taken for the run: with a /data/checkpoints (or
    ~/checkpoints) of another tool, `figures curve --workdir /data/runs/x3` (a typo, or a run not started) said
    "/data/runs/x3 is inside the training workdir /data; give --workdir /data". A workdir is a checkpoints/ with
    the config.json or train.log a run writes beside it (or its tensorboard/metrics.jsonl)."""
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)  # another tool's
    out = str(tmp_path / "c.png")
    monkeypatch.chdir(tmp_path)
    for given in (str(tmp_path / "runs" / "x3"), "runs/x3", str(tmp_path / "runs")):
        assert figures.main(["curve", "--workdir", given, "--output", out]) == 1
        assert capsys.readouterr().err == (f"figures: {os.path.join(given, 'tensorboard', 'metrics.jsonl')}: no such "
                                           "file (written by the trainer since metrics.jsonl was added)\n")
    for name in ("config.json", "train.log"):  # a run's, whose metrics.jsonl is not written yet (or was lost)
        run = tmp_path / f"run_{name}"
        (run / "checkpoints" / "200").mkdir(parents=True)
        (run / name).write_text("{}\n")
        given = run / "checkpoints" / "200"
        assert figures.main(["curve", "--workdir", str(given), "--output", out]) == 1
        assert capsys.readouterr().err.endswith(f": {given} is inside the training workdir {run}; give --workdir "
                                                f"{run}\n")
        assert figures.enclosing_run(f"run_{name}/checkpoints") == f"run_{name}"
    assert figures.enclosing_run("runs/x3") is None and figures.enclosing_run(str(tmp_path / "checkpoints")) is None


def _as_tensorboard_shows(logdir):
    """{loader: {tag: {step: value}}} (a scalar's value, an image's PNG bytes) as TensorBoard's two loaders keep the
    event files of `logdir`, read in name order: "python" (`--load_fast=false`: a SessionLog START drops every tag's
    values from its step on) and "rust" (RustBoard, the default: it reads no START; a value at step s drops its own
    tag's values from s on)."""
    import struct

    from tensorboardX.proto import event_pb2

    shown = {"python": {}, "rust": {}}
    for name in sorted(n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")):
        data, offset = (logdir / name).read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in shown["python"].values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                payload = value.simple_value if value.HasField("simple_value") else value.image.encoded_image_string
                shown["python"].setdefault(value.tag, {})[event.step] = payload
                values = shown["rust"].setdefault(value.tag, {})
                for step in [s for s in values if s >= event.step]:
                    del values[step]
                values[event.step] = payload
    return shown


def test_tensorboards_default_loader_shows_no_point_of_the_steps_a_resumed_run_trains_again(tmp_path):
    """A run validated (PSNR and image strips) at steps 3, 6, 9 and died after its checkpoint of step 7; its rerun
    stopped before logging (a NaN, a second crash). TensorBoard's default loader (RustBoard) reads no SessionLog START
    (the purge_step of the rerun's file, which `--load_fast=false` and read_scalars honour): it kept showing the
    dead trajectory's points at steps 8, 9 and 10 (validation ones until the next validation, train ones until the
    next log; here for good). The rerun's file now rewrites the values from the last step up to 7 of each such tag
    after its START, as they were: both loaders show the same points, none past 7, until the rerun logs its own."""
    from PIL import Image

    from rnan_jax import scalars, summary

    log = tmp_path / "tensorboard"

    def strip(step):
        return np.full((4, 8, 3), step * 20, np.uint8)

    def begun(run):  # a run's files named as if begun at second `run` (tensorboardX names them by the second)
        for name in os.listdir(log):
            prefix, _, rest = name.partition(".out.tfevents.")
            if rest and not rest.startswith("000000000"):
                os.rename(log / name, log / f"{prefix}.out.tfevents.{run:010d}.{rest.split('.', 1)[1]}")

    first = summary.Writer(str(log), resumed_from=0)
    for s in range(1, 11):
        if s % 2 == 0:
            first.scalars(s, {"train/loss": 1.0 / s})
        if s % 3 == 0:
            first.scalars(s, {"val/psnr": 30.0 + s})
            first.images(s, {"val/pic": strip(s)})
    first.close()
    begun(1)
    expected = {"train/loss": {2: 0.5, 4: 0.25, 6: 1 / 6}, "val/psnr": {3: 33.0, 6: 36.0}}

    def check(extra):
        shown = _as_tensorboard_shows(log)
        for loader in ("python", "rust"):
            values = {tag: {s: round(v, 5) for s, v in shown[loader][tag].items()} for tag in expected}
            assert values == {tag: {s: round(v, 5) for s, v in {**expected[tag], **extra.get(tag, {})}.items()}
                              for tag in expected}, loader
            images = {s: np.asarray(Image.open(io.BytesIO(png))) for s, png in shown[loader]["val/pic"].items()}
            assert sorted(images) == sorted({3, 6, *extra.get("val/pic", ())}), loader
            for s, image in images.items():
                np.testing.assert_array_equal(image, strip(extra.get("val/pic", {}).get(s, s)))

    summary.Writer(str(log), resumed_from=7).close()  # the rerun, stopped before its first log
    begun(2)
    check({})
    began = time.time()
    rerun = summary.Writer(str(log), resumed_from=7)
    rerun.scalars(8, {"train/loss": 0.75})
    rerun.scalars(9, {"val/psnr": 40.0})
    rerun.images(9, {"val/pic": strip(11)})  # not the dead run's
    rerun.close()
    begun(3)
    check({"train/loss": {8: 0.75}, "val/psnr": {9: 40.0}, "val/pic": {9: 11}})
    run = scalars.read_scalars(str(log))  # the values the stopped rerun wrote again are not a session of its own
    assert {s: round(v, 5) for s, (v, _) in run["val/psnr"].items()} == {3: 33.0, 6: 36.0, 9: 40.0}
    assert len(run.sessions) == 2 and run.sessions[0][1] < began <= run.sessions[1][0]


def test_a_resume_over_files_of_a_version_without_start_writes_each_step_again_once(tmp_path):
    """Files of a version that wrote no START hold a step trained twice (run 2 resumed from 50 and logged 60
    again). `summary._replay` wrote both values of step 60 again, and `read_scalars` took the dead run's copy (a day
    earlier) for a value of the new session: a run of 96,022,512 s in the timing table, or a made-up session."""
    from tensorboardX import SummaryWriter

    from rnan_jax import scalars, summary

    day, t0 = 86400.0, 1.7e9
    for run, first, last, psnr in ((1, 10, 60, 30.0), (2, 60, 100, 31.0)):
        w = SummaryWriter(str(tmp_path), filename_suffix="")
        for s in range(first, last + 1, 10):
            w.add_scalar("train/loss", run / s, s, walltime=t0 + (run - 1) * day + s)
        w.add_scalar("val/psnr", psnr, last if run == 2 else 50, walltime=t0 + (run - 1) * day + last)
        w.close()
        time.sleep(1.1)  # tensorboardX names a file by its second
    purge, replay = summary._replay(str(tmp_path), 80)
    assert purge == 50  # val/psnr's last value up to 80 (its value at 100 is stale)
    assert [(v.tag, s, round(v.simple_value, 5)) for _, s, v in replay] == [
        ("train/loss", 50, round(1 / 50, 5)), ("val/psnr", 50, 30.0), ("train/loss", 60, round(2 / 60, 5)),
        ("train/loss", 70, round(2 / 70, 5)), ("train/loss", 80, round(2 / 80, 5))]  # step 60 once: run 2's
    summary.Writer(str(tmp_path), resumed_from=80).close()  # a rerun that stops before its first log
    read = scalars.read_scalars(str(tmp_path))
    assert [(a - t0, b - t0) for a, b in read.sessions] == [(10.0, 60.0), (day + 60, day + 100)]
    assert read["train/loss"][60][0] == pytest.approx(2 / 60) and 90 not in read["train/loss"]


def test_parameter_table_counts_each_modules_parameters_and_the_total():
    """The table the run log begins with: each top-level module's parameter count (the product of its arrays'
    shapes, summed) and the total, as the model's own count."""
    from rnan_jax import summary
    from rnan_jax.api import count_params

    params = {"head": {"kernel": np.zeros((3, 3, 3, 8)), "bias": np.zeros(8)},
              "groups": {"a": {"kernel": np.zeros((2, 5))}, "b": np.zeros(7)}, "tail": {"bias": np.zeros(1000)}}
    assert summary.parameter_table(params).splitlines() == [
        "module    parameters", "groups            17", "head             224", "tail           1,000",
        "total          1,241"]
    tiny = init(jax.random.key(0), RNANConfig(scale=2, features=16, num_groups=1, num_blocks=1))
    last = summary.parameter_table(tiny).splitlines()[-1]
    assert last.split() == ["total", f"{count_params(tiny):,}"] and count_params(tiny) == sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tiny))


def test_log_line_gives_each_number_of_the_step():
    """The trainer's line: loss, lr, gradient norm, steps/s, patches/s and the ETA as h:mm:ss."""
    from rnan_jax import summary

    metrics = {"loss": 0.0123456, "lr": 1e-4, "grad_norm": 0.5, "steps_per_s": 2.5, "patches_per_s": 40.0,
               "eta_s": 3725.9, "skipped": 2.0}
    assert summary.log_line(5, 100, metrics) == (
        "step 5/100  loss 0.01235  lr 0.0001  grad_norm 0.5  2.50 steps/s  40.0 patches/s  ETA 1:02:05  skipped 2")
    assert summary.eta(90061.0) == "1 day, 1:01:01" and summary.eta(float("inf")) == "?"


def test_comparison_strip_is_the_centre_crop_of_lr_bicubic_sr_hr_in_that_order():
    """The validation image strip: LR (nearest-upscaled) | bicubic | SR | HR, the same centre crop of each."""
    from rnan_jax import summary

    h, w = 300, 400
    panels = [np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(4)]
    for p in panels:
        p[:, :, 0] = np.arange(h)[:, None] % 256
        p[:, :, 1] = np.arange(w)[None, :] % 256
    strip = summary.comparison_strip(*panels, max_side=256)
    assert strip.shape == (256, 4 * 256, 3)
    for i, p in enumerate(panels):
        np.testing.assert_array_equal(strip[:, 256 * i:256 * (i + 1)], p[22:278, 72:328])
    assert [int(strip[0, 256 * i, 2]) for i in range(4)] == [10, 20, 30, 40]
    small = summary.comparison_strip(*[p[:20, :30] for p in panels])  # smaller than max_side: whole
    np.testing.assert_array_equal(small, np.concatenate([p[:20, :30] for p in panels], axis=1))


def test_a_resumed_url_run_keeps_its_own_values_across_the_event_files_its_images_end(tmp_path, monkeypatch):
    """A URL logdir's writes of images each end an event file; only a resumed run's first file begins with the
    START that drops the steps trained again. Had each file begun with it, the resumed run's own values logged
    before its first images (step 3 here) would be dropped by its second file."""
    from rnan_jax import scalars, summary

    remote = tmp_path / "bucket" / "tensorboard"  # a local folder taken for a URL: epath writes it alike
    monkeypatch.setattr(summary.paths, "is_url", lambda p: str(p).startswith(str(tmp_path / "bucket")))
    remote.mkdir(parents=True)
    writer = summary.Writer(str(remote))
    for s in (1, 2, 3, 4):
        writer.scalars(s, {"train/loss": 1.0 * s})
    writer.close()
    began = int(time.time())  # tensorboardX names a file by its second: the rerun's is another second's, as ever
    while int(time.time()) == began:
        time.sleep(0.05)
    writer = summary.Writer(str(remote), resumed_from=2)  # killed after its step-2 checkpoint: 3 and 4 again
    writer.scalars(3, {"train/loss": 30.0})
    writer.images(3, {"val/strip": np.zeros((4, 16, 3), np.uint8)})
    writer.scalars(4, {"train/loss": 40.0})
    writer.images(4, {"val/strip": np.zeros((4, 16, 3), np.uint8)})
    writer.close()
    run = scalars.read_scalars(str(remote))
    assert {s: v for s, (v, _) in run["train/loss"].items()} == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    assert len(run.sessions) == 2
    lines = [json.loads(line) for line in (remote / summary.METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r.get("train/loss", r.get("resumed"))) for r in lines] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (2, True), (3, 30.0), (4, 40.0)]


def test_comparison_table_gives_each_runs_loss_and_validation_psnr_per_step_and_its_time():
    """tools/compare_dtypes.py's table: per step, each run's train loss and validation PSNR (not its bicubic's),
    an empty cell where a run logged none; then each run's time from its first to its last logged value, of any
    tag (its last validation included), and the bicubic PSNR of its validation set."""
    from rnan_jax import scalars

    runs = {"float32": {"train/loss": {1: (0.5, 100.0), 2: (0.25, 110.0)}, "val/psnr": {2: (30.12345, 130.0)},
                        "val/bicubic_psnr": {2: (28.0, 130.0)}},
            "bfloat16": {"train/loss": {1: (0.6, 200.0), 3: (0.3, 260.0)}, "val/psnr": {3: (29.5, 300.0)},
                         "val/bicubic_psnr": {3: (28.0, 300.0)}}}
    assert scalars.comparison_table(runs).splitlines() == [
        "| step | loss float32 | loss bfloat16 | val PSNR float32 | val PSNR bfloat16 |",
        "| --- | --- | --- | --- | --- |",
        "| 1 | 0.50000 | 0.60000 |  |  |",
        "| 2 | 0.25000 |  | 30.123 |  |",
        "| 3 |  | 0.30000 |  | 29.500 |",
        "",
        "float32: 30 s from the first to the last logged value, bicubic 28.000 dB",
        "bfloat16: 100 s from the first to the last logged value, bicubic 28.000 dB"]


def test_kernel_categories_put_a_kernel_under_the_first_rule_that_matches_it():
    """KERNEL_CATEGORIES: first match wins (a cutlass GEMM whose name also says convert is a 1x1 convolution's)."""
    from rnan_jax import profiling

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
    events += [{"ph": "X", "pid": 1, "tid": 7, "name": n, "dur": d}
               for n, d in (("cutlass_80_tensorop_bf16_s16816gemm_convert_64x64", 400.0),
                            ("loop_convert_fusion", 100.0), ("MemcpyD2D_convert", 200.0))]
    got = profiling.kernel_categories({"traceEvents": events}, steps=4)
    assert {k: v["ms_per_step"] for k, v in got.items() if v["kernels_per_step"]} == {
        "1x1 and depthwise convolutions": 0.1, "device-to-device copies": 0.05, "dtype converts": 0.025}


def test_memory_analysis_peak_counts_a_donated_argument_and_the_output_it_becomes_once():
    """peak_bytes: arguments + outputs + temporaries - donated aliases. x * 2 + y with x donated: the output is
    written into x's buffer, so the peak is the two f32[256] arguments (2 KiB), not 3 KiB."""
    import jax.numpy as jnp

    from rnan_jax import profiling

    compiled = jax.jit(lambda x, y: x * 2 + y, donate_argnums=0).lower(jnp.ones(256), jnp.ones(256)).compile()
    got = profiling.memory_analysis(compiled)
    assert (got["argument_size_in_bytes"], got["output_size_in_bytes"], got["alias_size_in_bytes"]) == (
        2048, 1024, 1024)
    assert got["peak_bytes"] == 2 * 256 * 4 + got["temp_size_in_bytes"]


def test_hlo_stats_counts_a_loop_of_unknown_trip_count_once():
    """A while loop whose trip count XLA does not know: its body counted once per step (its condition twice), and
    the loop counted among the unknown ones; with the count known (10), 10 bodies and 11 conditions."""
    from rnan_jax import profiling
    from test_benchmark import HLO

    known = ', backend_config={"known_trip_count":{"n":"10"}}'
    assert known in HLO
    s = profiling.hlo_stats(HLO.replace(known, ""))
    # ENTRY: the convolution; the body: fusion, fusion-start, fusion-done, custom-call, add; the condition: compare
    assert (s["static"], s["per_step"], s["unknown_trip_counts"], s["while_loops"]) == (7, 1 + 5 + 2, 1, 1)
    assert profiling.hlo_stats(HLO)["per_step"] == 1 + 5 * 10 + 11


def test_compare_dtypes_trains_each_run_in_its_own_dtype_and_folder(tmp_path):
    """Each --dtypes value is the compute dtype (`model.dtype`) of its own run, in WORKDIR/<dtype>."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = os.path.join(repo, "tools", "compare_dtypes.py")
    driver = ("import runpy, sys\nfrom rnan_jax import trainer\n"
              "trainer.train_and_evaluate = lambda config, workdir: print('TRAIN', config.model.dtype, workdir, "
              "flush=True)\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", driver, tool, f"--config={repo}/experiments/demo.py",
                        f"--workdir={tmp_path}", "--dtypes=bfloat16,float32"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert [line for line in r.stdout.splitlines() if line.startswith("TRAIN")] == [
        f"TRAIN bfloat16 {tmp_path / 'bfloat16'}", f"TRAIN float32 {tmp_path / 'float32'}"], r.stdout + r.stderr
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: no run logged a value to compare (each one's reason is above)")


def test_tiling_bound_lists_the_three_worst_images_and_their_scores_and_takes_the_budget_in_gib(tmp_path):
    """The scan's table: the three images whose tiled output differs most from the whole (lowest uint8 PSNR first),
    each with the Y-PSNR against HR of its whole and of its tiled output; part 2's budget: --budget_gib GiB."""
    from PIL import Image

    from rnan_jax import tiling
    from test_tiling import _photo, _table_rows, _tiling_bound

    hr_dir = tmp_path / "benchmark" / "Mine" / "HR"
    hr_dir.mkdir(parents=True)
    shapes = {"a": (96, 88), "b": (100, 120), "c": (80, 140), "d": (130, 70)}
    for name, shape in shapes.items():
        Image.fromarray(_photo(*shape)).save(hr_dir / f"{name}.png")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(repo, "workdirs", "demo")):
        pytest.skip("the demo run is there: the tool measures its weights, not the init weights computed here")
    proc = _tiling_bound(tmp_path, f"--data_dir={tmp_path}", "--images=Mine/a", "--tiles=32", "--overlaps=16",
                         "--sets=Mine", "--scan_tile=32", "--sizes=8", "--budget_gib=1.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BUDGET 1610612736.0" in proc.stdout.splitlines()
    config = RNANConfig(scale=2, features=32, num_groups=2, num_blocks=3)  # the tool's DEMO, its init weights
    params = init(jax.random.key(0), config)
    want = {name: tiling.tiling_rows(params, config, _photo(*shape), [32], [16])[0] for name, shape in shapes.items()}
    worst = sorted(want, key=lambda n: want[n]["uint8_psnr"])[:3]
    rows = [r for r in _table_rows(proc.stdout) if r[0].startswith("Mine/")]  # not part 2's
    assert rows[0][0] == "Mine/a" and [r[0] for r in rows[1:]] == [f"Mine/{n}" for n in worst]
    for r in rows[1:]:
        w = want[r[0].split("/")[1]]
        assert r[5:] == [f"{w['uint8_psnr']:.1f}", str(w["max_levels"]),
                         f"{w['hr_whole']:.4f} / {w['hr_tiled']:.4f}"]


def test_data_throughput_prints_the_median_rate_of_the_repeats_and_batches_per_second(tmp_path):
    """Per worker count: the median first-batch time and patch rate of --repeats runs, the rate in batches/s
    (patches/s / --batch_size) and the runs' range."""
    from test_tiling import _run_tool

    proc = _run_tool(tmp_path, "data_throughput.py", "from rnan_jax import bench\n"
                     "runs = iter([(0.5, 100.0), (0.9, 400.0), (0.6, 130.0)])\n"
                     "bench.data_throughput = lambda cfg, batches, warmup, batch: next(runs)\n",
                     "--source=demo", "--scale=2", "--workers=0", "--repeats=3", "--batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == "workers=0: first batch after 0.60 s, 130 patches/s (32.5 batches/s; runs 100..400)", lines
    # 4 LR patches of 48 x 48 x 3 and their x2 HR: 138,240 bytes
    assert lines[2].startswith("one batch: 0.13 MiB as uint8, 0.53 MiB as float32; "), lines


def test_a_url_run_log_takes_a_line_with_a_byte_that_is_not_utf_8(tmp_path, monkeypatch):
    """RunLog writes a name's byte that is not UTF-8 (a Latin-1 file name in a warning or the command: a surrogate
    in Python) as it is. On a URL workdir the copy there raised "surrogates not allowed" and stopped the run at its
    first line; a resumed run's read of a log with such a byte (a local run's log copied there) raised a
    UnicodeDecodeError. The copy has the byte as an escape; the resumed run keeps the lines before it."""
    from rnan_jax import summary

    remote = tmp_path / "bucket"  # a local folder taken for a URL: epath writes it alike
    monkeypatch.setattr(summary.paths, "is_url", lambda p: str(p).startswith(str(remote)))
    remote.mkdir()
    (remote / "train.log").write_bytes(b"2025-01-01 00:00:00  skipped caf\xe9.png\n")  # a local run's, copied
    with summary.RunLog(str(remote / "train.log")) as log:
        log.write("started: train.py --config.data.hr_dirs=" + os.fsdecode(b"/data/caf\xe9"))
    lines = (remote / "train.log").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "2025-01-01 00:00:00  skipped caf\\xe9.png"
    assert lines[1][21:] == "started: train.py --config.data.hr_dirs=/data/caf\\xe9" and len(lines) == 2
