"""The model zoo: `zoo:NAME` loads shipped weights everywhere a checkpoint is accepted, reproduces MODEL_ZOO.md's
numbers, and is part of the built package."""
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import rnan_jax
from rnan_jax import RNANConfig, checkpoint, init, native, zoo
from rnan_jax.evaluate import evaluate_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_read_round_trip(tmp_path):
    config = RNANConfig(scale=3, features=16, num_groups=2, num_blocks=2)
    params = init(jax.random.key(1), config)
    path = str(tmp_path / "m.msgpack")
    size = zoo.write(path, params, config, {"steps": 7})
    assert size == os.path.getsize(path)
    got, got_config, meta = zoo.read(path)
    assert got_config == config and meta == {"steps": 7}
    flat, tree = jax.tree_util.tree_flatten(params)
    got_flat, got_tree = jax.tree_util.tree_flatten(got)
    assert tree == got_tree
    for a, b in zip(flat, got_flat):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_unknown_name_lists_the_models():
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"zoo:nope: no such model in the zoo \(available: zoo:small_x2"):
        rnan_jax.load("zoo:nope")


def test_corrupt_file_is_one_error(tmp_path):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(b"\x00not msgpack")
    with pytest.raises(zoo.ZooError, match="not a readable zoo file"):
        zoo.read(str(path))


@pytest.mark.parametrize("name", zoo.names())
def test_each_zoo_model_loads_with_its_config(name):
    params, config = rnan_jax.load(f"zoo:{name}")
    assert config.scale == int(name.rsplit("_x", 1)[1])
    assert config == rnan_jax.infer_config(params)
    assert os.path.getsize(zoo.path_of(name)) < 4 * 2**20  # "a few MB at most"


def _model_zoo_number(name: str, dataset: str, column: str = "RNAN") -> float:
    """Zoo model `name`'s PSNR for `dataset` in MODEL_ZOO.md's results table (`column`: "RNAN" or "RNAN+");
    every table's first columns are Set5, Set14, B100 (then Urban100, where scored)."""
    text = open(os.path.join(REPO, "MODEL_ZOO.md")).read()
    row = re.search(rf"^\| \**zoo:{name} \(this repo, {re.escape(column)}\)\** \|(.*)$", text, re.M)
    assert row, f"MODEL_ZOO.md has no '| zoo:{name} (this repo, {column}) |' row"
    cells = [c.strip().strip("*") for c in row.group(1).split("|")]
    index = ["Set5", "Set14", "B100", "Urban100"].index(dataset)
    return float(cells[index].split("/")[0])


FSRCNN_SET5 = {2: (37.05, 0.9560), 3: (33.18, 0.9140), 4: (30.72, 0.8660)}  # Table 1's FSRCNN row


@pytest.mark.parametrize("name", zoo.names())
def test_each_zoo_model_reproduces_model_zoo_set5(name, data_dir):
    params, config = rnan_jax.load(f"zoo:{name}")
    evaluation = evaluate_model(params, config, ["Set5"], data_dir=data_dir, progress=False)
    assert evaluation.skipped == [] and evaluation.warnings == []
    got = evaluation.summary()["Set5"][f"x{config.scale}"]
    assert got["images"] == 5
    assert abs(got["psnr"] - _model_zoo_number(name, "Set5")) < 0.005
    psnr, ssim = FSRCNN_SET5[config.scale]  # every zoo model is above FSRCNN's row of Table 1 on Set5
    assert got["psnr"] > psnr and got["ssim"] > ssim


def test_evaluate_cli_accepts_a_zoo_name(data_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--checkpoint", "zoo:small_x2",
                          "--datasets", "Set5", "--output", str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"Set5\s.*x2", out.stdout)
    assert os.path.isfile(tmp_path / "results.json")


def test_the_wheel_ships_the_weights(tmp_path):
    """A non-editable build (what `pip install .` installs) holds the zoo files and the native kernels' sources."""
    # Build with this environment's setuptools where it can make wheels (setuptools >= 70.1 has bdist_wheel, an
    # older one needs the `wheel` package: a fresh Python 3.11 venv has setuptools 65.5 and no `wheel`); else
    # let pip build in isolation, fetching setuptools from the package index.
    can_build = importlib.util.find_spec("setuptools") is not None and (
        importlib.util.find_spec("wheel") is not None
        or importlib.util.find_spec("setuptools.command.bdist_wheel") is not None)
    isolation = ["--no-build-isolation"] if can_build else []
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp_path),
                          REPO], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert len(wheel) == 1, os.listdir(tmp_path)
    names = zipfile.ZipFile(tmp_path / wheel[0]).namelist()
    for model in zoo.names():
        assert f"rnan_jax/zoo/{model}.msgpack" in names
    assert "rnan_jax/zoo/small_x2.msgpack" in names and "rnan_jax/zoo/sha256.json" in names  # what loads check
    for source in native._SOURCES:  # rnan_jax.native builds them on first use
        assert f"rnan_jax/kernels/{os.path.basename(source)}" in names


