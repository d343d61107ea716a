"""rnan_jax.env.reuse_freed_memory: a freed large block is reused, not mapped and faulted in again."""
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, resource, sys
from rnan_jax import env
applied = env.reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
for _ in range(3):  # what XLA:CPU does each step: allocate the temp buffer, touch every page, free it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, faults[-1])
"""


def _probe(**environ):
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **environ}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_freed_256_mib_block_is_reused_without_page_faults():
    applied, faults = _probe()
    if not applied:
        pytest.skip("not glibc")
    system_applied, system_faults = _probe(RNAN_JAX_MALLOC="system")
    assert not system_applied
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert system_faults > pages // 2  # glibc's default: a fresh mmap, every page faulted in again
    assert faults < pages // 100  # reused: (almost) no new page


def test_after_the_backend_started_it_changes_nothing():
    import jax

    from rnan_jax import env

    jax.numpy.ones(1).block_until_ready()
    assert env.reuse_freed_memory() is False


def test_distributed_flags_that_cannot_describe_a_run_are_named_in_one_line():
    from rnan_jax.env import distributed_flags_problem, initialize_distributed

    assert distributed_flags_problem(None, None, None) is None  # left to JAX's cluster detection (a TPU pod)
    assert distributed_flags_problem("10.0.0.1:1234", 2, 1) is None
    assert distributed_flags_problem(None, 2, 0) == (
        "--coordinator_address missing: off a TPU pod slice, --distributed takes --coordinator_address=HOST:PORT "
        "(process 0's), --num_processes=N and --process_id=I, the same on every process but I")
    assert distributed_flags_problem("10.0.0.1", 2, 0) == (
        "--coordinator_address '10.0.0.1' is not HOST:PORT (process 0's host, a free port)")
    assert distributed_flags_problem("10.0.0.1:1234", 0, 0) == "--num_processes 0: at least 1"
    assert distributed_flags_problem("10.0.0.1:1234", 2, -1) == (
        "--process_id -1 is not one of the 2 processes' indices (0 to 1)")
    with pytest.raises(ValueError, match="^--process_id 2 is not one of the 2 processes' indices \\(0 to 1\\)$"):
        initialize_distributed("127.0.0.1:1234", 2, 2)  # refused before JAX is asked (its error: a traceback)


@pytest.fixture
def cache_settings():
    """Restores JAX's compilation-cache settings that enable_compilation_cache changes."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    yield jax.config
    for name, value in saved.items():
        jax.config.update(name, value)


def test_a_compilation_cache_that_cannot_be_written_is_a_note_not_the_end_of_the_run(tmp_path, capsys, monkeypatch,
                                                                                   cache_settings):
    """It stopped train, evaluate and upscale with "[Errno 2] No such file or directory"; a gs:// cache left a
    local "gs:" folder behind."""
    from rnan_jax import env

    before = cache_settings.jax_compilation_cache_dir
    (tmp_path / "file").write_text("x")
    assert env.enable_compilation_cache(str(tmp_path / "file" / "xla")) is None
    assert capsys.readouterr().err == (
        f"note: the persistent compilation cache is off: cannot write in {tmp_path / 'file' / 'xla'} (Not a "
        "directory); point RNAN_JAX_CACHE at a writable folder\n")
    assert cache_settings.jax_compilation_cache_dir == before
    monkeypatch.chdir(tmp_path)
    assert env.enable_compilation_cache("gs://bucket/xla") == "gs://bucket/xla"
    assert sorted(os.listdir(tmp_path)) == ["file"] and cache_settings.jax_compilation_cache_dir == "gs://bucket/xla"


def test_a_tilde_in_a_folder_variable_is_the_home_folder(tmp_path, monkeypatch, cache_settings):
    """RNAN_JAX_CACHE="~/xla" (quoted, so no shell expanded it) made a folder named "~" in the current one."""
    from rnan_jax import env

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNAN_JAX_CACHE", "~/xla")
    monkeypatch.setenv("RNAN_DATA_DIR", "~/data")
    assert env.enable_compilation_cache() == str(tmp_path / "home" / "xla")
    assert env.default_data_dir() == str(tmp_path / "home" / "data")
    assert sorted(os.listdir(tmp_path)) == ["home"] and os.listdir(tmp_path / "home") == ["xla"]


