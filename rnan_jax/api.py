"""The functional surface: `init(rng, config) -> params` and `apply(params, lr) -> sr`.

`params` is the plain parameter tree (no `{"params": ...}` wrapper). `apply` is pure: it can be jitted,
vmapped and differentiated, and reads the architecture off the parameter shapes when no config is given.
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rnan_jax.convs import DEPTHWISE_IMPLS, torch_bound
from rnan_jax.model import REMAT_POLICIES, RNAN, RNANConfig, cast_params

Params = Mapping[str, Any]
# A concrete LR batch whose values pass _LR_MAX is refused as a 0..255 image, one below _LR_MIN as a [-1, 1] one
# (which gave garbage silently); under jit, vmap or grad the values are not checked (tracers). Some slack beyond
# [0, 1]: an unclipped output fed back in overshoots a little (the zoo models' by up to 0.05 on Set5).
_LR_MAX = 2.0
_LR_MIN = -0.5

# Chosen by measurement on XLA:CPU (../shared/DESIGN.md): a rolled scan's backward is 8x slower there and
# `feature_group_count` depthwise is 4x slower than shifted multiply-adds. But full unrolling grows the
# program with the depth: the paper's 200 blocks took about 4 minutes and 10 GB to compile, and that executable
# crashed the process that loaded it from the persistent compilation cache (jax 0.10.2), so on CPU only
# networks of up to CPU_FULL_UNROLL_MAX_BLOCKS blocks are unrolled (the demo and the small zoo models have 6).
# GPUs: both scans unrolled by 2, the fastest measured on an H200 at the paper setting in bfloat16 (one process,
# one set of autotuned conv algorithms: 71.7 ms against 74.7 unrolled by 4, 76.4 with each group's blocks
# unrolled and 98.1 rolled; 9,798 kernel launches a step against 16,358; tools/BENCHMARKS.md, "Third GPU
# session"), compiling in 9-19 s with XLA's autotuning results cached. TPUs: not measured, the rolled scan.
_CPU_DEPTHWISE = "shifted"
_ACCELERATOR_KNOBS = {"gpu": (2, "grouped"), "tpu": (1, "grouped")}
CPU_FULL_UNROLL_MAX_BLOCKS = 24
# Train-step knobs per backend, as measured (tools/BENCHMARKS.md): on one H200 at the paper setting in bfloat16,
# in one process (one set of autotuned conv algorithms), the parameters cast once and each RNA block's attention
# branch recomputed in the backward ("convs") gave the fastest step, 86.6 ms against 89.5 (cast once), 90.9
# (neither) and 95.7 (remat alone), and a third less memory (5.7 against 8.7 GiB). Other backends: not measured.
_REMAT = {"gpu": "convs"}
_CAST_PARAMS_ONCE = {"gpu": True}
# XLA:GPU's fusion autotuner (`xla_gpu_experimental_enable_fusion_autotuner`, on in XLA) times a Triton version
# of each reduction and transpose fusion against XLA's own emitter when it compiles. On one H200 (jax 0.11.2,
# tools/BENCHMARKS.md, "Fourth GPU session") it tried 342 fusions of the default train step and kept XLA's
# emitter for 320; the step's cold compile took 89 s, 7-8 s once the picks were cached. Off is a knob
# (`execution.fusion_autotuner`), left at XLA's default on every backend until a GPU session measures it.
_FUSION_AUTOTUNER: dict[str, bool] = {}


def default_knobs(backend: str | None = None, config: RNANConfig | None = None) -> tuple[int | bool, str]:
    """(scan_unroll, depthwise) for a backend ("cpu", "gpu", "tpu"; default: JAX's default backend) and, on
    CPU, the network's depth (`config`; None: a small one)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return _ACCELERATOR_KNOBS.get(backend, _ACCELERATOR_KNOBS["tpu"])
    blocks = 0 if config is None else config.num_groups * config.num_blocks
    return (True if blocks <= CPU_FULL_UNROLL_MAX_BLOCKS else 1), _CPU_DEPTHWISE


def default_remat(backend: str | None = None) -> str:
    """What the backward recomputes of each RNA block (`model.REMAT_POLICIES`) by default on a backend."""
    return _REMAT.get(backend or jax.default_backend(), "none")


def default_cast_params_once(backend: str | None = None) -> bool:
    """Whether the train step casts the parameters to the compute dtype once (`model.cast_params`) by default."""
    return _CAST_PARAMS_ONCE.get(backend or jax.default_backend(), False)


def default_fusion_autotuner(backend: str | None = None) -> bool:
    """Whether XLA:GPU's fusion autotuner runs when the train step compiles, by default on a backend."""
    return _FUSION_AUTOTUNER.get(backend or jax.default_backend(), True)


def build(config: RNANConfig, *, scan_unroll: int | bool | None | tuple = None, depthwise: str | None = None,
          remat: str | None = None) -> RNAN:
    """The linen module for `config` with the execution knobs resolved (None: the backend's default)."""
    unroll, impl = default_knobs(config=config)
    depthwise = depthwise or impl
    if depthwise not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise must be one of {DEPTHWISE_IMPLS}, got {depthwise!r}")
    remat = remat or default_remat()
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    if isinstance(scan_unroll, tuple):  # (GCRGs' scan, RNA blocks' scan); None: the backend's default
        scan_unroll = tuple(unroll if u is None else u for u in scan_unroll)
    return RNAN(config, depthwise=depthwise, scan_unroll=unroll if scan_unroll is None else scan_unroll, remat=remat)


def init(rng: jax.Array, config: RNANConfig) -> dict:
    """Float32 parameters of the network described by `config`.

    The same distribution as `RNAN(config).init` (PyTorch's default: every conv kernel and bias
    U(+-1/sqrt(fan_in)), LayerNorm scale 1 and bias 0), drawn with one random call: the module's own init
    compiles hundreds of threefry draws, 10 s on XLA:CPU even for a tiny model. Each conv's bound is
    `convs.torch_bound` of its kernel shape, the rule the modules' initializers are built from.
    """
    return _init(rng, config)


@partial(jax.jit, static_argnums=1)
def _init(rng: jax.Array, config: RNANConfig) -> dict:
    shapes = jax.eval_shape(RNAN(config, scan_unroll=1).init, rng, jnp.zeros((1, 8, 8, 3), jnp.float32))
    paths_shapes, tree = jax.tree_util.tree_flatten_with_path(shapes["params"])
    total = sum(math.prod(s.shape) for _, s in paths_shapes)
    u = jax.random.uniform(rng, (total,), jnp.float32, -1.0, 1.0)
    leaves, offset = [], 0
    for path, s in paths_shapes:
        module = shapes["params"]
        for p in path[:-1]:
            module = module[p.key]
        if "kernel" not in module:  # the GC block's LayerNorm: Flax's init, scale 1 and bias 0
            leaves.append(jnp.full(s.shape, 1.0 if path[-1].key == "scale" else 0.0, jnp.float32))
            continue
        size = math.prod(s.shape)
        leaves.append(u[offset:offset + size].reshape(s.shape) * torch_bound(module["kernel"].shape))
        offset += size
    return jax.tree_util.tree_unflatten(tree, leaves)


def infer_config(params: Params, **overrides) -> RNANConfig:
    """Reads the architecture off a parameter tree: groups and blocks from the stacked axes, features from
    the head, the fusion intervals from the fusion convs' widths, the scale from the upsampler. `rgb_mean`
    and `dtype` are not in the parameters: they take RNANConfig's defaults unless given in `overrides`.
    Raises ValueError naming the entry when the tree is not an RNAN's (every shape is checked)."""
    _check_unwrapped(params)
    try:
        c = params["head"]["kernel"].shape[-1]
        groups = params["groups"]
        g, b = groups["blocks"]["c1"]["kernel"].shape[:2]
        group_cat = params["fuse1"]["kernel"].shape[-2]
        block_cat = groups["fuse1"]["kernel"].shape[-2]
        cr = groups["gc"]["v1"]["kernel"].shape[-1]
        if "up_1" in params:
            scale = 4
        else:
            scale = math.isqrt(params["up_0"]["kernel"].shape[-1] // c)
        fields = dict(scale=scale, features=c, num_groups=g, num_blocks=b, group_interval=g * c // group_cat,
                      block_interval=b * c // block_cat, gc_reduction=c // cr)
        config = RNANConfig(**{**fields, **{k: v for k, v in overrides.items() if k in ("rgb_mean", "dtype")}})
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"not an RNAN parameter tree (missing or odd entry: {e})") from None
    check_params(params, config, what="not an RNAN parameter tree")
    return dataclasses.replace(config, **overrides) if overrides else config


def _check_unwrapped(params: Params) -> None:
    if isinstance(params, Mapping) and set(params) == {"params"}:
        path = "".join(f"[{k!r}]" for k in _nested_rnan(params["params"]) or ())  # an RNAN submodule's, nested
        raise ValueError(f"params is a {{'params': tree}} variables dict: pass variables['params']{path}, the bare "
                         "tree" + (" of the RNAN submodule" if path else ""))
    if isinstance(params, Mapping) and "head" not in params:
        # the parameters of a model that holds RNAN as a submodule (a GAN's generator): they nest under its name
        path = "".join(f"[{k!r}]" for k in _nested_rnan(params) or ())
        if path:
            raise ValueError(f"params holds an RNAN's parameters under params{path} (RNAN as a submodule): pass "
                             f"params{path}, the RNAN's own tree")


def _nested_rnan(tree: Any, depth: int = 6) -> tuple | None:
    """The keys leading to the first sub-tree of `tree` that holds an RNAN's top-level entries, or None."""
    if not isinstance(tree, Mapping) or "head" in tree or depth == 0:
        return None
    for key, sub in tree.items():
        if isinstance(sub, Mapping) and {"head", "groups", "tail"} <= set(sub):
            return (key,)
        found = _nested_rnan(sub, depth - 1)
        if found:
            return (key, *found)
    return None


def param_shapes(config: RNANConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of `config`'s network, keyed by its path as `jax.tree_util.keystr` writes
    it ("['groups']['blocks']['c1']['kernel']": [G, B, 3, 3, C, C])."""
    return dict(_param_shapes(dataclasses.replace(config, dtype="float32")))


@lru_cache(maxsize=32)
def _param_shapes(config: RNANConfig) -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(lambda rng: _init(rng, config), jax.random.key(0))
    return {jax.tree_util.keystr(path): tuple(s.shape)
            for path, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def check_params(params: Params, config: RNANConfig, *, what: str | None = None) -> None:
    """Raises ValueError naming the first entry of `params` that is missing, extra or of the wrong shape for
    `config` (instead of Flax's error from deep inside the network)."""
    _check_unwrapped(params)
    expected = _param_shapes(dataclasses.replace(config, dtype="float32"))
    try:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        given = {jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in leaves}
    except Exception as e:  # not a tree of arrays at all
        raise ValueError(f"{what or 'params'}: {type(e).__name__}: {e}") from None
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and given[k] != expected[k]]
    if not (missing or extra or wrong):
        return
    problem = (f"params{wrong[0]} has shape {given[wrong[0]]}, expected {expected[wrong[0]]}" if wrong else
               f"params{missing[0]} is missing" if missing else f"params{extra[0]} is not an RNAN parameter")
    count = len(missing) + len(extra) + len(wrong)
    raise ValueError(f"{what or 'params do not fit the config'}: {problem}"
                     + (f" ({count - 1} more entries differ)" if count > 1 else "")
                     + (f"; config {config}" if what is None else ""))


def apply(params: Params, lr: jax.Array, *, config: RNANConfig | None = None, dtype: str | None = None,
          scan_unroll: int | bool | None = None, depthwise: str | None = None) -> jax.Array:
    """Super-resolves `lr`, float in [0, 1] of shape [B, h, w, 3] or [h, w, 3], to float32 [.., s*h, s*w, 3].

    config: the architecture (default: read off `params`). dtype: compute dtype override ("bfloat16").
    scan_unroll, depthwise: execution knobs (same function, different speed; default per backend).
    """
    if config is None:
        config = infer_config(params)
    else:
        check_params(params, config)
    if dtype is not None:
        dtype = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name  # jnp.bfloat16 as well as "bfloat16"
        config = dataclasses.replace(config, dtype=dtype)
    lr = jnp.asarray(lr)
    _check_lr(lr)
    single = lr.ndim == 3
    sr = build(config, scan_unroll=scan_unroll, depthwise=depthwise).apply(
        {"params": cast_params(params, config.dtype)}, lr[None] if single else lr)
    return sr[0] if single else sr


def _check_lr(lr: jax.Array) -> None:
    """ValueError/TypeError naming what is wrong with an LR batch, with the likely mistake."""
    shape = tuple(lr.shape)
    if lr.ndim not in (3, 4) or lr.shape[-1] != 3:
        hint = ""
        if lr.ndim == 2 or (lr.ndim in (3, 4) and lr.shape[-1] == 1):
            hint = (" (a gray image: repeat it to 3 channels, e.g. jnp.repeat(lr[..., None], 3, -1) for [h, w], "
                    "or call rnan_jax.upscale_image, which takes gray)")
        elif lr.ndim in (3, 4) and lr.shape[-3] == 3:
            hint = (" (channels first? apply takes channels last: "
                    f"lr.transpose({'0, 2, 3, 1' if lr.ndim == 4 else '1, 2, 0'}))")
        raise ValueError(f"lr must be [B, h, w, 3] or [h, w, 3], got shape {shape}{hint}")
    if not jnp.issubdtype(lr.dtype, jnp.floating):  # e.g. np.asarray(a PIL image): 0..255 would pass silently
        raise TypeError(f"lr must be floating point with values in [0, 1], got {lr.dtype} (an 8-bit image: "
                        "divide by 255, or call inference.upscale_image, which takes uint8)")
    if lr.size:  # a concrete input: a 0..255 float image is caught
        try:
            with jax.ensure_compile_time_eval():  # also a constant closed over by a jitted caller
                top, bottom = float(jnp.max(lr)), float(jnp.min(lr))
        except jax.errors.ConcretizationTypeError:  # traced (jit, vmap, grad): the values are not known here
            return
        if top > _LR_MAX:
            raise ValueError(f"lr must have values in [0, 1], got values up to {top:g} (a 0..255 image? "
                             "divide by 255)")
        if bottom < _LR_MIN:
            raise ValueError(f"lr must have values in [0, 1], got values down to {bottom:g} (a [-1, 1] image? "
                             "pass (lr + 1) / 2)")


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
