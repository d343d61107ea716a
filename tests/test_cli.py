"""rnan_jax.cli.run: what every command-line entry point does with a misuse and with Ctrl-C."""
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from rnan_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _home_caches():
    """This HOME's XLA and native-kernel caches, for a subprocess given another HOME: without them each such run built
    the native kernels anew (about 6 s) and compiled cold; the ~ that the test reads still is the other HOME."""
    from rnan_jax import env, native

    return {variable: env.cache_folder(name, variable)
            for name, variable in (("xla", "RNAN_JAX_CACHE"), ("native", native.NATIVE_CACHE_ENV))}


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
    # --output=$OUT with OUT unset: evaluate scored every image, then wrote no report without a word
    (["-m", "rnan_jax.evaluate", "--method", "bicubic", "--datasets", "Set5", "--scales", "2", "--output="],
     "evaluate: error: flag --output=: empty (an unset variable?): name where to write (. is the current folder) "
     "(see --helpshort)"),
    (["-m", "rnan_jax.train"], "train: error: --config and --workdir are required (see --helpshort)"),
    # absl's and ml_collections' boolean parsers: "('Non-boolean argument to boolean flag', 'yes')"
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.data.augment=yes"],
     "train: error: flag --config.data.augment=yes: 'yes' is not a boolean (true, false, 1 or 0) (see --helpshort)"),
    (["-m", "rnan_jax.evaluate", "--method", "bicubic", "--progress=no"],
     "evaluate: error: flag --progress=no: 'no' is not a boolean (true, false, 1 or 0) (see --helpshort)"),
    # a key of another section named at the top level: no suggestion (lr), or a wrong one (patch_size: "batch_size")
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.lr=1e-3"],
     "error: --config.lr: the config has no key 'lr'; did you mean --config.optim.lr? (python -m rnan_jax.train "
     "--config FILE --dry_run lists every key)"),
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.patch_size=32"],
     "error: --config.patch_size: the config has no key 'patch_size'; did you mean --config.data.patch_size? "
     "(python -m rnan_jax.train --config FILE --dry_run lists every key)"),
    # the override named is the one at fault, not an earlier valid one whose name holds the missing key
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.model.scale=3",
      "--config.model.scal=4"],
     "error: --config.model.scal: the config has no key 'scal'; did you mean \"scale\" instead of \"scal\"? (python -m "
     "rnan_jax.train --config FILE --dry_run lists every key)"),
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.data.val_set=Set5",
      "--config.val_set=Set14"],
     "error: --config.val_set: the config has no key 'val_set'; did you mean --config.data.val_set? (python -m "
     "rnan_jax.train --config FILE --dry_run lists every key)"),
    # a path on past a value: "the config has no key 'Attribute'; <class 'float'>.value does not exist ...", and an
    # index into a tuple told as the config file's own failure ("--config experiments/demo.py: IndexError: ...")
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run", "--config.optim.lr.value=1"],
     "error: --config.optim.lr.value: optim.lr is a value, not a section or a list to index: set it whole "
     "(--config.optim.lr=VALUE; python -m rnan_jax.train --config FILE --dry_run lists every key)"),
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--workdir", "{tmp}/run",
      "--config.model.rgb_mean[0]=0.5"],
     "error: --config.model.rgb_mean[0]: model.rgb_mean is a value, not a section or a list to index: set it whole "
     "(--config.model.rgb_mean=VALUE; python -m rnan_jax.train --config FILE --dry_run lists every key)"),
    # two configs: absl kept the last without a word (this dry run printed x4.py's config)
    (["-m", "rnan_jax.train", "--config", "experiments/demo.py", "--config=experiments/x4.py", "--workdir",
      "{tmp}/run", "--dry_run"],
     "error: --config names 2 configs (experiments/demo.py and experiments/x4.py), of which only the last would be "
     "read: give one, and change its keys with --config.KEY=VALUE"),
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
    env = {**os.environ, "HOME": str(home), "JAX_PLATFORMS": "cpu", **_home_caches()}

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