@pytest.fixture
def no_cache_variables(monkeypatch):
    for name in ("RNAN_JAX_CACHE", "RNAN_CACHE_DIR", "RNAN_JAX_NATIVE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_a_home_folder_the_caches_go_to_a_private_temp_folder_not_into_the_current_one(
        tmp_path, no_cache_variables, cache_settings):
    """HOME unset and a user id /etc/passwd does not know (`docker run --user 1234`): "~" stayed unexpanded and every
    run made ./~/.cache/rnan_jax/{xla,native} in the current folder; an empty HOME made them in /.cache."""
    import pwd
    import tempfile

    from rnan_jax import env

    monkeypatch = no_cache_variables
    monkeypatch.delenv("HOME")

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(env, "_PRIVATE", [], raising=False)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    private = tmp_path / "tmp" / f"rnan_jax-{os.getuid()}"
    assert env.cache_folder("native", "RNAN_JAX_NATIVE_CACHE") == str(private / "rnan_jax" / "native")
    assert env.enable_compilation_cache() == str(private / "rnan_jax" / "xla")
    assert os.stat(private).st_mode & 0o777 == 0o700 and os.listdir(tmp_path / "cwd") == []

    # a folder of that name that others can write into is not used (a library loaded from it could be theirs)
    monkeypatch.setattr(env, "_PRIVATE", [], raising=False)
    os.chmod(private, 0o777)
    other = env.cache_folder("xla", "RNAN_JAX_CACHE")
    assert not other.startswith(str(private) + os.sep) and other.startswith(str(tmp_path / "tmp" / "rnan_jax-"))
    assert os.stat(os.path.dirname(os.path.dirname(other))).st_mode & 0o777 == 0o700

    # HOME="" (an unset variable in `HOME=$H cmd`) is no home either: the user's passwd entry's, not /.cache
    monkeypatch.setenv("HOME", "")
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: type("Entry", (), {"pw_dir": str(tmp_path / "h")})())
    assert env.cache_folder("data", "RNAN_CACHE_DIR") == str(tmp_path / "h" / ".cache" / "rnan_jax" / "data")


def test_xdg_cache_home_is_where_the_caches_go_when_it_is_set(tmp_path, no_cache_variables):
    """$XDG_CACHE_HOME (set where the home folder is small or read-only) was ignored: the compilation cache was off
    and the native kernels not built (a run at half speed) while it named a writable folder."""
    from rnan_jax import env

    monkeypatch = no_cache_variables
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.cache_folder("xla", "RNAN_JAX_CACHE") == str(tmp_path / "xdg" / "rnan_jax" / "xla")
    monkeypatch.setenv("RNAN_JAX_CACHE", str(tmp_path / "mine"))  # the variable of its own still comes first
    assert env.cache_folder("xla", "RNAN_JAX_CACHE") == str(tmp_path / "mine")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec: a relative value is ignored
    assert env.cache_folder("native", "RNAN_JAX_NATIVE_CACHE") == str(
        tmp_path / "home" / ".cache" / "rnan_jax" / "native")


def test_jax_enable_x64_is_turned_off_with_a_note_by_the_entry_points_preparation():
    """JAX_ENABLE_X64=1 in the environment made the demo train to other numbers (26.596 dB after 200 steps where
    float32 gives 26.682) without a word."""
    probe = ("import jax, jax.numpy as jnp\nfrom rnan_jax import env\nenv.prepare_process()\n"
             "print(jnp.arange(3).dtype, jnp.zeros(2, float).dtype, jax.random.uniform(jax.random.key(0), ()).dtype)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["int32", "float32", "float32"]
    assert [x for x in r.stderr.splitlines() if "libtpu" not in x] == [
        "note: JAX_ENABLE_X64 is ignored: rnan_jax computes in float32 (with 64-bit types its numbers differ from "
        "the float32 ones it documents)"]
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "0"})
    assert (r.returncode, r.stdout.split(), "JAX_ENABLE_X64" in r.stderr) == (0, ["int32", "float32", "float32"], False)


