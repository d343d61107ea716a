"""rnan_jax.native: the kernel gradients built from kernels/*.cc and called through jax.ffi."""
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnan_jax import convs, native

needs_compiler = pytest.mark.skipif(native.compiler() is None or not native.enabled_by_environment(),
                                    reason="no C++ compiler (or RNAN_JAX_NATIVE=0): the pure-JAX gradient is used")


def _reference(x, g):
    """float64 dk[i, j, 0, c] = sum x[b, h+i-1, w+j-1, c] g[b, h, w, c], x zero outside."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    _, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.stack([np.einsum("bhwc,bhwc->c", xp[:, i:i + h, j:j + w], g)
                     for i in range(3) for j in range(3)]).reshape(3, 3, 1, c)


@needs_compiler
def test_native_kernel_gradient_matches_float64():
    assert native.available()
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 7, 5, 11))  # odd sizes: every border case, a channel count off the vector width
    g = jax.random.normal(kg, (3, 7, 5, 11))
    got = np.asarray(jax.jit(native.depthwise_kernel_grad)(x, g))
    ref = _reference(x, g)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(convs._shifted_kernel_grad(x, g)), ref, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_depthwise_gradients_through_the_native_kernel_equal_autodiff_of_the_grouped_conv():
    assert native.available()
    kx, kk, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 9, 8, 16))
    kernel = jax.random.normal(kk, (3, 3, 1, 16))
    g = jax.random.normal(kg, (2, 9, 8, 16))

    def grouped(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=16)

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k) * g)

    dx, dk = jax.jit(jax.grad(loss(convs.shifted_depthwise), argnums=(0, 1)))(x, kernel)
    rx, rk = jax.grad(loss(grouped), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(dx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk, rk, rtol=1e-4, atol=1e-4)
    # under vmap (the kernel is called once per mapped element)
    def one(xi, gi, k):
        return jax.grad(lambda k: jnp.sum(convs.shifted_depthwise(xi, k) * gi))(k)

    dks = jax.vmap(one, in_axes=(0, 0, None))(x[:, None], g[:, None], kernel)
    np.testing.assert_allclose(dks.sum(0), rk, rtol=1e-4, atol=1e-4)


def _conv_reference(x, g, size):
    """float64 dk[i, j, ci, co] = sum x[b, h+i-size//2, w+j-size//2, ci] g[b, h, w, co], x zero outside."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    _, h, w, _ = x.shape
    p = size // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return np.stack([np.stack([np.einsum("bhwc,bhwd->cd", xp[:, i:i + h, j:j + w], g) for j in range(size)])
                     for i in range(size)])


# (x shape, output channels): the output channels as the vector axis (16, 32 and 48: one, two and three vectors;
# 13 and 3 input channels: register blocks of every height left over), and the input channels as the vector
# axis where the output has 3 (the tail conv) or 5; odd image sizes for every border case. Both channel counts
# multiples of 16 take Winograd's form for 3x3 (kernels/winograd.cc): odd sizes, 48 x 48 (register blocks of 12
# input channels, vector blocks of 2 and 1), a 1 x 1 image, and 3 x 15 x 16 tiles (panels across images); images
# of width 0 (dk = 0: the tile height divided by the width killed the process with SIGFPE)
@pytest.mark.parametrize("size", [3, 1])
@pytest.mark.parametrize("x_shape,features", [((3, 7, 5, 13), 48), ((2, 5, 9, 32), 3), ((1, 1, 1, 3), 16),
                                              ((2, 6, 4, 29), 32), ((1, 3, 2, 16), 5), ((2, 7, 9, 16), 32),
                                              ((3, 5, 6, 48), 48), ((1, 1, 1, 16), 16), ((3, 29, 32, 32), 16),
                                              ((2, 3, 0, 3), 16), ((1, 4, 0, 32), 3)])
@needs_compiler
def test_native_conv_kernel_gradient_matches_float64(x_shape, features, size):
    assert native.available() and native.conv_supported(x_shape[-1], features)
    kx, kg = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, x_shape)
    g = jax.random.normal(kg, (*x_shape[:3], features))
    got = np.asarray(jax.jit(native.conv_kernel_grad, static_argnums=2)(x, g, size))
    ref = _conv_reference(x, g, size)
    # sums over up to 2,784 pixels: the Winograd form rounds to ~3-5e-7 of max |dk| (XLA's own conv: 0.4-2.6e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=max(1e-5, 1e-6 * np.abs(ref).max()))