def _train(args, cwd, **env):
    r = subprocess.run([sys.executable, "-m", "rnan_jax.train", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    return r.returncode, [x for x in r.stderr.splitlines() if "libtpu" not in x], r.stdout


def test_a_config_file_whose_get_config_raises_a_type_or_value_error_is_one_line(tmp_path):
    """ml_collections re-raises get_config's TypeError/ValueError with its whole traceback as the text, which absl
    put in one 1,000-character "flag --config=...: Error whilst parsing config file: Traceback ..." line (a float
    for an int key, FILE:ARG with an ARG that does not parse, a get_config that takes an ARG not given); and a
    get_config without its return statement was "--config is required" after two absl log lines."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = "from rnan_jax import configs\ndef get_config({}):\n    c = configs.default_config()\n"
    files = {
        "float.py": head.format("") + "    c.batch_size = 16.0\n    return c\n",
        "value.py": head.format("") + "    raise ValueError('no such scale')\n",
        "arg.py": head.format("arg") + "    c.model.scale = int(arg)\n    return c\n",
        "none.py": head.format(""),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    workdir = tmp_path / "run"
    cases = [
        ("float.py", "float.py, line 4: TypeError: Could not override field 'batch_size' (reference). 16.0 is of "
                     "original type <class 'float'> and cannot be casted to type <class 'int'>"),
        ("value.py", "value.py, line 4: ValueError: no such scale"),
        ("arg.py:x4", "arg.py, line 4: ValueError: invalid literal for int() with base 10: 'x4'"),
        ("arg.py", "arg.py: TypeError: get_config() missing 1 required positional argument: 'arg' (--config "
                   "FILE:ARG passes ARG to get_config; FILE alone passes nothing)"),
        ("none.py", "none.py: get_config() returned None (no return statement?)"),
    ]
    for config, line in cases:
        assert _train(["--config", config, "--workdir", str(workdir), "--dry_run"], tmp_path)[:2] == (
            1, [f"error: --config {line}"]), config
    code, err, out = _train(["--config", "arg.py:3", "--workdir", str(workdir), "--dry_run"], tmp_path)
    assert code == 0 and "model: RNAN x3, 17,340,677 parameters" in out, err
    code, err, _ = _train(["--config", os.path.join(repo, "experiments", "x4.py") + ":3", "--workdir", str(workdir)],
                          tmp_path)
    assert (code, err) == (1, [f"error: --config {repo}/experiments/x4.py: TypeError: get_config() takes 0 positional "
                               "arguments but 1 was given (--config FILE:ARG passes ARG to get_config; FILE alone "
                               "passes nothing)"])
    assert not workdir.exists()


def test_dry_run_resolves_the_workdir_as_the_run_does(tmp_path):
    """--workdir=~/run (a ~ that no shell expands after "=") is the home folder's run for the training; the dry run
    looked for ./~/run and said "not created yet; a run creates it" of a workdir the run would resume."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    home = tmp_path / "home"
    (home / "run" / "checkpoints" / "40" / "params").mkdir(parents=True)
    code, err, out = _train(["--config", "experiments/demo.py", "--workdir=~/run", "--dry_run"], repo, HOME=str(home),
                            **_home_caches())
    assert code == 0, err
    assert out.splitlines()[-1] == (f"workdir: {home}/run (exists; the run resumes from its step 40); dry run: nothing "
                                    "read or written")
    assert sorted(os.listdir(home / "run")) == ["checkpoints"]


@pytest.mark.parametrize("module,line", [
    ("rnan_jax.upscale", "  --output: Folder for the upscaled images (created)."),
    ("rnan_jax.evaluate", "  --output: Write results.json, results.md and per_image.csv here."),
])
def test_help_lists_the_output_flag(module, line):
    """`--output` (cli.define_local_output) was counted as rnan_jax.cli's flag, so --help, which lists the command's
    own, left it out: upscale's help did not name the flag that it requires."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and line in r.stdout.splitlines(), r.stdout[-3000:]


def test_a_config_path_after_equals_has_its_home_expanded(tmp_path):
    """--config=~/exp.py (a ~ that no shell expands after "=") is the home folder's exp.py, as --workdir=~/run is
    the home folder's run; it was "error: --config: [Errno 2] No such file or directory: '~/exp.py'"."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    home = tmp_path / "home"
    home.mkdir()
    (home / "exp.py").write_text(open(os.path.join(repo, "experiments", "demo.py")).read())
    code, err, out = _train(["--config=~/exp.py", "--config.model.scale=3", "--workdir", str(tmp_path / "run"),
                             "--dry_run"], repo, HOME=str(home), **_home_caches())
    assert code == 0 and "model: RNAN x3, 240,657 parameters" in out.splitlines(), err


@pytest.mark.parametrize("module", ["rnan_jax.train", "rnan_jax.upscale"])
def test_dash_h_prints_the_help_as_help_does(module):
    """-h was "train: error: Unknown command line flag 'h' (see --helpshort)" (absl knows only -?)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    h, helped = (subprocess.run([sys.executable, "-m", module, flag], cwd=repo, capture_output=True, text=True,
                                timeout=300, env=env) for flag in ("-h", "--help"))
    assert (h.returncode, h.stderr) == (0, ""), h.stderr[-3000:]
    assert h.stdout == helped.stdout and f"--{'workdir' if module.endswith('train') else 'output'}:" in h.stdout
    # -h as a flag's value stays the value: a folder named -h, not the help
    r = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--output", "-h"], cwd=repo, capture_output=True,
                       text=True, timeout=300, env=env)
    assert (r.returncode, r.stderr.strip()) == (1, "upscale: error: --checkpoint is required (see --helpshort)")


def test_help_into_a_closed_pipe_is_no_error():
    """`train --help | head -1`: the reader gone, it printed "error: --config: [Errno 32] Broken pipe" (train) or
    a traceback (the tools)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for args in (["-m", "rnan_jax.train", "--help"], [os.path.join(repo, "tools", "benchmark.py"), "-h"]):
        proc = subprocess.Popen([sys.executable, *args], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        proc.stdout.close()  # before the child has written anything
        err = proc.stderr.read().decode()
        assert (proc.wait(timeout=300), err) == (0, ""), err[-3000:]


def test_list_keys_given_in_python_list_syntax_are_the_comma_separated_list(tmp_path):
    """--config.data.hr_dirs=['/a','/b'] (Python's list syntax, as people type list-valued fields) was kept as that
    text and split at its commas: the run stopped with "['/a': no such folder", and val_set=['Set5','Set14'] looked
    for the set "['Set5'". The dry run (and config.json) show the list the run reads."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    a, b = tmp_path / "a", tmp_path / "b"
    code, err, out = _train(["--config", "experiments/demo.py", "--workdir", str(tmp_path / "run"), "--dry_run",
                             "--config.data.source=folder", f"--config.data.hr_dirs=['{a}', '{b}']",
                             f"--config.data.lr_dirs=[{a},{b}]", "--config.data.val_source=benchmark",
                             "--config.data.val_set=['Set5','Set14']", "--config.optim.schedule=step",
                             "--config.optim.milestones=[100,200]"], repo)
    assert code == 0, err
    lines = out.splitlines()
    assert f"  data.hr_dirs = '{a},{b}'" in lines and f"  data.lr_dirs = '{a},{b}'" in lines, out
    assert "  data.val_set = 'Set5,Set14'" in lines and "  optim.milestones = '100,200'" in lines, out


def test_a_stop_now_ends_the_process_without_waiting_for_threads_it_left():
    """The trainer's second Ctrl-C abandons the checkpoint saves in flight (cli.StopNow): the interpreter's exit
    joined their threads, and a run that had printed its last line was once seen waiting there until killed."""
    script = ("import sys, threading, time\nfrom rnan_jax import cli\n"
              "def main(argv):\n"
              "    threading.Thread(target=time.sleep, args=(600,)).start()  # a save thread that never ends\n"
              "    raise cli.StopNow('stopped without a checkpoint')\n"
              "sys.argv = ['prog']\ncli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "prog: interrupted: stopped without a checkpoint"


def test_compare_dtypes_stopped_by_sigterm_exits_as_train_does_without_a_traceback(tmp_path):
    """The trainer raises preemption.Preempted after SIGTERM's (or Ctrl-C's) checkpoint; train exits with 143 (130)
    and its message, but tools/compare_dtypes.py let it through: a 20-line traceback, exit status 1."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import runpy, sys\nfrom rnan_jax import preemption, trainer\n"
              "def preempted(config, workdir):\n"
              "    raise preemption.Preempted(f'SIGTERM: saved a checkpoint at step 7 in {workdir}', 15)\n"
              "trainer.train_and_evaluate = preempted\n"
              f"sys.argv = ['tools/compare_dtypes.py', '--config=experiments/demo.py', '--workdir={tmp_path}']\n"
              "runpy.run_path('tools/compare_dtypes.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stdout.splitlines()[-1]
    assert last == f"float32 stopped: SIGTERM: saved a checkpoint at step 7 in {tmp_path}/float32"


def test_compare_dtypes_refuses_an_empty_workdir_in_one_line(tmp_path):
    """--workdir=$WORKDIR with WORKDIR unset: each dtype trained into ./<dtype> of the current folder (train refuses
    an empty --workdir)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "tools", "compare_dtypes.py"),
                        f"--config={repo}/experiments/demo.py", "--workdir=", "--dtypes=float32",
                        "--config.total_steps=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [x for x in r.stderr.splitlines() if "libtpu" not in x]
    assert (r.returncode, lines) == (1, ["compare_dtypes: error: --workdir is empty: name the runs' parent folder "
                                         "(--workdir=. for the current one) (see --helpshort)"]), r.stderr[-2000:]
    assert not os.listdir(tmp_path)


def test_a_ctrl_c_while_a_stopped_run_exits_ends_it_without_a_traceback(tmp_path):
    """After SIGTERM's or Ctrl-C's checkpoint was saved, a (second) Ctrl-C landing in the interpreter's exit printed
    JAX's exit callback's traceback ("Exception ignored in atexit callback ... KeyboardInterrupt"). The run
    here is stubbed: it raises Preempted, and an exit callback receives the Ctrl-C."""
    script = ("import atexit, os, signal, sys, time\n"
              "from rnan_jax import preemption, train, trainer\n"
              "def stopped(config, workdir):\n"
              "    raise preemption.Preempted('SIGTERM: saved a checkpoint at step 3', signal.SIGTERM)\n"
              "trainer.train_and_evaluate = stopped\n"
              "def slow_cleanup():\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "atexit.register(slow_cleanup)\n"
              f"sys.argv = ['train', '--config', 'experiments/demo.py', '--workdir', {str(tmp_path / 'run')!r}]\n"
              "train.cli.run(train.main, flags_parser=train.parse_flags)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip().splitlines()[-1]) == (143, "SIGTERM: saved a checkpoint at step 3")
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr


def test_none_on_the_command_line_unsets_a_text_key(tmp_path):
    """`--config.init_from=None` was the text 'None': the dry run showed init_from = 'None' and the run stopped with
    "error: init_from: <cwd>/None: no such file or folder"; data.cache_dir=None made a folder ./None."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code, err, out = _train(["--config", "experiments/demo.py", "--workdir", str(tmp_path / "run"), "--dry_run",
                             "--config.init_from=None", "--config.data.cache_dir=None"], repo)
    assert code == 0, err
    lines = out.splitlines()
    assert "  init_from = ''" in lines and "  data.cache_dir = ''" in lines, out


