"""The MODEL_ZOO.md pictures: a training curve from metrics.jsonl and Figure 3-style crops."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from rnan_jax import RNANConfig, figures, init
from rnan_jax.upscalers import bicubic_upscaler, model_upscaler

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
               "--output", str(tmp_path / "c.png")], "figures: --box takes x,y,size (integers), got '1,2,x'"))
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
