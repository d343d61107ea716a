"""rnan_jax.export: the serialized artifact reproduces `apply` for any batch and size, without rnan_jax."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from test_gcs import gcs  # noqa: F401 (fixture: a local GCS emulator)

from rnan_jax import RNANConfig, apply, init
from rnan_jax.export import export_model, save

TINY = RNANConfig(scale=3, features=8, num_groups=2, num_blocks=2, block_interval=2, gc_reduction=2)


@pytest.fixture(scope="module")
def params():
    return init(jax.random.key(0), TINY)


def test_artifact_reproduces_apply_without_the_project(tmp_path, params):
    exported = export_model(params, TINY)
    assert str(exported.in_avals[0].shape) == "(b, h, w, 3)"
    assert str(exported.out_avals[0].shape) == "(b, 3*h, 3*w, 3)"
    path = tmp_path / "rnan.jaxexport"
    assert save(exported, str(path)) == path.stat().st_size

    rng = np.random.default_rng(0)
    inputs = {"a": rng.random((2, 7, 9, 3), np.float32), "b": rng.random((1, 12, 5, 3), np.float32)}
    np.savez(tmp_path / "in.npz", **inputs)
    # The loader snippet of rnan_jax/export.py's docstring, in a process where rnan_jax cannot be imported.
    driver = textwrap.dedent(f"""
        import sys
        sys.modules["rnan_jax"] = None
        import jax
        import numpy as np

        with open({str(path)!r}, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        inputs = np.load({str(tmp_path / "in.npz")!r})
        np.savez({str(tmp_path / "out.npz")!r}, **{{k: np.asarray(exported.call(inputs[k])) for k in inputs}})
        """)
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    outputs = np.load(tmp_path / "out.npz")
    for key, lr in inputs.items():
        expected = np.asarray(jax.jit(lambda x: apply(params, x, config=TINY))(lr))
        assert outputs[key].shape == expected.shape == (lr.shape[0], 3 * lr.shape[1], 3 * lr.shape[2], 3)
        np.testing.assert_allclose(outputs[key], expected, atol=1e-5)


def test_fixed_size_keeps_batch_symbolic(params):
    exported = jax.export.deserialize(export_model(params, TINY, platforms=("cpu",), fixed_size=(6, 4))
                                      .serialize())
    assert str(exported.in_avals[0].shape) == "(b, 6, 4, 3)"
    lr = np.random.default_rng(1).random((3, 6, 4, 3), np.float32)
    expected = jax.jit(lambda x: apply(params, x, config=TINY))(lr)
    np.testing.assert_allclose(np.asarray(exported.call(lr)), np.asarray(expected), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        exported.call(lr[:, :5])


def test_model_with_native_cpu_kernels_exports_and_matches_apply(tmp_path):
    # 16 features: on CPU `apply` runs the 3x3 convs as native (FFI) kernels, which jax.export cannot
    # serialize; the artifact must hold XLA's convolutions and still reproduce apply on an odd size.
    config = RNANConfig(scale=2, features=16, num_groups=1, num_blocks=2, gc_reduction=4)
    params = init(jax.random.key(1), config)
    path = tmp_path / "out" / "rnan.jaxexport"
    save(export_model(params, config, platforms=("cpu",)), str(path))
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    lr = np.random.default_rng(2).random((1, 7, 5, 3), np.float32)
    np.testing.assert_allclose(np.asarray(exported.call(lr)), np.asarray(apply(params, lr)), atol=1e-5)


def test_misuse_is_named(tmp_path, params):
    with pytest.raises(ValueError, match="'cuda'"):
        export_model(params, TINY, platforms=("gpu",))
    with pytest.raises(ValueError, match="fixed_size"):
        export_model(params, TINY, fixed_size=(0, 4))
    with pytest.raises(ValueError, match=r"params\['up_0'\]\['bias'\] has shape"):
        export_model(params, RNANConfig(**{**TINY.__dict__, "scale": 2}))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save(export_model(params, TINY, platforms=("cpu",)), str(tmp_path))


def test_save_expands_home_and_writes_a_gs_url_to_the_bucket(tmp_path, monkeypatch, params, gcs):  # noqa: F811
    from etils import epath

    exported = export_model(params, TINY, platforms=("cpu",))
    blob = exported.serialize()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # where "~" and "gs:" folders used to be made
    assert save(exported, "~/models/rnan.jaxexport") == len(blob)
    assert (tmp_path / "home" / "models" / "rnan.jaxexport").read_bytes() == blob
    assert save(exported, "gs://bucket/models/rnan.jaxexport") == len(blob)
    assert epath.Path("gs://bucket/models/rnan.jaxexport").read_bytes() == blob
    assert sorted(os.listdir(tmp_path)) == ["home"]


def test_convert_takes_a_bfloat16_state_dict_and_refuses_another_mean(torch_rnan):
    import torch

    from rnan_jax.convert import from_torch_state_dict

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    torch.manual_seed(0)
    sd = torch_rnan(scale=2, c=8, n_groups=1, n_blocks=2, r=2).state_dict()
    rounded = from_torch_state_dict({k: v.bfloat16().float() for k, v in sd.items()}, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           from_torch_state_dict({k: v.bfloat16() for k, v in sd.items()}, config), rounded)
    other = {**sd, "mean": torch.tensor([0.5, 0.45, 0.4]).view(1, 3, 1, 1)}
    with pytest.raises(ValueError, match=r"mean is \(0\.5, 0\.45, 0\.4\), but config\.rgb_mean is \(0\.4488, "):
        from_torch_state_dict(other, config)
    params = from_torch_state_dict(other, RNANConfig(**{**config.__dict__, "rgb_mean": (0.5, 0.45, 0.4)}))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, from_torch_state_dict(sd, config))


def test_a_platform_string_and_a_float_size(params):
    """platforms="cpu" is the cpu platform (not the letters c, p, u: 'got c, p, u'); a size computed as a float
    (h / 2) is a ValueError naming fixed_size, not jax's TypeError about a ShapeDtypeStruct."""
    exported = export_model(params, TINY, platforms="cpu")
    assert exported.platforms == ("cpu",)
    assert export_model(params, TINY, platforms="cpu, cuda").platforms == ("cpu", "cuda")
    with pytest.raises(ValueError, match=r"fixed_size must be \(h, w\), both positive integers, got \(4\.5, 4\)"):
        export_model(params, TINY, platforms=("cpu",), fixed_size=(4.5, 4))
    exported = export_model(params, TINY, platforms=("cpu",), fixed_size=(np.int64(5), 4))
    assert str(exported.in_avals[0].shape) == "(b, 5, 4, 3)"


def test_a_platform_given_twice_is_lowered_once(params, tmp_path):
    """--platforms=cpu,cpu: the artifact lists cpu once (it listed ('cpu', 'cpu') and printed "cpu, cpu")."""
    assert export_model(params, TINY, platforms=("cpu", "cpu")).platforms == ("cpu",)
    assert export_model(params, TINY, platforms="cpu,cuda,cpu").platforms == ("cpu", "cuda")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--checkpoint=zoo:small_x2",
                           "--output=a.jaxexport", "--platforms=cpu,cpu"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("platforms cpu"), proc.stdout
    with open(tmp_path / "a.jaxexport", "rb") as f:
        assert jax.export.deserialize(bytearray(f.read())).platforms == ("cpu",)


_REPLICATED = """
import jax, numpy as np
from rnan_jax import RNANConfig, apply, init
from rnan_jax.export import export_model
config = RNANConfig(scale=3, features=8, num_groups=2, num_blocks=2, block_interval=2, gc_reduction=2)
params = init(jax.random.key(0), config)
mesh = jax.make_mesh((4,), ("data",))  # explicit axes, jax.make_mesh's default
replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
exported = jax.export.deserialize(export_model(replicated, config, platforms=("cpu",)).serialize())
lr = np.random.default_rng(3).random((3, 5, 7, 3), np.float32)
print("devices", jax.device_count(), "difference", float(np.abs(np.asarray(exported.call(lr))
                                                                - np.asarray(apply(params, lr, config=config))).max()))
"""


def test_parameters_replicated_over_a_mesh_export():
    """Parameters as a multi-device session holds them, replicated over jax.make_mesh's mesh, failed the export with
    jax's "Length of device assignment 1 is not equal to the size of the mesh 4" and its traceback."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _REPLICATED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    devices, difference = proc.stdout.split()[1::2]
    assert devices == "4" and float(difference) < 1e-5, proc.stdout


def test_export_says_which_parameters_auto_chose(tmp_path):
    """--which auto (the default) exported the EMA of a run trained with one, else the newest parameters, and the
    line it printed did not say which; evaluate's report says `Scored: --checkpoint RUN --which ema`."""
    from test_zoo import _save_steps

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
    ema = _save_steps(tmp_path / "run" / "checkpoints", {4: 1}, config)[4][1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--checkpoint",
                           str(tmp_path / "run"), "--output", str(tmp_path / "m.jax"), "--platforms", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {tmp_path / 'm.jax'} (") and proc.stdout.count("\n") == 1
    assert f" of --checkpoint {tmp_path / 'run'} --which ema (step 4): x2, " in proc.stdout, proc.stdout
    exported = jax.export.deserialize(bytearray((tmp_path / "m.jax").read_bytes()))
    lr = np.random.default_rng(0).random((1, 5, 6, 3), np.float32)
    np.testing.assert_allclose(np.asarray(exported.call(lr)), np.asarray(apply(ema, lr, config=config)), atol=1e-5)


def test_export_names_the_step_it_read(tmp_path):
    """The line named `--which best` alone, though best/'s step is not the newest (nor is a live run's newest the one
    it was when the command was typed): it names the step read, as evaluate's report does."""
    from test_zoo import _save_steps

    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
    _save_steps(tmp_path / "run" / "checkpoints", {4: 1, 8: 2}, config)
    best = _save_steps(tmp_path / "run" / "best", {4: 3}, config)[4][1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--checkpoint",
                           str(tmp_path / "run"), "--which", "best", "--output", str(tmp_path / "m.jax"),
                           "--platforms", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f" of --checkpoint {tmp_path / 'run'} --which best (step 4): x2, " in proc.stdout, proc.stdout
    exported = jax.export.deserialize(bytearray((tmp_path / "m.jax").read_bytes()))
    lr = np.random.default_rng(0).random((1, 5, 6, 3), np.float32)
    np.testing.assert_allclose(np.asarray(exported.call(lr)), np.asarray(apply(best, lr, config=config)), atol=1e-5)


def test_the_cli_s_fixed_size_is_h_w_and_its_dtype_is_the_artifact_s(tmp_path, params):
    """--fixed_size H,W pins h = H, w = W (an artifact for 6x4 inputs refuses 4x6 ones), and --dtype bfloat16 is the
    compute dtype of the artifact (input and output stay float32): its numbers are apply's in bfloat16, not float32;
    --platforms are the artifact's."""
    from rnan_jax import zoo

    model = str(tmp_path / "tiny.msgpack")
    zoo.write(model, params, TINY)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), "--checkpoint", model,
                           "--output", str(tmp_path / "m.jax"), "--platforms", "cpu,tpu", "--fixed_size", "6,4",
                           "--dtype", "bfloat16"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.endswith(": x3, input float32[b,6,4,3], output float32[b,18,12,3], platforms cpu, tpu\n"), \
        proc.stdout
    exported = jax.export.deserialize(bytearray((tmp_path / "m.jax").read_bytes()))
    assert str(exported.in_avals[0].shape) == "(b, 6, 4, 3)" and exported.platforms == ("cpu", "tpu")
    lr = np.random.default_rng(4).random((2, 6, 4, 3), np.float32)
    sr = np.asarray(exported.call(lr))
    assert sr.dtype == np.float32 and sr.shape == (2, 18, 12, 3)
    in_float32 = np.asarray(apply(params, lr, config=TINY))
    in_bfloat16 = np.asarray(apply(params, lr, config=TINY, dtype="bfloat16"), np.float32)
    assert np.abs(sr - in_float32).max() > 1e-4  # bfloat16's rounding shows
    np.testing.assert_allclose(sr, in_bfloat16, atol=1e-2)
    with pytest.raises(ValueError, match="shape"):
        exported.call(lr.transpose(0, 2, 1, 3))


def test_export_model_computes_in_the_dtype_asked_for(params):
    """export_model(dtype="bfloat16") (and a config of dtype bfloat16) lowers the bfloat16 network: the artifact was
    float32's whatever dtype said if the argument were dropped on its way to apply."""
    lr = np.random.default_rng(5).random((1, 5, 6, 3), np.float32)
    in_float32 = np.asarray(apply(params, lr, config=TINY))
    in_bfloat16 = np.asarray(apply(params, lr, config=TINY, dtype="bfloat16"), np.float32)
    bf16_config = RNANConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
    for exported in (export_model(params, TINY, platforms="cpu", dtype="bfloat16"),
                     export_model(params, bf16_config, platforms="cpu")):
        assert str(exported.out_avals[0]) == "float32[b,3*h,3*w,3]"
        sr = np.asarray(exported.call(lr))
        assert np.abs(sr - in_float32).max() > 1e-4
        np.testing.assert_allclose(sr, in_bfloat16, atol=1e-2)
    exported = export_model(params, bf16_config, platforms="cpu", dtype="float32")  # dtype overrides the config's
    np.testing.assert_allclose(np.asarray(exported.call(lr)), in_float32, atol=1e-5)


def test_figures_compare_crops_the_box_at_x_y_and_takes_one_flush_with_the_image_s_edges(tmp_path, monkeypatch):
    """(Figures, rnan_jax/figures.py.) --box x,y,size is the region of columns x..x+size-1 and rows y..y+size-1: the
    box drawn on HR and each panel's crop of HR and of the upscaled image are that region, and a box that ends on the
    image's last column or row fits (x + size == w)."""
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[figures]')")
    import matplotlib.axes
    from PIL import Image

    from rnan_jax import benchmark_sets, degrade, figures
    from rnan_jax.upscalers import bicubic_upscaler

    yy, xx = np.mgrid[0:40, 0:48]
    hr = np.stack([xx * 5, yy * 6, (xx + yy) % 7 * 30], -1).astype(np.uint8)  # each pixel says where it is
    folder = tmp_path / "benchmark" / "Mine" / "HR"
    folder.mkdir(parents=True)
    Image.fromarray(hr).save(folder / "pic.png")
    shown = []
    imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, image, *a, **k: (shown.append(np.asarray(image)), imshow(self, image, *a, **k))[1])
    boxes = []
    add_patch = matplotlib.axes.Axes.add_patch
    monkeypatch.setattr(matplotlib.axes.Axes, "add_patch",
                        lambda self, patch: (boxes.append((patch.get_xy(), patch.get_width(), patch.get_height())),
                                             add_patch(self, patch))[1])
    figures.comparison({"Bicubic": bicubic_upscaler}, "Mine/pic", (32, 24, 16), str(tmp_path / "fig.png"), scale=2,
                       data_dir=str(tmp_path))
    assert len(shown) == 3 and os.path.isfile(tmp_path / "fig.png")
    assert boxes == [((32, 24), 16, 16)]  # the red box drawn on HR: matplotlib's (x, y) is (column, row)
    np.testing.assert_array_equal(shown[0], hr)
    np.testing.assert_array_equal(shown[1], hr[24:40, 32:48])
    bicubic = degrade.imresize(degrade.imresize(hr, 1 / 2), 2)  # the LR an HR without LR_bicubic/ is scored from
    np.testing.assert_array_equal(bicubic, bicubic_upscaler(benchmark_sets.make_pair("Mine", str(folder / "pic.png"),
                                                                                      hr, 2)))
    np.testing.assert_array_equal(shown[2], bicubic[24:40, 32:48])
    with pytest.raises(figures.FigureError, match=r"--box 33,24,16 does not fit in Mine/pic \(48x40 after cropping"):
        figures.comparison({"Bicubic": bicubic_upscaler}, "Mine/pic", (33, 24, 16), str(tmp_path / "f.png"), scale=2,
                           data_dir=str(tmp_path))


def test_figures_curve_orders_the_validation_records_by_step(tmp_path):
    """(Figures.) A run resumed from an earlier step by a trainer that wrote no {"resumed": true} line logs steps below
    ones already there: the curve's points are in step order (a line going back and forth otherwise), each step with
    its own PSNR, the repeat's value winning; with the line, the steps after the one resumed from are dropped."""
    from rnan_jax import figures

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 100, "val/psnr": 30.0}, {"step": 300, "val/psnr": 32.0, "val/bicubic_psnr": 29.5},
               {"step": 200, "val/psnr": 31.0}, {"step": 250, "train/loss": 0.2}, {"step": 150, "val/psnr": 30.5},
               {"step": 300, "val/psnr": 32.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert figures.read_validation(str(path)) == ([100, 150, 200, 300], [30.0, 30.5, 31.0, 32.5], 29.5)
    # the trainer's {"resumed": true} line at step 200: steps after it belong to the trajectory the resume discarded
    records = [{"step": 100, "val/psnr": 30.0}, {"step": 200, "val/psnr": 31.0}, {"step": 300, "val/psnr": 32.0},
               {"step": 200, "resumed": True}, {"step": 250, "val/psnr": 31.2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert figures.read_validation(str(path)) == ([100, 200, 250], [30.0, 31.0, 31.2], None)


def test_figures_curve_of_a_step_s_params_folder_names_the_workdir(tmp_path, capsys):
    """(Figures.) --workdir RUN/checkpoints/100/params, three levels inside the run (a step's parameters, the folder a
    file browser shows), names RUN as the workdir to give, as RUN/checkpoints and RUN/best/100 do."""
    from rnan_jax import figures

    run = tmp_path / "x2"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "metrics.jsonl").write_text('{"step": 100, "val/psnr": 30.5}\n')
    given = run / "checkpoints" / "100" / "params"
    given.mkdir(parents=True)
    assert figures.main(["curve", "--workdir", str(given), "--output", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err.endswith(f": {given} is inside the training workdir {run}; give --workdir {run}\n")
    assert not os.path.exists(tmp_path / "c.png")


def test_zoo_file_stores_float32_parameters_and_a_float32_compute_dtype(tmp_path, params):
    """(rnan_jax/zoo.) zoo.write stores the config with dtype float32 whatever the run computed in (a reader that
    takes the file's config as it is, an earlier rnan_jax among them, computed a bfloat16 run's file in bfloat16
    without a word), and the parameters as float32 numbers, bit for bit."""
    from flax import serialization

    from rnan_jax import zoo

    path = tmp_path / "m.msgpack"
    bf16_config = RNANConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
    assert zoo.write(str(path), params, bf16_config, {"step": 7}) == path.stat().st_size
    record = serialization.msgpack_restore(path.read_bytes())
    assert record["config"]["dtype"] == "float32" and record["config"]["scale"] == 3
    assert record["meta"] == {"step": 7}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32)),
                           record["params"], params)
    _, config, meta = zoo.read(str(path))
    assert config == TINY and meta == {"step": 7}


def test_zoo_record_sha256_is_checked_at_once_in_the_process_that_recorded_it(tmp_path, monkeypatch, params):
    """(rnan_jax/zoo.) record_sha256 into the package's own folder (tools/make_zoo.py in a checkout) updates the hashes
    this process checks: the model just recorded loads as zoo:NAME, and a damaged copy of it is refused; with the
    in-memory table left stale it loaded unchecked."""
    import importlib.resources
    import pathlib

    from rnan_jax import zoo

    package = tmp_path / "zoo_package"  # stands for rnan_jax/zoo, which the tests must not write to
    package.mkdir()
    files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files",
                        lambda name: pathlib.Path(package) if name == zoo.__name__ else files(name))
    monkeypatch.setattr(zoo, "SHA256", {})
    path = package / "mine_x3.msgpack"
    zoo.write(str(path), params, TINY)
    assert zoo.record_sha256("mine_x3", str(path)) == str(package / "sha256.json")
    assert json.loads((package / "sha256.json").read_text()) == zoo.SHA256 and list(zoo.SHA256) == ["mine_x3"]
    loaded, config = zoo.load("zoo:mine_x3")
    assert config == TINY
    np.testing.assert_array_equal(loaded["tail"]["bias"], params["tail"]["bias"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="damaged file"):
        zoo.load("zoo:mine_x3")


def test_figures_reference_splits_name_and_db_at_the_last_equals_sign(tmp_path, monkeypatch, capsys):
    """(Figures.) --reference NAME=DB: a name holding "=" ('RCAN (r=16)=38.27') keeps it, the number after the last
    one is the line's dB."""
    from rnan_jax import figures

    (tmp_path / "metrics.jsonl").write_text('{"step": 100, "val/psnr": 30.5}\n')
    drawn = {}
    monkeypatch.setattr(figures, "training_curve",
                        lambda workdir, output, *, title, references: drawn.update(references))
    assert figures.main(["curve", "--workdir", str(tmp_path / "metrics.jsonl"), "--output", str(tmp_path / "c.png"),
                         "--reference", "RCAN (r=16)=38.27", "--reference", "FSRCNN=37.05"]) == 0, capsys.readouterr()
    assert drawn == {"RCAN (r=16)": 38.27, "FSRCNN": 37.05}