def test_configs_and_overrides_in_a_flagfile_are_seen_as_on_the_command_line(tmp_path):
    """absl reads --flagfile's flags as if given in its place, but the config checks looked at argv alone: a --config
    there beside one on the command line trained the last without a word (this dry run printed x4.py's config), a
    failing config file was "--config ?" without its line, a mistyped override "a --config override"; and a flagfile
    that could not be read was a 20-line traceback (ml_collections reads it when train defines --config)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "x4.flags").write_text("--config=experiments/x4.py\n")
    (tmp_path / "bad.py").write_text("def get_config():\n    raise ValueError('boom')\n")
    (tmp_path / "bad.flags").write_text(f"--config={tmp_path}/bad.py\n")
    (tmp_path / "typo.flags").write_text("--config=experiments/demo.py\n--config.model.scal=3\n")
    workdir = ["--workdir", str(tmp_path / "run"), "--dry_run"]
    assert _train(["--config", "experiments/demo.py", f"--flagfile={tmp_path}/x4.flags", *workdir], repo)[:2] == (
        1, ["error: --config names 2 configs (experiments/demo.py and experiments/x4.py), of which only the last would "
            "be read: give one, and change its keys with --config.KEY=VALUE"])
    assert _train([f"--flagfile={tmp_path}/bad.flags", *workdir], repo)[:2] == (
        1, [f"error: --config {tmp_path}/bad.py, line 2: ValueError: boom"])
    assert _train(["--flagfile", f"{tmp_path}/typo.flags", *workdir], repo)[:2] == (
        1, ["error: --config.model.scal: the config has no key 'scal'; did you mean \"scale\" instead of \"scal\"? "
            "(python -m rnan_jax.train --config FILE --dry_run lists every key)"])
    assert _train([f"--flagfile={tmp_path}/none.flags", *workdir], repo)[:2] == (
        1, [f"train: error: ERROR:: Unable to open flagfile: [Errno 2] No such file or directory: "
            f"'{tmp_path}/none.flags' (see --helpshort)"])
    code, err, out = _train([f"--flagfile={tmp_path}/x4.flags", "--config.model.scale=3", *workdir], repo)
    assert code == 0 and "model: RNAN x3, 17,340,677 parameters" in out.splitlines(), err
    assert not (tmp_path / "run").exists()


def test_a_config_file_setting_a_number_key_to_none_is_one_line(tmp_path):
    """A config file's `config.model.num_blocks = None` (or execution.scan_unroll) was a TypeError traceback in
    train's own checks, before the one line that the conversion says for None (configs.check_nones) was reached;
    a text key's None is its unset "", in the dry run (and config.json) too."""
    head = ("from rnan_jax import configs\ndef get_config():\n    c = configs.default_config()\n"
            "    c.data.update(source='demo', val_source='demo')\n")
    (tmp_path / "blocks.py").write_text(head + "    c.model.num_blocks = None\n    return c\n")
    (tmp_path / "unroll.py").write_text(head + "    c.execution.scan_unroll = None\n    return c\n")
    (tmp_path / "text.py").write_text(head + "    c.init_from = None\n    return c\n")
    workdir = ["--workdir", str(tmp_path / "run"), "--dry_run"]
    assert _train(["--config", "blocks.py", *workdir], tmp_path)[:2] == (
        1, ["error: --config blocks.py: the config sets model.num_blocks (int, default 20) to None: give it a value "
            "of its type"])
    assert _train(["--config", "unroll.py", *workdir[:2]], tmp_path)[:2] == (
        1, ["error: --config unroll.py: the config sets execution.scan_unroll (int, default 0) to None: give it a "
            "value of its type"])
    code, err, out = _train(["--config", "text.py", *workdir], tmp_path)
    assert code == 0 and "  init_from = ''" in out.splitlines(), err
    assert not (tmp_path / "run").exists()


