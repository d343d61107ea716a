"""rnan_jax.export: the serialized artifact reproduces `apply` for any batch and size, without rnan_jax."""
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
