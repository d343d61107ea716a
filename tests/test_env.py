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