def test_load_reads_a_zoo_file_by_path_and_names_a_bad_one(tmp_path):
    from flax import serialization

    params, config = rnan_jax.load("zoo:small_x2")
    path = tmp_path / "mine.msgpack"
    zoo.write(str(path), params, config)
    loaded, loaded_config = rnan_jax.load(str(path))  # what tools/make_zoo.py writes, from anywhere
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    (tmp_path / "cut.msgpack").write_bytes(path.read_bytes()[:1000])
    (tmp_path / "other.msgpack").write_bytes(serialization.msgpack_serialize({"a": np.zeros(3)}))
    (tmp_path / "wrong.msgpack").write_bytes(serialization.msgpack_serialize(
        {"config": {**config.__dict__, "rgb_mean": list(config.rgb_mean), "features": 16}, "params": params}))
    for name, says in [("cut", "incomplete input"), ("other", "KeyError"), ("wrong", "do not fit its config"),
                       ("absent", "no such file")]:
        with pytest.raises(checkpoint.CheckpointError, match=f"{name}.msgpack: .*{says}"):
            rnan_jax.load(str(tmp_path / f"{name}.msgpack"))
    loaded, _ = rnan_jax.load(path)  # a pathlib.Path as well
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    for bad in (None, 5, ""):  # a raw TypeError from the path helpers, or "" silently the current folder
        with pytest.raises(checkpoint.CheckpointError, match="path must name a workdir, checkpoint folder or zoo "
                                                              f"model, got {bad!r}"):
            rnan_jax.load(bad)


def test_a_zoo_file_under_home_is_written_and_loaded_by_a_tilde_path(tmp_path, monkeypatch):
    """`--checkpoint=~/m.msgpack` (no shell expands a ~ after "=") and zoo.write("~/...") mean the home folder,
    not a folder named "~" in the current one; a meta that is not a mapping is an unreadable file, not a raw
    TypeError."""
    from flax import serialization

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    params = init(jax.random.key(2), config)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    zoo.write("~/weights/m.msgpack", params, config, {"step": 3})
    assert os.listdir(tmp_path) == ["home"] and os.path.isfile(tmp_path / "home" / "weights" / "m.msgpack")
    loaded, loaded_config = rnan_jax.load("~/weights/m.msgpack")
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    assert zoo.read("~/weights/m.msgpack")[2] == {"step": 3}
    record = serialization.msgpack_restore((tmp_path / "home" / "weights" / "m.msgpack").read_bytes())
    (tmp_path / "listmeta.msgpack").write_bytes(serialization.msgpack_serialize({**record, "meta": [1, 2]}))
    with pytest.raises(zoo.ZooError, match="listmeta.msgpack: not a readable zoo file"):
        zoo.read(str(tmp_path / "listmeta.msgpack"))