def test_native_conv_support_needs_one_channel_count_a_multiple_of_16():
    assert native.conv_supported(3, 32) and native.conv_supported(32, 3) and native.conv_supported(48, 7)
    assert not native.conv_supported(3, 3) and not native.conv_supported(8, 24)


@needs_compiler
def test_native_conv3x3_matches_float64():
    assert native.available() and native.conv3x3_narrow(3, 32) and not native.conv3x3_narrow(16, 32)
    kx, kk = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (2, 7, 29, 5))  # a row of 29 pixels: register blocks of 12, 12 and 5
    k = jax.random.normal(kk, (3, 3, 5, 48))  # 48 output channels: vector blocks of 2 and 1
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64)
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + 7, j:j + 29], k64[i, j]) for i in range(3) for j in range(3))
    np.testing.assert_allclose(np.asarray(jax.jit(native.conv3x3)(x, k)), ref, rtol=1e-5, atol=1e-5)


def _conv3x3_reference(x, k):
    """float64 y[b, h, w, co] = sum x[b, h+i-1, w+j-1, ci] k[i, j, ci, co], x zero outside."""
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64)
    _, h, w, _ = x64.shape
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + h, j:j + w], k64[i, j]) for i in range(3) for j in range(3))


# (x shape, output channels): odd heights and widths (tiles half outside the image), a 1 x 1 image, 48 output
# channels (vector blocks of 2 and 1), 48 input channels, panels of tiles that span images and end part-full, and
# 91 x 91 = 8,281 tiles, above the size where the conv is split over the pool's threads
@pytest.mark.parametrize("x_shape,features", [((2, 7, 9, 16), 32), ((1, 1, 1, 16), 16), ((3, 5, 6, 48), 48),
                                              ((1, 182, 181, 16), 16)])
@needs_compiler
def test_native_winograd_conv3x3_matches_float64(x_shape, features):
    assert native.available() and native.winograd_supported(x_shape[-1], features)
    assert not native.winograd_supported(3, 32) and not native.winograd_supported(32, 3)
    kx, kk = jax.random.split(jax.random.key(6))
    x = jax.random.normal(kx, x_shape)
    k = jax.random.normal(kk, (3, 3, x_shape[-1], features))
    ref = _conv3x3_reference(x, k)
    got = np.asarray(jax.jit(native.conv3x3_winograd)(x, k))
    # F(2x2, 3x3) rounds to ~1.5-4.7e-7 of max |y| (XLA's direct conv: 2.1-8.6e-7); a wrong tap errs by ~0.1
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


# (in, out) channels: 16 -> 3 (the tail conv: native input gradient), 3 -> 16 (the head: native forward), 16 -> 32
# (the body's convs: Winograd forward and input gradient)
@pytest.mark.parametrize("channels", [(16, 3), (3, 16), (16, 32)])
@pytest.mark.parametrize("size", [3, 1])
@needs_compiler
def test_conv_gradients_through_the_native_kernel_equal_autodiff(size, channels):
    assert native.available()
    ci, co = channels
    kx, kk, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 9, 8, ci))
    kernel = jax.random.normal(kk, (size, size, ci, co))
    g = jax.random.normal(kg, (2, 9, 8, co))

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k) * g)

    def reference(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y = jax.jit(convs.native_conv)(x, kernel)
    np.testing.assert_allclose(y, reference(x, kernel), rtol=1e-5, atol=1e-5)
    dx, dk = jax.jit(jax.grad(loss(convs.native_conv), argnums=(0, 1)))(x, kernel)
    rx, rk = jax.grad(loss(reference), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, rk, rtol=1e-4, atol=1e-4)
    # under vmap (the kernel is called once per mapped element)
    dks = jax.vmap(lambda xi, gi: jax.grad(lambda k: jnp.sum(convs.native_conv(xi, k) * gi))(kernel))(
        x[:, None], g[:, None])
    np.testing.assert_allclose(dks.sum(0), rk, rtol=1e-4, atol=1e-4)


def test_the_conv_modules_keep_nn_conv_parameters():
    x = jnp.ones((1, 5, 5, 16))
    for module, size in ((convs.Conv3x3(3, 16), 3), (convs.PointwiseConv(3, 16), 1)):
        params = module.init(jax.random.key(4), x)
        assert jax.tree_util.tree_map(jnp.shape, params) == {"params": {"kernel": (size, size, 16, 3), "bias": (3,)}}
        reference = nn.Conv(3, (size, size), padding="SAME").apply(params, x)
        np.testing.assert_allclose(module.apply(params, x), reference, rtol=1e-5, atol=1e-5)


_PROBE = """
import jax, jax.numpy as jnp
from rnan_jax import convs, native
x = jnp.ones((1, 4, 4, 2))
dk = jax.grad(lambda k: convs.shifted_depthwise(x, k).sum())(jnp.ones((3, 3, 1, 2)))
print(native.available(), float(dk[1, 1, 0, 0]), float(dk[0, 0, 0, 0]))
"""


@pytest.mark.parametrize("environ", [{"CXX": "/nonexistent/c++"}, {native.NATIVE_ENV: "0"}], ids=["no-compiler", "off"])
def test_without_the_native_kernel_the_gradient_stays_in_jax(environ, tmp_path):
    env = {**os.environ, **environ, native.NATIVE_CACHE_ENV: str(tmp_path)}  # no cached build to fall back on
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "16.0", "9.0"]  # centre tap: all 16 positions; corner: 3 x 3
    if "CXX" in environ:
        assert "native CPU kernels not built" in out.stderr