def _tiny_ema_run(tmp_path):
    """A run trained with EMA (checkpoint step 4) and a set Mine of one 48x40 HR image, under tmp_path: (the run's
    folder, its RNANConfig, (its parameters, their EMA))."""
    from PIL import Image
    from test_zoo import _save_steps

    from rnan_jax import RNANConfig, checkpoint

    hr_dir = tmp_path / "benchmark" / "Mine" / "HR"
    hr_dir.mkdir(parents=True)
    yy, xx = np.mgrid[0:40, 0:48] / 6.0
    hr = np.stack([np.sin(xx + c) * np.cos(yy) for c in range(3)], -1) * 100 + 128
    Image.fromarray(np.clip(hr, 0, 255).astype(np.uint8)).save(hr_dir / "pic.png")
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
    saved = _save_steps(tmp_path / "run" / checkpoint.CHECKPOINTS, {4: 1}, config)[4]
    return tmp_path / "run", config, saved


def test_tiling_bound_piped_into_head_ends_quietly(tmp_path):
    """`tools/tiling_bound.py ... | head -3` ended in a BrokenPipeError traceback (status 1) when head closed the
    pipe, and loading the checkpoint printed some 40 absl/orbax "I..." lines to stderr, which evaluate does not."""
    run = _tiny_ema_run(tmp_path)[0]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "tiling_bound.py"), "--checkpoint", str(run),
                             "--data_dir", str(tmp_path), "--images", "Mine/pic", "--tiles", "16", "--overlaps", "4",
                             "--sets", "Mine", "--per_set", "1", "--scan_tile", "16", "--sizes", "16",
                             "--budget_gib", "0.001"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # as head does after its lines; part 2 (the x4 model's compilation) still prints after
        err = proc.stderr.read()
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    assert first == f"## Tiled vs whole-image output, x2 model from {run} (ema)\n"
    assert (code, err) == (0, "")