def test_make_zoo_records_the_step_and_the_run_of_a_step_folder(tmp_path):
    """The meta names the step the parameters came from (the best/ one for --which best), and a step's
    folder given as --workdir still records the run's config.json and git revision."""
    import orbax.checkpoint as ocp

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    params = init(jax.random.key(3), config)
    workdir = tmp_path / "run"
    for folder, step in [(checkpoint.CHECKPOINTS, 7), (checkpoint.CHECKPOINTS, 9), ("best", 7)]:
        mgr = checkpoint.manager(str(workdir / folder), async_save=False)
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave(checkpoint.meta_for(config, step))))
        mgr.wait_until_finished()
        mgr.close()
    (workdir / "config.json").write_text('{"total_steps": 9}')
    (workdir / "git_revision.txt").write_text("abc123\n")
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    driver = [sys.executable, os.path.join(REPO, "tools", "make_zoo.py"), "--out", str(zoo_dir)]
    for args, name, step in [(["--workdir", str(workdir), "--which", "best"], "best", 7),
                             (["--workdir", str(workdir / checkpoint.CHECKPOINTS / "7")], "seven", 7),
                             (["--workdir", str(workdir)], "latest", 9)]:
        proc = subprocess.run([*driver, *args, "--name", name], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f" (step {step}): x2, " in proc.stdout
        _, got_config, meta = zoo.read(str(zoo_dir / f"{name}.msgpack"))
        assert got_config == config
        assert (meta["step"], meta["config.json"], meta["git_revision.txt"]) == (step, {"total_steps": 9}, "abc123")
        recorded = json.loads((zoo_dir / "sha256.json").read_text())[name]
        assert recorded == hashlib.sha256((zoo_dir / f"{name}.msgpack").read_bytes()).hexdigest()
        assert f"its SHA-256 recorded in {zoo_dir / 'sha256.json'}" in proc.stdout
    assert sorted(json.loads((zoo_dir / "sha256.json").read_text())) == ["best", "latest", "seven"]
    assert sorted(zoo.SHA256) == ["small_x2", "small_x3", "small_x4"]  # the package's own list untouched
    (workdir / "config.json").write_text('{"total_st')  # cut short: it was a JSONDecodeError traceback
    proc = subprocess.run([*driver, "--workdir", str(workdir), "--name", "cut"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"make_zoo: note: {workdir / 'config.json'} is not valid JSON (" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "config.json" not in zoo.read(str(zoo_dir / "cut.msgpack"))[2]
    (workdir / "config.json").write_text('{"total_steps": 9}')
    (zoo_dir / "cut.msgpack").unlink()
    recorded = json.loads((zoo_dir / "sha256.json").read_text())
    del recorded["cut"]
    (zoo_dir / "sha256.json").write_text(json.dumps(recorded))
    (zoo_dir / "sha256.json").unlink()
    (zoo_dir / "sha256.json").mkdir()  # nowhere to record it: one line that says what to do
    proc = subprocess.run([*driver, "--workdir", str(workdir), "--name", "latest"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"make_zoo: wrote {zoo_dir / 'latest.msgpack'} but could not record its SHA-256 beside it in sha256.json (")


def test_make_zoo_writes_into_the_checkout_it_is_in_not_the_installed_package(tmp_path):
    """tools/make_zoo.py wrote beside the imported package's zoo/__init__.py: with rnan_jax installed by `pip
    install .` (not -e), into site-packages, and the checkout (whose rnan_jax/zoo MODEL_ZOO.md says to commit)
    had no file. It writes into its own checkout's rnan_jax/zoo, or the folder --out names."""
    import shutil

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    source = str(tmp_path / "run.msgpack")
    zoo.write(source, init(jax.random.key(5), config), config)
    site = tmp_path / "site"  # an installed copy of the package, which the tool imports
    shutil.copytree(os.path.dirname(rnan_jax.__file__), site / "rnan_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.msgpack"))
    checkout = tmp_path / "checkout"  # a checkout: tools/make_zoo.py beside rnan_jax/zoo
    (checkout / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "tools", "make_zoo.py"), checkout / "tools")
    (checkout / "rnan_jax" / "zoo").mkdir(parents=True)
    (checkout / "rnan_jax" / "zoo" / "__init__.py").write_text("")
    environ = {**os.environ, "PYTHONPATH": str(site)}
    for extra, folder in [([], checkout / "rnan_jax" / "zoo"), (["--out", str(tmp_path / "mine")], tmp_path / "mine")]:
        proc = subprocess.run([sys.executable, str(checkout / "tools" / "make_zoo.py"), "--workdir", source,
                               "--name", "m", *extra], capture_output=True, text=True, timeout=300, env=environ)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"wrote {folder / 'm.msgpack'} (" in proc.stdout
        assert zoo.read(str(folder / "m.msgpack"))[1] == config
        recorded = json.loads((folder / "sha256.json").read_text())
        assert recorded == {"m": hashlib.sha256((folder / "m.msgpack").read_bytes()).hexdigest()}
    assert not (site / "rnan_jax" / "zoo" / "m.msgpack").exists()


def test_write_refuses_parameters_that_do_not_fit_the_config_and_keeps_the_file_there(tmp_path):
    """A zoo file that read() would refuse is never written, nor does it replace a good one."""
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    params = init(jax.random.key(4), config)
    path = str(tmp_path / "m.msgpack")
    zoo.write(path, params, config)
    good = open(path, "rb").read()
    for bad_params, bad_config, says in [(params, RNANConfig(**{**config.__dict__, "scale": 4}), r"up_1"),
                                         ({"params": params}, config, "variables dict")]:
        with pytest.raises(ValueError, match=says):
            zoo.write(path, bad_params, bad_config)
        assert open(path, "rb").read() == good
    assert zoo.read(path)[1] == config


def _zoo_folder_at(folder, monkeypatch):
    """Points the zoo (`zoo:NAME`, and the path of a shipped file) at `folder`, a copy of the shipped files."""
    import importlib.resources
    import pathlib

    files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files",
                        lambda package: pathlib.Path(folder) if package == zoo.__name__ else files(package))


def _damaged_copies(tmp_path):
    """{"cut": a zoo folder whose small_x2 is its first half, "flip": one whose small_x2 has one bit of a float in
    the middle of its largest array flipped (a 0.8% change to one weight: it loads and its outputs barely move)}."""
    data = open(zoo.path_of("small_x2"), "rb").read()
    params, _ = rnan_jax.load("zoo:small_x2")
    largest = np.asarray(params["groups"]["blocks"]["c1"]["kernel"], np.float32).tobytes()
    start = data.find(largest)
    assert start > 0
    flipped = bytearray(data)
    flipped[start + len(largest) // 8 * 4 + 2] ^= 0x20
    folders = {}
    for what, content in [("cut", data[:len(data) // 2]), ("flip", bytes(flipped)), ("intact", data)]:
        folder = tmp_path / what
        folder.mkdir()
        for name in zoo.names():
            (folder / f"{name}.msgpack").write_bytes(open(zoo.path_of(name), "rb").read())
        (folder / "small_x2.msgpack").write_bytes(content)
        folders[what] = folder
    return folders


def test_every_shipped_model_has_its_sha256_recorded():
    import hashlib

    assert sorted(zoo.SHA256) == zoo.names() == ["small_x2", "small_x3", "small_x4"]
    for name in zoo.names():
        assert hashlib.sha256(open(zoo.path_of(name), "rb").read()).hexdigest() == zoo.SHA256[name]


def test_a_damaged_zoo_file_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    """A cut or bit-flipped shipped file: one error naming the file and what to do, by `zoo:NAME`, by the file's
    path and for its meta (before: msgpack's "incomplete input", and the flipped one loaded and gave other
    outputs); the intact copy and the other models load as before."""
    folders = _damaged_copies(tmp_path)
    params, config = rnan_jax.load("zoo:small_x2")
    _zoo_folder_at(folders["intact"], monkeypatch)
    got, got_config = rnan_jax.load("zoo:small_x2")
    assert got_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
    for what in ("cut", "flip"):
        _zoo_folder_at(folders[what], monkeypatch)
        path = str(folders[what] / "small_x2.msgpack")
        says = (re.escape(path) + r": damaged file \(a partial copy, a corrupted install or an edited file\): its "
                r"SHA-256 is [0-9a-f]{12}\.\.\., zoo:small_x2's is 215e4cfeb9eb\.\.\.; reinstall rnan_jax, or in a "
                r"git checkout run `git checkout -- rnan_jax/zoo/small_x2.msgpack`$")
        for load in (lambda: rnan_jax.load("zoo:small_x2"), lambda: rnan_jax.load(path)):
            with pytest.raises(checkpoint.CheckpointError, match=says):
                load()
        for load in (lambda: zoo.load("small_x2"), lambda: zoo.meta("zoo:small_x2"), lambda: zoo.read(path)):
            with pytest.raises(zoo.ZooError, match=says):
                load()
        assert rnan_jax.load("zoo:small_x3")[1].scale == 3
    copy = tmp_path / "elsewhere" / "small_x2.msgpack"  # a copy elsewhere has nothing to be checked against
    copy.parent.mkdir()
    copy.write_bytes((folders["flip"] / "small_x2.msgpack").read_bytes())
    assert rnan_jax.load(str(copy))[1] == config


def test_upscale_cli_refuses_a_damaged_zoo_file_in_one_line(tmp_path):
    from PIL import Image

    folders = _damaged_copies(tmp_path)
    Image.fromarray(np.full((12, 12, 3), 128, np.uint8)).save(tmp_path / "a.png")
    driver = ("import importlib.resources, pathlib, runpy, sys\n"
              "files, folder = importlib.resources.files, pathlib.Path(sys.argv.pop(1))\n"
              "importlib.resources.files = lambda p: folder if p == 'rnan_jax.zoo' else files(p)\n"
              "runpy.run_module('rnan_jax.upscale', run_name='__main__')\n")
    for what in ("flip", "cut"):
        out = tmp_path / f"out_{what}"
        proc = subprocess.run([sys.executable, "-c", driver, str(folders[what]), "--checkpoint", "zoo:small_x2",
                               str(tmp_path / "a.png"), "--output", str(out)], capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not out.exists()
        lines = [line for line in proc.stderr.splitlines() if "small_x2" in line]
        assert lines == [f"upscale: cannot load --checkpoint: {folders[what] / 'small_x2.msgpack'}: damaged file "
                         f"(a partial copy, a corrupted install or an edited file): its SHA-256 is "
                         f"{lines[0].split('SHA-256 is ')[1][:12]}..., zoo:small_x2's is 215e4cfeb9eb...; reinstall "
                         f"rnan_jax, or in a git checkout run `git checkout -- rnan_jax/zoo/small_x2.msgpack`"]


def test_record_sha256_adds_to_the_list_beside_the_file(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(zoo, "SHA256", dict(zoo.SHA256))
    package = dict(zoo.SHA256)
    model = tmp_path / "m.msgpack"
    model.write_bytes(b"new model")
    digest = hashlib.sha256(b"new model").hexdigest()
    (tmp_path / "sha256.json").write_text(json.dumps({"small_x3": "0" * 64, "old": "1" * 64}))
    assert zoo.record_sha256("a_new", str(model)) == str(tmp_path / "sha256.json")
    assert zoo.record_sha256("small_x3", str(model)) == str(tmp_path / "sha256.json")
    assert json.loads((tmp_path / "sha256.json").read_text()) == {"a_new": digest, "old": "1" * 64, "small_x3": digest}
    assert zoo.SHA256 == package  # another folder's list: the package's models keep theirs
    (tmp_path / "sha256.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        zoo.record_sha256("b", str(model))


def test_which_ema_or_best_of_a_zoo_model_is_refused_in_one_line(tmp_path):
    """upscale --checkpoint zoo:small_x2 --which ema wrote the image from the zoo's one set of parameters, exit 0,
    as if they were an EMA."""
    from rnan_jax import checkpoint

    params, config = checkpoint.load("zoo:small_x2")
    assert config.scale == 2 and checkpoint.load("zoo:small_x2", which="latest")[1] == config
    for which in ("ema", "best"):
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load("zoo:small_x2", which=which)
        assert str(e.value) == (f"zoo:small_x2: a zoo model holds one set of parameters (those make_zoo took from "
                                f"its run), so which {which!r} (--which) does not apply")
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", "zoo:small_x2", "--which",
                           "ema", str(tmp_path / "x.png"), "--output", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "upscale: cannot load --checkpoint: zoo:small_x2: a zoo model holds one set of parameters (those make_zoo "
        "took from its run), so which 'ema' (--which) does not apply"), proc.stderr


def test_a_zoo_file_of_a_bfloat16_run_computes_in_float32(tmp_path):
    """make_zoo of a run trained with model.dtype=bfloat16 stored dtype bfloat16 in the file's config: its users
    computed in bfloat16 without a word (apply, evaluate, upscale and export take the config's dtype). The file
    says float32 (its parameters are float32; dtype="bfloat16" is the user's choice), and a file written so
    before is read as float32."""
    import orbax.checkpoint as ocp
    from flax import serialization

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2, dtype="bfloat16")
    params = init(jax.random.key(6), config)
    workdir = tmp_path / "run"
    mgr = checkpoint.manager(str(workdir / checkpoint.CHECKPOINTS), async_save=False)
    mgr.save(4, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                        meta=ocp.args.JsonSave(checkpoint.meta_for(config, 4))))
    mgr.wait_until_finished()
    mgr.close()
    assert checkpoint.load(str(workdir))[1].dtype == "bfloat16"  # the run's own checkpoint keeps its dtype
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_zoo.py"), "--workdir", str(workdir),
                           "--name", "b", "--out", str(tmp_path / "zoo")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    old = tmp_path / "old.msgpack"  # as make_zoo wrote it before
    old.write_bytes(serialization.msgpack_serialize({"params": jax.tree_util.tree_map(np.asarray, params),
                                                     "config": {**config.__dict__, "rgb_mean": list(config.rgb_mean)},
                                                     "meta": {}}))
    lr = np.random.default_rng(0).random((1, 9, 7, 3), np.float32)
    float32 = np.asarray(rnan_jax.apply(params, lr, config=RNANConfig(**{**config.__dict__, "dtype": "float32"})))
    bfloat16 = np.asarray(rnan_jax.apply(params, lr, config=config))
    assert np.abs(float32 - bfloat16).max() > 1e-4
    for path in (tmp_path / "zoo" / "b.msgpack", old):
        got_params, got_config = checkpoint.load(str(path))
        assert got_config == RNANConfig(**{**config.__dict__, "dtype": "float32"})
        np.testing.assert_array_equal(np.asarray(rnan_jax.apply(got_params, lr, config=got_config)), float32)


def _save_steps(directory, steps, config):
    """Checkpoints `steps` ({step: seed}) in `directory` as training saves them (params, ema, meta); returns
    {step: (params, ema)}."""
    import orbax.checkpoint as ocp

    saved = {}
    mgr = checkpoint.manager(str(directory), async_save=False)
    for step, seed in steps.items():
        params, ema = init(jax.random.key(seed), config), init(jax.random.key(seed + 100), config)
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), ema=ocp.args.StandardSave(ema),
                                               meta=ocp.args.JsonSave(checkpoint.meta_for(config, step))))
        saved[step] = params, ema
    mgr.wait_until_finished()
    mgr.close()
    return saved


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_which_best_reads_best_or_says_why_not(tmp_path):
    """which="best" of a workdir's checkpoints/ folder or of one of its steps gave that step's EMA, not the best/
    one, without a word; a workdir holding only best/ (its checkpoints/ not copied) was "not an rnan_jax
    checkpoint", even for which="best"."""
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    workdir = tmp_path / "run"
    steps = _save_steps(workdir / checkpoint.CHECKPOINTS, {3: 1, 6: 2}, config)
    best = _save_steps(workdir / checkpoint.BEST, {3: 3}, config)[3]
    assert _same(checkpoint.load(str(workdir), which="best")[0], best[1])
    assert _same(checkpoint.load(str(workdir / checkpoint.BEST / "3"), which="best")[0], best[1])
    assert _same(checkpoint.load(str(workdir / checkpoint.CHECKPOINTS / "6"), which="ema")[0], steps[6][1])
    step_says = "and this step is not in one: pass the workdir, or which 'ema' or 'latest' for this step"
    for path, says in [(workdir / checkpoint.CHECKPOINTS, f"not its checkpoints/: pass {workdir}"),
                       (workdir / checkpoint.CHECKPOINTS / "6", step_says)]:
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(str(path), which="best")
        assert str(e.value) == f"{path}: which 'best' (--which best) reads a workdir's best/ folder, {says}"
    only_best = tmp_path / "shared"
    only_best.mkdir()
    os.rename(workdir / checkpoint.BEST, only_best / checkpoint.BEST)
    params, got_config = checkpoint.load(str(only_best), which="best")
    assert got_config == config and _same(params, best[1])
    for which in ("latest", "ema"):
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(str(only_best), which=which)
        assert str(e.value) == (f"{only_best}: holds only best/, no checkpoints/: pass which 'best' (--which best) "
                                f"or {only_best / checkpoint.BEST}")
    assert _same(checkpoint.load(str(only_best / checkpoint.BEST))[0], best[0])


def _save_params_only(directory, step, params, config):
    """Checkpoint `step` of a run trained without EMA (params and meta only)."""
    import orbax.checkpoint as ocp

    mgr = checkpoint.manager(str(directory), async_save=False)
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           meta=ocp.args.JsonSave(checkpoint.meta_for(config, step))))
    mgr.wait_until_finished()
    mgr.close()