def test_cxx_is_split_as_a_shell_would_and_rnan_jax_native_takes_the_usual_words_for_off(monkeypatch, tmp_path):
    """CXX="ccache g++" (two words) was looked up as one program, not found, and the kernels were left off with
    "no C++ compiler found"; RNAN_JAX_NATIVE=false or off did not turn them off (only 0 did)."""
    wrapper = tmp_path / "ccache"
    wrapper.write_text("#!/bin/sh\nexec \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", f"{wrapper} c++ -O2")
    assert native.compiler() == [str(wrapper), "c++", "-O2"]
    monkeypatch.setenv("CXX", "/nonexistent/c++ -O2")
    assert native.compiler() is None
    for value, enabled in (("0", False), ("false", False), ("OFF", False), (" no ", False), ("1", True),
                           ("true", True), ("", True)):
        monkeypatch.setenv(native.NATIVE_ENV, value)
        assert native.enabled_by_environment() is enabled, value


@needs_compiler
def test_a_cached_library_cut_short_is_built_again(tmp_path, monkeypatch):
    """A library in the cache that a crash cut short is built again. Loaded as it was, half a library killed the
    process (dlopen mapped it: SIGBUS on the first page past its end) and an empty one left the kernels off."""
    assert native.available()
    real = native._build()  # cached: the compiler below "builds" by copying it
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo fake 1 && exit 0\n'
                   f'for a; do [ "$prev" = -o ] && cp "{real}" "$a"; prev="$a"; done\nexit 0\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv(native.NATIVE_CACHE_ENV, str(tmp_path / "cache"))
    size = os.path.getsize(real)
    path = native._build()
    assert os.path.getsize(path) == size
    for cut in (size // 2, 0):
        with open(path, "r+b") as f:
            f.truncate(cut)
        assert native._build() == path and os.path.getsize(path) == size


def _fake_compiler(tmp_path, real, write="cp"):
    """A compiler script that "builds" by writing the real cached library to its -o argument (`cp` or `cat`, into
    a file there already keeping its mode as GNU ld does) and logs each build; `--version` prints "fake 1" and
    the predefined macros (`-dM -E`) name the instruction set extensions in `$FAKE_ISA`."""
    cxx, log = tmp_path / "cxx", tmp_path / "builds.log"
    copy = f'cp "{real}" "$a"' if write == "cp" else f'cat "{real}" > "$a"'
    cxx.write_text(f'#!/bin/sh\nfor a; do [ "$a" = --version ] && echo fake 1 && exit 0; done\n'
                   f'for a; do [ "$a" = -dM ] && echo "#define __${{FAKE_ISA}}__ 1" && exit 0; done\n'
                   f'for a; do [ "$prev" = -o ] && {copy} && echo built >> "{log}"; prev="$a"; done\nexit 0\n')
    cxx.chmod(0o755)
    return cxx, log


@needs_compiler
def test_the_cache_key_holds_what_decides_the_binary(tmp_path, monkeypatch):
    """The key held the sources, `--version`, jax's version and /proc/cpuinfo's "model name" and "flags" lines:
    not $CXX's flags ("c++ -ffast-math" reused the plain build), not the extensions -march=native turns on where
    /proc/cpuinfo lists none (aarch64 names them "Features", macOS has no /proc/cpuinfo: a library built with
    SVE or AVX-512, loaded from a home folder shared with a CPU without them, dies of SIGILL), not the XLA FFI
    headers compiled in (jaxlib's, whose version can differ from jax's). Each now gives its own library, and the
    same conditions the same one, built once."""
    assert native.available()
    cxx, log = _fake_compiler(tmp_path, native._build())
    monkeypatch.setenv(native.NATIVE_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_ISA", "AVX2")

    def builds():
        return len(log.read_text().splitlines()) if log.exists() else 0

    first = native._build()
    assert native._build() == first and builds() == 1  # built once, then reused
    monkeypatch.setenv("FAKE_ISA", "AVX512F")  # the same /proc/cpuinfo, another CPU for the compiler
    paths = [native._build()]
    monkeypatch.setenv("FAKE_ISA", "AVX2")
    monkeypatch.setenv("CXX", f"{cxx} -ffast-math")
    paths.append(native._build())
    monkeypatch.setenv("CXX", str(cxx))
    headers = tmp_path / "include"
    shutil.copytree(jax.ffi.include_dir(), headers)
    with open(headers / "xla" / "ffi" / "api" / "ffi.h", "a") as f:
        f.write("\n// another jaxlib's FFI\n")
    with monkeypatch.context() as m:
        m.setattr(jax.ffi, "include_dir", lambda: str(headers))
        paths.append(native._build())
    assert len({first, *paths}) == 4 and builds() == 4
    assert native._build() == first and builds() == 4  # back to the first conditions: the first library
    assert all(os.path.getsize(p) == os.path.getsize(first) for p in paths)


@needs_compiler
def test_the_cached_library_is_readable_as_the_umask_allows(tmp_path, monkeypatch):
    """The build wrote into a file made beforehand by mkstemp (mode 0600), whose mode the linker kept (0711 with
    GNU ld): in a cache shared between users ($RNAN_JAX_NATIVE_CACHE), another user could not load it, compiled
    it again in every process, and with the folder's sticky bit could not replace it: kernels off ("Operation
    not permitted"), the step 1.9x slower."""
    assert native.available()
    cxx, _ = _fake_compiler(tmp_path, native._build(), write="cat")
    monkeypatch.setenv(native.NATIVE_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_ISA", "AVX2")
    before = os.umask(0o022)
    try:
        path = native._build()
    finally:
        os.umask(before)
    assert os.stat(path).st_mode & 0o777 == 0o644  # the fake's `cat` makes no executable; read by all
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # no temporary file left


@pytest.mark.parametrize("cxx, cause", [("false", "false exited with status 1"),
                                        ('c++ -O2 "', "no C++ compiler found (CXX='c++ -O2 \"'"),
                                        ("c++ -Dstd=nostd", "c++ exited with status 1: ")],
                         ids=["failing-program", "unclosed-quote", "compile-error"])
def test_a_failed_build_says_why_in_one_line_and_leaves_the_kernels_off(cxx, cause, tmp_path, monkeypatch, caplog):
    """A compiler whose `--version` failed silently gave "native CPU kernels not built ()"; a compile error, the
    last 500 characters of the compiler's stderr over many lines; an unclosed quote in $CXX, a ValueError
    traceback out of the first traced model."""
    if cxx.endswith("nostd") and shutil.which("c++") is None:
        pytest.skip("no C++ compiler to fail on the sources")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.NATIVE_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    monkeypatch.setenv("CXX", cxx)
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native.available() is False
    [record] = [r for r in caplog.records if r.name == native.__name__]
    message = record.getMessage()
    assert message.startswith(f"native CPU kernels not built ({cause}") and "\n" not in message, message
    assert message.endswith("XLA's convolutions and JAX's gradients are used instead")
    if cxx.endswith("nostd"):  # the first error, not the last lines of many
        assert "error: " in message
    assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


_RACE = """
import threading, time
from rnan_jax import native
out = {}
def ask(name):
    out[name] = native.available()
first = threading.Thread(target=ask, args=("first",))
first.start()
time.sleep(1)  # the first thread is building (the compiler takes 2 s)
ask("second")
first.join()
print(out["first"], out["second"])
"""


@needs_compiler
def test_a_thread_that_asks_while_another_builds_waits_for_the_kernels(tmp_path):
    """available() said False to a second thread while the first built the library (its _state already held
    "ok": False): the model that thread traced kept XLA's convolutions for good, 1.9x slower to train, and no
    line said so. The second thread now waits for the build."""
    assert native.available()
    cxx, log = _fake_compiler(tmp_path, native._build())
    slow = tmp_path / "slow-cxx"
    slow.write_text(f'#!/bin/sh\nfor a; do [ "$a" = -o ] && sleep 2; done\nexec "{cxx}" "$@"\n')
    slow.chmod(0o755)
    environ = {**os.environ, "CXX": str(slow), "FAKE_ISA": "RACE", native.NATIVE_CACHE_ENV: str(tmp_path / "cache"),
               native.NATIVE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, env=environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
    assert log.read_text().splitlines() == ["built"]  # built once


def test_a_cache_folder_that_cannot_be_written_names_the_variable_that_moves_it(tmp_path, monkeypatch, caplog):
    """With a read-only home (~/.cache not writable) the kernels were not built, and the warning gave the error
    alone: training ran at about half speed with nothing saying what to do."""
    def refused():
        raise PermissionError(13, "Permission denied", str(tmp_path / ".cache"))

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    monkeypatch.setattr(native, "_build", refused)
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native.available() is False
    [record] = [r for r in caplog.records if r.name == native.__name__]
    assert record.getMessage().startswith("native CPU kernels not built (")
    assert record.getMessage().endswith(f" (set {native.NATIVE_CACHE_ENV} to a writable folder); XLA's convolutions "
                                        "and JAX's gradients are used instead")


def test_setup_cfg_keeps_out_the_flax_releases_that_jax_0_11_breaks():
    """JAX 0.11 (Python 3.12 and later) removed jax.core.get_opaque_trace_state, which flax 0.12.2-0.12.6 call in
    every init: with one of those installed, `pip install -e . 'jax==0.11.*'` kept it (setup.cfg allowed it) and the
    first init was "AttributeError: jax.core.get_opaque_trace_state was deprecated in JAX v0.10.0 and removed in
    JAX v0.11.0". On Python 3.11, where jax stops at 0.10, the minimum stays tools/min_versions.txt's 0.12.2."""
    import configparser

    requirements = pytest.importorskip("packaging.requirements")
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
    flax = [r for r in map(requirements.Requirement, filter(str.strip, cfg["options"]["install_requires"].splitlines()))
            if r.name == "flax"]

    def allowed(version: str, python: str) -> bool:
        specs = [r.specifier for r in flax if r.marker is None or r.marker.evaluate({"python_version": python})]
        return len(specs) > 0 and all(s.contains(version) for s in specs)

    assert [allowed(v, "3.12") for v in ("0.12.2", "0.12.6", "0.12.7", "0.12.12")] == [False, False, True, True]
    assert not allowed("0.12.6", "3.13") and allowed("0.12.7", "3.13")
    assert allowed("0.12.2", "3.11")


@needs_compiler
def test_a_library_built_meanwhile_by_another_process_is_kept_not_renamed_over(tmp_path, monkeypatch):
    """Two hosts sharing the cache (an NFS home) that build the same library at once: the later one renamed its
    build over the one the first had already loaded, which on NFS deletes that file under the first host (its
    next page of the library read: "Stale file handle", SIGBUS, no Python error). The later build is now
    dropped where a whole library is there; one cut short is still replaced."""
    assert native.available()
    real = native._build()
    cxx = tmp_path / "cxx"
    # "builds" by copying the real library, once another process has put its own (marked at the end, where the
    # linker writes nothing) at the final name; with $CUT set, the other's is cut short
    cxx.write_text(f'#!/bin/sh\nfor a; do [ "$a" = --version ] && echo fake 1 && exit 0; done\n'
                   f'for a; do [ "$a" = -dM ] && echo "#define __OTHER__ 1" && exit 0; done\n'
                   f'for a; do if [ "$prev" = -o ]; then final="${{a%.*.*.tmp}}"\n'
                   f'  if [ -n "$CUT" ]; then head -c 1000 "{real}" > "$final.o"; else cp "{real}" "$final.o"; fi\n'
                   f'  printf OTHER >> "$final.o" && mv "$final.o" "$final" && cp "{real}" "$a"; fi\n'
                   f'prev="$a"; done\nexit 0\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv(native.NATIVE_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("CUT", raising=False)
    with open(real, "rb") as f:
        library = f.read()
    path = native._build()
    with open(path, "rb") as f:
        assert f.read() == library + b"OTHER"  # the other process's library, as it loaded it
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # ours removed
    os.remove(path)
    monkeypatch.setenv("CUT", "1")  # the other process's library cut short (a crash): ours replaces it
    assert native._build() == path
    with open(path, "rb") as f:
        assert f.read() == library
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]


def test_the_cache_key_changes_with_every_kernel_source_and_the_cpu(tmp_path, monkeypatch):
    """A library is reused only for the sources it was built from: an edited kernel (any .cc, or the header they
    share) or another CPU model gives another key, so the stale binary is never loaded for new code. Every file of
    kernels/ is hashed."""
    folder = os.path.join(os.path.dirname(native.__file__), "kernels")
    assert sorted(map(os.path.basename, native._SOURCES)) == sorted(os.listdir(folder))
    copies = []
    for name in native._SOURCES:
        copy = tmp_path / os.path.basename(name)
        shutil.copy(name, copy)
        copies.append(str(copy))
    monkeypatch.setattr(native, "_SOURCES", tuple(copies))
    cxx = [shutil.which("true")]  # `--version` and `-dM -E` print nothing: the key is the files' and the CPU's
    base = native._key(cxx)
    assert native._key(cxx) == base
    keys = set()
    for copy in copies:
        with open(copy, "rb") as f:
            text = f.read()
        with open(copy, "ab") as f:
            f.write(b"\n// edited\n")
        keys.add(native._key(cxx))
        with open(copy, "wb") as f:
            f.write(text)
    assert native._key(cxx) == base and len(keys) == len(copies) and base not in keys
    monkeypatch.setattr(native, "_cpu_id", lambda: b"model name\t: another CPU")
    assert native._key(cxx) not in keys | {base}


def test_nested_disabled_keeps_the_kernels_off_until_the_outermost_exits(monkeypatch):
    """`disabled()` inside `disabled()` (an export helper called within a caller's own block): the inner one's exit
    gives back what was before it, not "on"."""
    monkeypatch.setattr(native, "_state", {"ok": True})
    with native.disabled():
        with native.disabled():
            assert native.available() is False
        assert native.available() is False
    assert native.available() is True


@needs_compiler
@pytest.mark.parametrize("channels", [(16, 32), (3, 16), (16, 3)])
def test_native_conv_in_bfloat16_keeps_bfloat16(channels):
    """The native kernels compute in float32; the conv's output and input gradient are given back in the input's
    dtype (bfloat16), as XLA's conv gives them, with the same values up to bfloat16 rounding."""
    assert native.available()
    ci, co = channels
    kx, kk, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (2, 6, 5, ci)).astype(jnp.bfloat16)
    k = (jax.random.normal(kk, (3, 3, ci, co)) / 4).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (2, 6, 5, co)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(jax.jit(convs.native_conv), x, k)
    dx, dk = vjp(g)
    assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16,) * 3
    ref = _conv3x3_reference(x, k)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=0.02 * np.abs(ref).max())


@needs_compiler
def test_native_depthwise_kernel_gradient_sums_many_rows_to_float32_rounding():
    """Rows' sums are totalled in double: over 4,096 image rows of positive products (x, g near 1) a float total
    drifted by 3e-6 of the result, 30 times XLA's own sums (1e-7); the kernel is within 6e-8 of float64."""
    assert native.available()
    kx, kg = jax.random.split(jax.random.key(8))
    x = 1 + 0.1 * jax.random.normal(kx, (64, 64, 4, 16))
    g = 1 + 0.1 * jax.random.normal(kg, (64, 64, 4, 16))
    got = np.asarray(jax.jit(native.depthwise_kernel_grad)(x, g), np.float64)
    ref = _reference(x, g)
    assert abs(ref[1, 1, 0, 0] - 64 * 64 * 4) < 0.01 * 64 * 64 * 4  # the centre tap: every pixel, each ~1
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