def test_jax_disable_jit_left_in_the_environment_is_a_note_at_start_up():
    """JAX_DISABLE_JIT=1, left in a shell from debugging, trained the tiny test model at 0.4 steps/s where it trains
    at 250, while the trainer said "compiling the train step", without a word of why."""
    probe = "from rnan_jax import env\nenv.prepare_process()\nimport jax\nprint(jax.config.jax_disable_jit)"
    notes = {}
    for value in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_JIT": value})
        assert r.returncode == 0, r.stderr
        notes[r.stdout.strip()] = [x for x in r.stderr.splitlines() if "libtpu" not in x]
    assert notes == {"True": ["note: JAX_DISABLE_JIT is set: JAX compiles nothing and runs each operation on its own, "
                              "many times slower (unset it unless you are debugging)"], "False": []}


_CACHED_RUN = r"""
import resource, sys
import jax, jax.numpy as jnp
from rnan_jax import env
if len(sys.argv) > 2:  # a full disk (or quota): a write past this many bytes fails
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
env.enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(jax.jit(lambda x: jnp.sin(x) @ x.T + 1)(jnp.ones((4, 4)))[0, 0])
"""


def test_a_compilation_cache_entry_cut_short_is_not_left_to_fail_every_later_run(tmp_path):
    """JAX wrote an entry straight to its name and never replaced one that was there: a write that a full disk
    (or a run killed meanwhile) cut short left a truncated entry, and every later run, of every host sharing the
    folder, warned "Error reading persistent compilation cache entry ... incomplete or truncated stream" and
    compiled again, for good. The entry is now written through a partial file, and one found cut short again."""
    import numpy as np
    from jax._src import compilation_cache

    cache = tmp_path / "xla"

    def run(*limit: str) -> str:
        r = subprocess.run([sys.executable, "-c", _CACHED_RUN, str(cache), *limit], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert r.returncode == 0 and abs(float(r.stdout) - (4 * np.sin(1) + 1)) < 1e-5, r.stderr[-2000:]
        return r.stderr

    def entries() -> dict[str, bytes]:
        return {name: (cache / name).read_bytes() for name in os.listdir(cache)}

    assert "Error writing persistent compilation cache entry" in run("1000")  # each entry over 1000 bytes
    assert entries() == {}  # nothing cut short, no partial file left
    assert "Error reading persistent compilation cache entry" not in run()
    written = entries()
    assert len(written) > 1 and all(name.endswith("-cache") for name in written)
    for value in written.values():
        compilation_cache.decompress_executable(value)  # whole
    name = sorted(written)[0]
    (cache / name).write_bytes(written[name][:500])  # as a cut-short write left it
    assert "Error reading persistent compilation cache entry" in run()
    compilation_cache.decompress_executable((cache / name).read_bytes())  # written again
    assert "Error reading persistent compilation cache entry" not in run()


def test_a_data_dir_flag_wins_over_rnan_data_dir_which_wins_over_the_default(tmp_path, monkeypatch):
    """--data_dir names the data the run scores (evaluate, figures, the tools); RNAN_DATA_DIR, left in a shell from
    another project, must not replace it (the benchmark numbers would be those of other images), and the default
    beside the repository is used only without either."""
    from rnan_jax import env

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RNAN_DATA_DIR", str(tmp_path / "elsewhere"))
    assert env.default_data_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert env.default_data_dir("~/mine") == str(tmp_path / "home" / "mine")
    assert env.default_data_dir() == env.default_data_dir("") == str(tmp_path / "elsewhere")
    monkeypatch.delenv("RNAN_DATA_DIR")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(env.__file__)))
    assert env.default_data_dir() == os.path.join(os.path.dirname(repo), "shared", "data")


def test_a_coordinator_port_outside_1_to_65535_is_refused():
    """Port 0 asks the OS for any free port, which the other processes cannot know; 65536 is no port."""
    from rnan_jax.env import distributed_flags_problem

    for port in (0, 65536):
        assert distributed_flags_problem(f"10.0.0.1:{port}", 2, 0) == (
            f"--coordinator_address '10.0.0.1:{port}' is not HOST:PORT (process 0's host, a free port)")
    assert distributed_flags_problem("10.0.0.1:1", 2, 0) is None
    assert distributed_flags_problem("10.0.0.1:65535", 2, 0) is None