def test_make_zoo_out_that_is_a_file_is_one_line_saying_so(tmp_path):
    """`tools/make_zoo.py --out FILE` loaded the checkpoint, then said "cannot write FILE/NAME.msgpack: [Errno 17]
    File exists: 'FILE'", which does not say that --out takes a folder."""
    run = _tiny_ema_run(tmp_path)[0]
    in_the_way = tmp_path / "zoo.msgpack"
    in_the_way.write_text("mine")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_zoo.py"), "--workdir", str(run),
                           "--name", "tiny", "--out", str(in_the_way)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode, proc.stderr.splitlines(), proc.stdout) == (
        1, [f"make_zoo: --out {in_the_way}: is a file, not a folder (--out names the folder to write tiny.msgpack "
            "into)"], "")
    assert in_the_way.read_text() == "mine"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_zoo.py"), "--workdir", str(run),
                           "--name", "tiny", "--out", str(tmp_path / "zoo")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and sorted(os.listdir(tmp_path / "zoo")) == ["sha256.json", "tiny.msgpack"], proc.stderr


def _nvidia_gpu_visible() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.has_visible_nvidia_gpu()
    except (ImportError, AttributeError):
        return True  # cannot tell: the test below would not know what to expect


@pytest.mark.skipif(_nvidia_gpu_visible(), reason="an NVIDIA GPU is visible: JAX_PLATFORMS=cuda may work here")
def test_a_jax_platforms_this_machine_lacks_is_one_line_saying_what_to_do(tmp_path):
    """JAX_PLATFORMS=cuda on a machine without an NVIDIA GPU was a 20-line traceback ending in a bare
    "AssertionError"; a mistyped platform was one ending in JAX's RuntimeError."""
    args = ["--config", "experiments/demo.py", "--workdir", str(tmp_path / "run"), "--config.total_steps=2"]
    code, err, out = _train(args, REPO, JAX_PLATFORMS="cuda")
    assert (code, err) == (1, ["error: JAX_PLATFORMS=cuda: no NVIDIA GPU is visible (or JAX's CUDA plugin is not "
                               "installed) (set JAX_PLATFORMS=cpu, or unset it, to use what is here)"]), err
    code, err, out = _train([*args, "--dry_run"], REPO, JAX_PLATFORMS="cdua")
    assert code == 1 and len(err) == 1 and err[0].startswith(
        "error: JAX_PLATFORMS=cdua: Unable to initialize backend 'cdua': "), err
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_that_lands_where_python_cannot_raise_still_interrupts_in_one_line():
    """A Ctrl-C whose handler ran inside JAX's garbage-collection callback (the trainer's set-up, the first
    compilation) printed "Exception ignored in: <function _xla_gc_callback ...>" and a traceback, and the
    KeyboardInterrupt was lost: upscale and evaluate went on; here, a __del__ does what that callback did."""
    script = ("import signal, sys, time\nfrom rnan_jax import cli\n"
              "class Collected:\n"
              "    def __del__(self):\n"
              "        signal.raise_signal(signal.SIGINT)\n"
              "        sum(range(10))\n"
              "def main(argv):\n"
              "    Collected()\n"
              "    for _ in range(200):\n"
              "        time.sleep(0.05)\n"
              "    print('finished')\n"
              "sys.argv = ['upscale']\n"
              "cli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "\nupscale: interrupted\n", "")


@pytest.mark.skipif(_nvidia_gpu_visible(), reason="an NVIDIA GPU is visible: JAX_PLATFORMS=cuda may work here")
def test_evaluate_and_upscale_say_the_platform_is_missing_not_that_the_checkpoint_is_damaged(tmp_path):
    """JAX_PLATFORMS=cuda on a machine without an NVIDIA GPU: evaluate and upscale said "cannot load --checkpoint:
    ...: damaged checkpoint (AssertionError: )", which could have a good checkpoint deleted."""
    from rnan_jax.images import write_image

    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    expected = ("JAX_PLATFORMS=cuda: no NVIDIA GPU is visible (or JAX's CUDA plugin is not installed) (set "
                "JAX_PLATFORMS=cpu, or unset it, to use what is here)")
    env = {**os.environ, "JAX_PLATFORMS": "cuda"}
    for program, args, status in (
            ("evaluate", ["--checkpoint", "zoo:small_x2", "--datasets", "Set5", "--output", str(tmp_path / "e")], 1),
            ("upscale", ["--checkpoint", "zoo:small_x2", str(tmp_path / "a.png"), "--output", str(tmp_path / "u")], 2)):
        proc = subprocess.run([sys.executable, "-m", f"rnan_jax.{program}", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert (proc.returncode, proc.stderr.strip().splitlines()) == (status, [f"{program}: {expected}"]), proc.stderr


def test_a_relative_config_path_that_does_not_exist_names_the_folder_it_was_looked_for_in(tmp_path):
    """`--config experiments/x4.py` run from another folder than the repository's: "No such file or directory:
    'experiments/x4.py'", which did not say that the path was taken from the current folder."""
    code, err, _ = _train(["--config", "experiments/x9.py", "--workdir", str(tmp_path / "run")], tmp_path)
    assert (code, err) == (1, [f"error: --config: [Errno 2] No such file or directory: 'experiments/x9.py' (a relative "
                               f"path: looked for in the current folder, {tmp_path})"])
    code, err, _ = _train([f"--config={tmp_path}/x9.py", "--workdir", str(tmp_path / "run")], tmp_path)
    assert (code, err) == (1, [f"error: --config: [Errno 2] No such file or directory: '{tmp_path}/x9.py'"])
    assert not (tmp_path / "run").exists()


def test_preemption_gives_back_the_handlers_it_replaced_and_keeps_an_ignored_ctrl_c():
    """The training loop's SIGTERM/Ctrl-C handlers last while it trains: after it (a notebook's `api` run, a test
    process) Ctrl-C interrupts again and SIGTERM is what it was; a process started with Ctrl-C ignored (`nohup`, a
    background job of a shell without job control) keeps ignoring it, as the handler's comment says."""
    import signal

    from rnan_jax import preemption

    def mine(signum, frame):
        pass

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, mine)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with preemption.Preemption() as signals:
            assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signals._handle
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.default_int_handler,
                                                                                      mine)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with preemption.Preemption() as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signals._handle
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.SIG_IGN, mine)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_sigterm_raises_preempted_with_its_signal_and_gives_back_the_previous_handler():
    """evaluate's long scoring under `sigterm_raises`: SIGTERM raises Preempted (signum 15, so the exit status is
    143) where the program is; on leaving, a handler the program had installed is back, not SIGTERM's default."""
    import signal

    from rnan_jax import preemption

    seen = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        mine = signal.getsignal(signal.SIGTERM)
        with pytest.raises(preemption.Preempted) as raised:
            with preemption.sigterm_raises():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at the next bytecode boundary
                    pass
        assert (raised.value.signum, str(raised.value)) == (signal.SIGTERM, "SIGTERM")
        assert signal.getsignal(signal.SIGTERM) is mine
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_integer_list_flag_takes_its_minimum_itself():
    """`require_ints(name, 0)` (tiling_bound's --overlaps, data_throughput's --workers): 0 is a value it takes, -1
    the one line; `require_ints(name)`: 1 and up."""
    from absl import flags

    for name, minimum in (("cli_test_ints_min0", 0), ("cli_test_ints_min1", 1)):
        if name not in flags.FLAGS:
            flags.DEFINE_list(name, None, "a test's list of integers")
            cli.require_ints(name, minimum)
        setattr(flags.FLAGS, name, [str(minimum), "3"])
        assert flags.FLAGS[name].value == [str(minimum), "3"]
        with pytest.raises(flags.IllegalFlagValueError, match=f"each value must be an integer of at least {minimum}"):
            setattr(flags.FLAGS, name, [str(minimum - 1)])