def test_the_clis_read_by_default_the_parameters_validation_scored(tmp_path):
    """A run trained with EMA validates its EMA (the val/psnr it logs, what best/ keeps), but evaluate, upscale,
    tools/export.py and tools/make_zoo.py read its raw parameters by default (--which latest): evaluate's numbers
    were not the run's for that step. Their default, auto, reads the EMA where the run kept one, else latest
    (checkpoint.scored), and evaluate names the resolved which; an explicit --which is as it was."""
    from rnan_jax import images, inference
    from rnan_jax.evaluate import evaluate_model

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    workdir = tmp_path / "run"
    params, ema = _save_steps(workdir / checkpoint.CHECKPOINTS, {4: 1}, config)[4]
    plain = tmp_path / "plain"  # a run without EMA
    _save_params_only(plain / checkpoint.CHECKPOINTS, 4, params, config)
    assert [checkpoint.resolve_which(str(p), "auto") for p in (workdir, workdir / checkpoint.CHECKPOINTS / "4",
                                                                 plain, "zoo:small_x2")] == ["ema", "ema", "latest",
                                                                                             "latest"]
    assert [checkpoint.resolve_which(str(workdir), w) for w in checkpoint.WHICH] == list(checkpoint.WHICH)
    mine = tmp_path / "mine"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
    images.write_image(str(mine / "a.png"), pixels)

    def cli(*args):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    def psnr(p):
        evaluation = evaluate_model(p, config, [str(mine)], data_dir=str(tmp_path), progress=False)
        return evaluation.summary()["mine"]["x2"]["psnr"]

    assert psnr(ema) != psnr(params)
    cli("-m", "rnan_jax.evaluate", "--checkpoint", str(workdir), "--datasets", str(mine), "--noprogress",
        "--output", str(tmp_path / "scores"))
    results = json.loads((tmp_path / "scores" / "results.json").read_text())
    assert results["mine"]["x2"]["psnr"] == psnr(ema)
    assert results["run"]["source"] == f"--checkpoint {workdir} --which ema (step 4)"

    cli("-m", "rnan_jax.upscale", "--checkpoint", str(workdir), str(mine / "a.png"), "--output", str(tmp_path / "up"))
    got = images.read_rgb(str(tmp_path / "up" / "a_x2.png"))
    np.testing.assert_array_equal(got, inference.upscale_image(ema, pixels, config=config))
    assert not np.array_equal(got, inference.upscale_image(params, pixels, config=config))

    cli(os.path.join(REPO, "tools", "export.py"), "--checkpoint", str(workdir), "--output", str(tmp_path / "m.jax"),
        "--platforms", "cpu")
    exported = jax.export.deserialize(bytearray((tmp_path / "m.jax").read_bytes()))
    lr = pixels[None].astype(np.float32) / 255
    np.testing.assert_allclose(np.asarray(exported.call(lr)), np.asarray(rnan_jax.apply(ema, lr, config=config)),
                               atol=1e-5)

    for run, which, expected in [(workdir, "ema", ema), (plain, "latest", params)]:
        cli(os.path.join(REPO, "tools", "make_zoo.py"), "--workdir", str(run), "--name", run.name, "--out",
            str(tmp_path / "zoo"))
        got_params, _, meta = zoo.read(str(tmp_path / "zoo" / f"{run.name}.msgpack"))
        assert meta["which"] == which and _same(got_params, expected)


