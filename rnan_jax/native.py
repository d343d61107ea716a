"""Native CPU kernels, called through `jax.ffi`: built on first use with the system C++ compiler.

Convolution work that XLA:CPU computes slowly, each kernel reading its inputs in place:
- `depthwise_kernel_grad`, the 3x3 depthwise convolution's (kernels/depthwise.cc). XLA:CPU computes it as nine
  channel sums, which YNNPACK reduces only from materialized inputs, so each shifted copy of the block's input
  is written out: with the reductions, ~4 ms of every RNA block's backward on one core for the small model at
  batch 16, where PyTorch's whole depthwise backward takes 0.5 ms (tools/BENCHMARKS.md).
- `conv_kernel_grad`, a dense 3x3 or 1x1 convolution's (kernels/conv.cc). For 3x3, XLA:CPU gives YNNPACK a
  convolution over a transposed copy of the output gradient: 2.1 ms plus a 0.45 ms copy per 32 -> 32 conv of
  the small model at batch 16 on one core, 10.1 + 4.3 ms for its 32 -> 128 upsampler conv and 6.3 + 1.8 ms
  (Eigen) for the 32 -> 3 tail conv, against 1.2, 5.0 and 0.7 ms here. For 1x1 (a matrix product contracting
  the pixel rows) XLA's dot takes 0.9 ms per 32 -> 32 conv. With 16 or more channels on both sides, a 3x3
  conv's kernel gradient is the gradient of its Winograd form (kernels/winograd.cc), the tiles' products summed
  in the transformed domain: 0.24 ms against 0.30 directly for a 32 -> 32 conv at batch 4 of 32 x 32, one core
  (0.86 against 1.24 for 32 -> 128), and closer to float64 (3-5e-7 of max |dk| against XLA's 0.4-2.6e-6).
- `conv3x3`, a 3x3 convolution with fewer than 16 input channels (kernels/conv.cc), where YNNPACK is slow: the
  head's forward from 3 channels (0.86 ms in the small model's one-core step, 0.16 ms here) and the input
  gradient of the tail conv to 3 channels (3.5 ms, 0.6 ms here).
- `conv3x3_winograd`, a 3x3 convolution with 16 or more channels on both sides by Winograd's F(2x2, 3x3)
  (kernels/winograd.cc): the forward and input gradient of every other 3x3 conv, which YNNPACK computes
  directly at ~220 GFLOP/s on one core of this machine, near its peak; F(2x2, 3x3) takes 2.25x fewer
  multiply-adds. A 32 -> 32 conv at batch 4 of 32 x 32 (a chunk of the small model's step), one core: 0.26 ms
  against YNNPACK's 0.34; 32 -> 128 0.89 against 1.31.

The conv kernels' handlers are asynchronous (kernels/common.h): the work is a task on XLA's intra-op thread
pool, so the thread that reached the custom call goes on with other ready kernels and an idle core takes the
task. Called synchronously, `conv3x3` made the two-core step slower although each call was faster (the YNNPACK
convs it replaces spread over an idle core by themselves); asynchronously it is faster (tools/BENCHMARKS.md).
A Winograd conv over 8,192 tiles or more (an image of 128 x 128 or larger: inference) is split into one task
per pool thread.

The shared library is compiled from the sources (shipped with the package) by `$CXX` (default `c++`; split as
a shell would, so "ccache g++" works) with `-O3 -march=native` into `$RNAN_JAX_NATIVE_CACHE` (default
~/.cache/rnan_jax/native), named by a hash of all that decides the binary (`_key`: the sources, the compiler's
command and version, the instruction set extensions -march=native turns on, jaxlib's FFI headers), so it is
built once per machine (again where the cached file was cut short) and a home folder shared by machines with
different CPUs holds one library for each. Without a compiler, or with
`RNAN_JAX_NATIVE=0` (or false, off, no), or if the build fails (said once in a warning), `available()` is False
and the model keeps XLA's convolutions and pure-JAX gradients: the same numbers up to float rounding.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import platform
import secrets
import shlex
import shutil
import struct
import subprocess
import threading
from typing import Iterator

from rnan_jax import env

NATIVE_ENV = "RNAN_JAX_NATIVE"
NATIVE_CACHE_ENV = "RNAN_JAX_NATIVE_CACHE"
_SOURCES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", name)
                 for name in ("depthwise.cc", "conv.cc", "winograd.cc", "common.h"))
# XLA FFI target -> the handler symbol the library exports
_TARGETS = {"rnan_depthwise_kernel_grad": "RnanDepthwiseKernelGrad",
            "rnan_conv_kernel_grad": "RnanConvKernelGrad",
            "rnan_conv3x3": "RnanConv3x3",
            "rnan_conv3x3_winograd": "RnanConv3x3Winograd"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")  # after $CXX's own words
LANES = 16  # conv_kernel_grad vectorizes one channel axis in blocks of this many floats
_state: dict[str, bool] = {}
_building = threading.Lock()  # held by the thread that builds and registers the library (`available`)


def _cpu_id() -> bytes:
    """This CPU's model and features as /proc/cpuinfo gives them (x86: model name, flags; ARM: Features, the
    implementer and part numbers)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = f.read().splitlines()
        return b"\n".join(sorted({ln for ln in lines if ln.startswith(
            (b"model name", b"flags", b"Features", b"CPU implementer", b"CPU architecture", b"CPU part"))}))
    except OSError:
        return platform.processor().encode()