def test_dash_h_as_the_value_of_a_flag_is_that_value_not_help():
    """`-h` is --help, except as the value of a flag that takes one (`--output -h`: the folder "-h")."""
    from absl import flags

    if "cli_test_text" not in flags.FLAGS:
        flags.DEFINE_string("cli_test_text", None, "a test's text flag")
    assert cli._h_is_help(["p", "--cli_test_text", "-h", "-h"]) == ["p", "--cli_test_text", "-h", "--help"]
    assert cli._h_is_help(["p", "--cli_test_text=x", "-h", "--", "-h"]) == ["p", "--cli_test_text=x", "--help", "--",
                                                                            "-h"]


def test_train_refuses_a_stray_argument_in_one_line(tmp_path):
    """A word that is no flag (`--workdir runs/a runs/b`, a value after a boolean flag: `--dry_run false`) was
    dropped without a word by absl; the run would have gone on with what it did not say."""
    for extra, word in ((["runs/b"], "runs/b"), (["--dry_run", "false"], "false")):
        code, err, out = _train(["--config", "experiments/demo.py", "--workdir", str(tmp_path / "run"), *extra,
                                 "--dry_run"], REPO)
        assert (code, err, out) == (1, [f"train: error: unexpected arguments: {word} (see --helpshort)"], "")
    assert not (tmp_path / "run").exists()
