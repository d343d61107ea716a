"""rnan_jax.cli.run: what every command-line entry point does with a misuse and with Ctrl-C."""
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from rnan_jax import cli


def _run(main, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/somewhere/rnan_jax/upscale.py"])
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    return e.value.code, capsys.readouterr().err


def test_ctrl_c_ends_in_one_line_with_status_130(monkeypatch, capsys):
    def main(argv):
        raise KeyboardInterrupt

    assert _run(main, monkeypatch, capsys) == (130, "\nupscale: interrupted\n")


def test_a_usage_error_is_one_line_naming_the_program(monkeypatch, capsys):
    def main(argv):
        raise app.UsageError("--overlap (8) must be smaller than --tile (8)")

    code, err = _run(main, monkeypatch, capsys)
    assert (code, err) == ("upscale: error: --overlap (8) must be smaller than --tile (8) (see --helpshort)", "")


_BAD_FLAGS = [
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.batch_size=abc"],
     "train: error: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc' (see --helpshort)"),
    (["-m", "rnan_jax.evaluate", "--checkpont", "zoo:small_x2"],
     "evaluate: error: Unknown command line flag 'checkpont'. Did you mean: checkpoint ? (see --helpshort)"),
    (["-m", "rnan_jax.evaluate", "--checkpoint", "zoo:small_x2", "--datasets="],
     "evaluate: error: --datasets names no set (e.g. Set5,Set14,B100,Urban100) (see --helpshort)"),
    (["-m", "rnan_jax.upscale", "--checkpoint", "zoo:small_x2", "photo.png"],
     "upscale: error: --output is required (see --helpshort)"),
    (["-m", "rnan_jax.train"], "train: error: --config and --workdir are required (see --helpshort)"),
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir=", "--dry_run"],  # a run wrote into "."
     "train: error: --workdir is empty: name the run's folder (--workdir=. for the current one) (see --helpshort)"),
    (["tools/benchmark.py", "--dtypes=float64"],
     "benchmark: error: flag --dtypes=['float64']: each value must be float32, bfloat16 or float16 (see --helpshort)"),
    (["tools/tiling_bound.py", "--overlaps=8,-3"],
     "tiling_bound: error: flag --overlaps=['8', '-3']: each value must be an integer of at least 0 (see --helpshort)"),
    (["tools/data_throughput.py", "--workers=a"],
     "data_throughput: error: flag --workers=['a']: each value must be an integer of at least 0 (see --helpshort)"),
]


@pytest.mark.parametrize("args,line", _BAD_FLAGS, ids=[a[1] if a[0] == "-m" else a[0] for a, _ in _BAD_FLAGS])
def test_a_malformed_or_unknown_flag_is_one_line_before_any_work(args, line, tmp_path):
    """absl's own flag errors (a value that does not parse, an unknown flag) and the tools' list flags: one line,
    exit status 1, nothing written (absl printed "FATAL Flags parsing error:" and a second line; the tools'
    int() of a list value raised a traceback mid-run)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, *[a.format(tmp=tmp_path) for a in args]], cwd=repo, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [x for x in r.stderr.splitlines() if "libtpu" not in x]
    assert (r.returncode, lines) == (1, [line]), r.stderr[-2000:]
    assert not os.listdir(tmp_path)


def test_output_flags_expand_home_and_refuse_a_url(tmp_path):
    """upscale, evaluate and figures write local files: --output=~/x (a ~ that no shell expands after "=") is the
    home folder's x, and a gs:// URL is refused in one line before any work. Both made folders named "~" and
    "gs:" in the current one, and the run then reported its images or scores written to the bucket."""
    from PIL import Image

    home, work, hr = tmp_path / "home", tmp_path / "work", tmp_path / "Tiny" / "HR"
    for folder in (home, work, hr):
        folder.mkdir(parents=True)
    Image.fromarray((np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3)).save(hr / "a.png")
    env = {**os.environ, "HOME": str(home), "JAX_PLATFORMS": "cpu"}

    def run(module, *args):
        r = subprocess.run([sys.executable, "-m", module, *args], cwd=work, capture_output=True, text=True,
                           timeout=300, env=env)
        return r.returncode, [x for x in r.stderr.splitlines() if "libtpu" not in x]

    why = "a URL, but this command writes local files only (write them here, then copy them, e.g. gcloud storage cp -r)"
    bicubic = ["--method", "bicubic", "--datasets", str(hr.parent), "--scales", "2"]
    assert run("rnan_jax.upscale", "--checkpoint", "zoo:small_x2", str(hr / "a.png"), "--output=gs://b/sr") == (
        1, [f"upscale: error: flag --output=gs://b/sr: {why} (see --helpshort)"])
    assert run("rnan_jax.evaluate", *bicubic, "--output=gs://b/ev") == (
        1, [f"evaluate: error: flag --output=gs://b/ev: {why} (see --helpshort)"])
    assert run("rnan_jax.figures", "curve", "--workdir", str(work), "--output=gs://b/c.png") == (
        1, [f"figures: --output gs://b/c.png: {why}"])
    assert run("rnan_jax.upscale", "--checkpoint", "zoo:small_x2", str(hr / "a.png"), "--output=~/sr")[0] == 0
    assert run("rnan_jax.evaluate", *bicubic, "--output=~/ev")[0] == 0
    assert {"ev", "sr"} <= set(os.listdir(home))
    assert os.listdir(home / "sr") == ["a_x2.png"] and "results.json" in os.listdir(home / "ev")
    assert not os.listdir(work)