def _key(cxx: list[str]) -> str:
    """The cached library's name: a hash of all that decides the binary. The sources; the command (`$CXX`'s
    words, `_FLAGS`); the compiler's version; the macros it predefines under those flags, which name every
    instruction set extension -march=native turns on for this CPU (__AVX512F__, __ARM_FEATURE_SVE: a library
    built where the CPU has them dies of SIGILL where it has not), also where /proc/cpuinfo does not list the
    CPU's features (macOS); this CPU's model and features; jax's and jaxlib's versions and the XLA FFI headers
    compiled in. All stable on one machine, so the library is built once there."""
    import jax
    import jaxlib

    def run(*args: str) -> bytes:
        return subprocess.run([*cxx, *args], capture_output=True, check=True, stdin=subprocess.DEVNULL).stdout

    parts = []
    for name in _SOURCES:
        with open(name, "rb") as f:
            parts.append(f.read())
    parts += ["\x1f".join([*cxx, *_FLAGS]).encode(), run("--version"),
              run(*_FLAGS, "-dM", "-E", "-x", "c++", os.devnull), _cpu_id(),
              jax.__version__.encode(), getattr(jaxlib, "__version__", "").encode()]
    include = jax.ffi.include_dir()
    for folder, _, files in sorted(os.walk(include)):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                parts += [os.path.relpath(os.path.join(folder, name), include).encode(), f.read()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _whole(path: str) -> bool:
    """Whether the library at `path` is there and not cut short: not empty and, if ELF, as long as the end of its
    section header table, the last thing a linker writes. dlopen takes a library cut short (a crash while it was
    written) without an error: it maps the file, and the process dies of SIGBUS on the first page past its end."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(64), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if head[:4] != b"\x7fELF":
        return size > 0  # another format (macOS's Mach-O): not checked further
    if len(head) < 64 or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    order = "<" if head[5] == 1 else ">"
    offset, = struct.unpack_from(order + ("Q" if head[4] == 2 else "I"), head, 0x28 if head[4] == 2 else 0x20)
    entry_size, count = struct.unpack_from(order + "HH", head, 0x3A if head[4] == 2 else 0x2E)
    return 0 < offset and offset + entry_size * count <= size


def compiler() -> list[str] | None:
    """The C++ compiler's command: `$CXX` as a shell splits it ("ccache g++" is two words), default `c++`; None
    when its program is not found (or `$CXX` does not split: an unclosed quote)."""
    try:
        words = shlex.split(os.environ.get("CXX") or "c++")
    except ValueError:
        return None
    program = shutil.which(words[0]) if words else None
    return None if program is None else [program, *words[1:]]


def enabled_by_environment() -> bool:
    """False when `$RNAN_JAX_NATIVE` turns the kernels off: 0, false, off or no (any case)."""
    return os.environ.get(NATIVE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _build() -> str:
    """The path of the compiled library (built now unless a whole one is cached); raises OSError or
    subprocess.CalledProcessError on failure."""
    import jax

    cxx = compiler()
    if cxx is None:
        raise OSError(f"no C++ compiler found (CXX={os.environ.get('CXX', '')!r}; set it to one)")
    cache = env.cache_folder("native", NATIVE_CACHE_ENV)
    path = os.path.join(cache, f"kernels_{_key(cxx)}.so")
    if _whole(path):
        return path
    os.makedirs(cache, exist_ok=True)
    # A name of its own, which the compiler creates: with the mode it gives a new file (readable by whoever the
    # umask lets read, for a cache shared between users); a file made beforehand (mkstemp's, 0600) kept its mode.
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        units = [name for name in _SOURCES if name.endswith(".cc")]  # the headers are hashed, not compiled
        subprocess.run([*cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", *units, "-o", tmp], capture_output=True,
                       check=True, stdin=subprocess.DEVNULL)
        # Put in place only where no whole library is (a link: atomic, NFS's too): one that another process
        # sharing the folder built meanwhile is kept, not renamed over. On NFS, renamed over, the file that
        # another host had loaded was deleted under it (its next page of the library read: "Stale file handle",
        # SIGBUS); a concurrent build of the same key gives the same library.
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not _whole(path):
                os.replace(tmp, path)  # the one cut short, replaced atomically
        except OSError:  # a filesystem without hard links
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _failure(e: Exception) -> str:
    """One line on why the build failed: a failed command's program, exit status and first error line (a
    compile error's stderr is many lines: the first error is the cause)."""
    if not isinstance(e, subprocess.CalledProcessError):
        return str(e)
    lines = [ln.strip() for ln in (e.stderr or b"").decode(errors="replace").splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
    program = os.path.basename(str(e.cmd[0])) if e.cmd else "the compiler"
    return f"{program} exited with status {e.returncode}" + (f": {line[:300]}" if line else "")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within it `available()` is False, so what is traced there uses XLA's convolutions: for `jax.export`, which
    refuses the native kernels' custom calls (no compatibility guarantee, and a loader lacks the library)."""
    before = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before


def available() -> bool:
    """Whether the native kernels are built and registered with JAX (tries once per process), and not
    `disabled()`."""
    if _state.get("off"):
        return False
    if "ok" in _state:
        return _state["ok"]
    # Another thread that asks meanwhile waits for the answer: it was told False while the first built, and the
    # model it traced kept XLA's convolutions for good (two threads upscaling their first images).
    with _building:
        if "ok" not in _state:
            ok = False
            if enabled_by_environment():
                try:
                    import jax

                    library = ctypes.CDLL(_build())
                    for target, symbol in _TARGETS.items():
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                                    platform="cpu")
                    ok = True
                except (OSError, AttributeError, subprocess.CalledProcessError) as e:
                    # where the cache cannot be written (a read-only home), say where else it can go
                    where = (f" (set {NATIVE_CACHE_ENV} to a writable folder)" if isinstance(e, PermissionError) or
                             getattr(e, "errno", None) == errno.EROFS else "")
                    logging.getLogger(__name__).warning(
                        "native CPU kernels not built (%s)%s; XLA's convolutions and JAX's gradients are used instead",
                        _failure(e), where)
            _state["ok"] = ok
    return _state["ok"]


def depthwise_kernel_grad(x, g):
    """dk[i, j, 0, c] = sum over b, h, w of x[b, h+i-1, w+j-1, c] * g[b, h, w, c] (x zero outside): the kernel
    gradient of a 3x3 'SAME' depthwise cross-correlation, float32 [B, H, W, C] in, [3, 3, 1, C] out, on CPU.
    Call only when `available()`."""
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((3, 3, 1, x.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("rnan_depthwise_kernel_grad", out, vmap_method="sequential")(
        x.astype(jnp.float32), g.astype(jnp.float32))


def conv_supported(in_features: int, features: int) -> bool:
    """Whether `conv_kernel_grad` takes a conv with these channel counts (one a multiple of `LANES`)."""
    return features % LANES == 0 or in_features % LANES == 0


def conv_kernel_grad(x, g, size: int):
    """dk[i, j, ci, co] = sum over b, h, w of x[b, h+i-size//2, w+j-size//2, ci] * g[b, h, w, co] (x zero
    outside): the kernel gradient of a size x size 'SAME' cross-correlation (HWIO kernel, size 1 or 3), float32
    x [B, H, W, CI] and g [B, H, W, CO] in, [size, size, CI, CO] out, on CPU. Call only when `available()` and
    `conv_supported(CI, CO)`."""
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((size, size, x.shape[-1], g.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("rnan_conv_kernel_grad", out, vmap_method="sequential")(
        x.astype(jnp.float32), g.astype(jnp.float32))


def conv3x3_narrow(in_features: int, features: int) -> bool:
    """Whether `conv3x3` is the faster form of a 3x3 conv with these channel counts: fewer than `LANES` input
    channels, a multiple of `LANES` output channels."""
    return in_features < LANES and features % LANES == 0


def conv3x3(x, k):
    """y[b, h, w, co] = sum over i, j, ci of x[b, h+i-1, w+j-1, ci] * k[i, j, ci, co] (x zero outside): a 3x3
    'SAME' cross-correlation, float32 x [B, H, W, CI] and k [3, 3, CI, CO] in, [B, H, W, CO] out, on CPU. Call
    only when `available()`; CO must be a multiple of `LANES` (`conv3x3_narrow` says where it is worth it)."""
    return _conv3x3_call("rnan_conv3x3", x, k)


def _conv3x3_call(target: str, x, k):
    """A 3x3 conv through the FFI target `target`: float32 x [B, H, W, CI] and k [3, 3, CI, CO] in,
    [B, H, W, CO] out."""
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((*x.shape[:3], k.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x.astype(jnp.float32), k.astype(jnp.float32))


def winograd_supported(in_features: int, features: int) -> bool:
    """Whether `conv3x3_winograd` takes a 3x3 conv with these channel counts (both multiples of `LANES`; the
    C++ side's `WinogradSupported`, kernels/common.h)."""
    return in_features % LANES == 0 and features % LANES == 0


def conv3x3_winograd(x, k):
    """`conv3x3` by Winograd's F(2x2, 3x3) (kernels/winograd.cc): 16 products per 2x2 output tile and channel
    pair where the direct form takes 36. Error against float64 1.5-4.7e-7 of the largest output (XLA's direct
    conv: 2.1-8.6e-7). Call only when `available()` and `winograd_supported(CI, CO)`."""
    return _conv3x3_call("rnan_conv3x3_winograd", x, k)