def test_make_zoo_refuses_an_empty_out_or_workdir_in_one_line(tmp_path):
    """`--out "$DIR"` with DIR unset wrote into the checkout's rnan_jax/zoo (and its sha256.json), the default, not
    where it was sent; `--workdir ""` read the current folder, which load() refuses for "" ."""
    import shutil

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    source = str(tmp_path / "run.msgpack")
    zoo.write(source, init(jax.random.key(5), config), config)
    checkout = tmp_path / "checkout"  # a checkout's tools/make_zoo.py, whose default --out is its rnan_jax/zoo
    (checkout / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "tools", "make_zoo.py"), checkout / "tools")
    (checkout / "rnan_jax" / "zoo").mkdir(parents=True)
    (checkout / "rnan_jax" / "zoo" / "__init__.py").write_text("")
    driver = [sys.executable, str(checkout / "tools" / "make_zoo.py"), "--name", "m"]
    for args, line in [(["--workdir", source, "--out", ""], "make_zoo: --out is empty (an unset variable?): name the "
                        "folder to write into, or leave --out out for the checkout's rnan_jax/zoo"),
                       (["--workdir", " ", "--out", str(tmp_path / "out")], "make_zoo: --workdir is empty (an unset "
                        "variable?): name the training workdir")]:
        proc = subprocess.run([*driver, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.strip() == line, proc.stderr[-2000:]
    assert os.listdir(checkout / "rnan_jax" / "zoo") == ["__init__.py"]
    assert sorted(os.listdir(tmp_path)) == ["checkout", "run.msgpack"]


def test_make_zoo_names_the_start_of_the_run_that_saved_the_step(tmp_path):
    """The record held the workdir's config.json and git_revision.txt, which the start that began the run
    writes: a step saved after a resume with other settings (or by another version of the code) was recorded
    with the first start's, without a word. The record now says which start saved the step (the last that
    train.log has before the step's save) and gives train.log's account of it: its command and revision, and the
    config changes it logged since config.json."""
    import datetime
    import time

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    workdir = tmp_path / "run"

    def stamp(t):
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    first = int(time.time()) - 5
    _save_steps(workdir / checkpoint.CHECKPOINTS, {3: 1}, config)
    second = int(json.loads((workdir / checkpoint.CHECKPOINTS / "3" / "_CHECKPOINT_METADATA").read_text())[
        "commit_timestamp_nsecs"] / 1e9) + 1  # the resumed start, after step 3 was saved
    while time.time() < second + 0.05:
        time.sleep(0.05)
    _save_steps(workdir / checkpoint.CHECKPOINTS, {6: 2}, config)
    (workdir / "config.json").write_text('{"total_steps": 3, "optim": {"lr": 0.001}}')
    (workdir / "git_revision.txt").write_text("abc123\n")
    started = ["train.py --workdir run --config.total_steps=3 (rnan_jax abc123, jax 0.10.2, vm)",
               "train.py --workdir run --config.total_steps=6 --config.optim.lr=5e-4 (rnan_jax def456, jax 0.11.2, vm)"]
    changes = "optim.lr 0.001 -> 0.0005; total_steps 3 -> 6"
    (workdir / "train.log").write_text(
        f"{stamp(first)}  started: {started[0]}\n{stamp(first)}  step 3/3  loss 0.1\n"
        f"{stamp(second)}  started: {started[1]}\n{stamp(second)}  resumed from run/checkpoints/3 (step 3)\n"
        f"{stamp(second)}  config changed since the run that made run (its config.json): {changes}\n")
    zoo_dir = tmp_path / "zoo"
    record = "config.json and git_revision.txt are the workdir's, written by the start that began the run; "

    def make(where, name):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_zoo.py"), "--workdir", str(where),
                               "--name", name, "--out", str(zoo_dir)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return zoo.read(str(zoo_dir / f"{name}.msgpack"))[2]

    meta = make(workdir, "latest")
    assert (meta["step"], meta["config.json"], meta["git_revision.txt"]) == (
        6, {"total_steps": 3, "optim": {"lr": 0.001}}, "abc123")  # the first start's, as before
    assert meta["record"] == record + ('step 6 was saved by start 2 of the 2 in train.log ("start": its command, '
                                       'rnan_jax revision and config changes since config.json)')
    assert meta["start"] == {"started": f"{stamp(second)} UTC: {started[1]}", "config_changes": changes}
    meta = make(workdir / checkpoint.CHECKPOINTS / "3", "three")
    assert meta["step"] == 3 and meta["record"] == record + (
        'step 3 was saved by start 1 of the 2 in train.log ("start": its command, rnan_jax revision and config '
        'changes since config.json)')
    assert meta["start"] == {"started": f"{stamp(first)} UTC: {started[0]}", "config_changes": "none"}
    (workdir / "train.log").unlink()  # not copied with the run: said so
    meta = make(workdir, "nolog")
    assert meta["record"] == record + "which start saved step 6 is not known (train.log is missing or holds no start)"
    assert "start" not in meta


def test_make_zoo_upscale_and_export_name_the_parameters_and_step_as_the_file_records(tmp_path):
    """make_zoo's line named the step but not which parameters (export's the which, not the step); upscale and
    export called a zoo file `--which latest` whatever its meta records; a zoo file given to make_zoo was recorded
    as "latest" of no step. Each names `--which W (step N)` of a run, and a zoo file's record; upscale's
    --noprogress leaves out its bars, as evaluate's does."""
    from rnan_jax import images

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
    run = tmp_path / "run"
    _save_steps(run / checkpoint.CHECKPOINTS, {4: 1, 8: 2}, config)
    environ = dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")

    def cli(*args):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env=environ)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    make_zoo = os.path.join(REPO, "tools", "make_zoo.py")
    first, copy = tmp_path / "zoo" / "m.msgpack", tmp_path / "zoo" / "copy.msgpack"
    proc = cli(make_zoo, "--workdir", str(run), "--name", "m", "--out", str(tmp_path / "zoo"))
    assert proc.stdout == (f"wrote {first} (0.02 MiB) of --workdir {run} --which ema (step 8): x2, 5,504 parameters; "
                           f"its SHA-256 recorded in {tmp_path / 'zoo' / 'sha256.json'}\n")
    proc = cli(make_zoo, "--workdir", str(first), "--name", "copy", "--out", str(tmp_path / "zoo"))
    assert f" of --workdir {first} (the run's ema at step 8): x2, " in proc.stdout
    assert {k: zoo.read(str(copy))[2][k] for k in ("which", "step")} == {"which": "ema", "step": 8}
    images.write_image(str(tmp_path / "a.png"), np.zeros((6, 7, 3), np.uint8))
    for path, named in [(str(run), f"{run} --which ema (step 8)"), (str(copy), f"{copy} (the run's ema at step 8)"),
                        ("zoo:small_x2", "zoo:small_x2 (the run's latest, its step not recorded)")]:
        proc = cli("-m", "rnan_jax.upscale", "--checkpoint", path, str(tmp_path / "a.png"), "--output",
                   str(tmp_path / "up"), "--noprogress")
        assert proc.stderr.splitlines() == [f"Upscaling with: --checkpoint {named}",
                                            f"wrote 1 image(s) to {tmp_path / 'up'}"], proc.stderr
    proc = cli(os.path.join(REPO, "tools", "export.py"), "--checkpoint", str(copy), "--output",
               str(tmp_path / "m.jax"), "--platforms", "cpu")
    assert f" of --checkpoint {copy} (the run's ema at step 8): x2, " in proc.stdout, proc.stdout


def test_make_zoo_reads_train_logs_times_as_utc_whatever_the_local_time_zone():
    """train.log's stamps are UTC: read as local time (TZ=America/New_York here, 5 h behind in January), every start
    would seem 5 h later than it was, and no start would have saved a step saved within 5 h of it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import make_zoo\n"
            "print(make_zoo._starts('2026-01-02 03:04:05  started: train.py (rnan_jax abc)\\n')[0]['at'])")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "tools")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TZ": "America/New_York", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) == 1767323045.0  # calendar.timegm((2026, 1, 2, 3, 4, 5)): seconds since 1970, UTC


def test_make_zoo_reads_the_starts_of_a_train_log_with_a_byte_that_is_not_utf_8(tmp_path):
    """RunLog writes a Latin-1 file name's byte as it is: make_zoo's read of train.log as UTF-8 text failed, and the
    record said that train.log "is missing or holds no start"."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "checkpoints" / "3" / "_CHECKPOINT_METADATA").write_text(
        json.dumps({"commit_timestamp_nsecs": (1767323045 + 60) * 10**9}))  # a minute after the start below
    (workdir / "train.log").write_bytes(b"2026-01-02 03:04:05  started: train.py --workdir caf\xe9 (rnan_jax abc)\n"
                                        b"2026-01-02 03:04:06  warning: skipped caf\xe9.png\n")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import make_zoo\n"
            "print(json.dumps(make_zoo._start_record(sys.argv[2], sys.argv[3], 3)))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "tools"), str(workdir),
                           str(workdir / "checkpoints" / "3")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["record"].endswith("step 3 was saved by start 1 of the 1 in train.log (\"start\": its command, "
                                     "rnan_jax revision and config changes since config.json)")
    assert record["start"] == {"started": "2026-01-02 03:04:05 UTC: train.py --workdir caf\ufffd (rnan_jax abc)",
                               "config_changes": "none"}
