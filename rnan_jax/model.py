"""RNAN (Ai et al., "Single Image Super-Resolution via Residual Neuron Attention Networks") as Flax linen modules.

Section 2 of the paper, read as ../shared/DESIGN.md decides: a shallow conv, G global-context-enhanced
residual groups (GCRG) of B residual neuron attention blocks (RNAB) applied with `nn.scan` (stacked
parameters: block parameters have leading axes [G, B]), global fusion of every N-th group output, a sub-pixel
upsampler and a reconstruction conv, inside an EDSR-style mean shift. Every conv (rnan_jax/convs.py) uses
PyTorch's default initialization (U(+-1/sqrt(fan_in)) for kernels and biases): Flax's default explodes through
200 blocks.

Layout is NHWC. Three execution knobs change how, not what, is computed, over the same parameters:
`scan_unroll` (the unroll factor of both scans, or a pair: the GCRGs' scan's and the RNA blocks'), `depthwise`
(`convs.DEPTHWISE_IMPLS`: "grouped", `feature_group_count`; "shifted", nine shifted multiply-adds) and `remat`
(what the backward recomputes of each RNA block: `REMAT_POLICIES`).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from rnan_jax.convs import DepthwiseConv, conv

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# What the backward keeps of each RNA block's forward (`remat`): "none" every intermediate autodiff saves (about
# six activations per block, stacked by the scan), "block" only the block's input (the rest recomputed in the
# backward, `jax.checkpoint`), "convs" the input and the outputs of the two 3x3 convs (the attention branch
# recomputed).
REMAT_POLICIES = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
                  "convs": jax.checkpoint_policies.save_only_these_names("rnab_c1", "rnab_c2")}


@dataclasses.dataclass(frozen=True)
class RNANConfig:
    """Every architectural choice of RNAN; the defaults are the paper's x4 model (17,303,749 parameters).

    scale: upscaling factor (2, 3 or 4). features: C. num_groups: G (GCRGs). num_blocks: B (RNA blocks per
    GCRG). group_interval: N, every N-th GCRG output enters global fusion. block_interval: M, every M-th
    block output enters a GCRG's fusion. gc_reduction: r, the GC bottleneck ratio. rgb_mean: the mean
    shift. dtype: compute dtype ("float32" or "bfloat16"); parameters are always float32.
    """

    scale: int = 4
    features: int = 64
    num_groups: int = 10
    num_blocks: int = 20
    group_interval: int = 1
    block_interval: int = 1
    gc_reduction: int = 16
    rgb_mean: tuple[float, float, float] = DIV2K_RGB_MEAN
    dtype: str = "float32"

    def __post_init__(self):
        try:
            object.__setattr__(self, "rgb_mean", tuple(float(v) for v in self.rgb_mean))
        except (TypeError, ValueError):  # --config.model.rgb_mean=abc: "could not convert string to float"
            raise ValueError(f"RNANConfig: rgb_mean must be 3 numbers, got {self.rgb_mean!r}") from None
        sizes = ("scale", "features", "num_groups", "num_blocks", "group_interval", "block_interval", "gc_reduction")
        if bad := [f"{k}={getattr(self, k)!r}" for k in sizes  # scale=2.0 passed, then failed deep in JAX
                   if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), numbers.Integral)]:
            raise ValueError(f"RNANConfig: {', '.join(sizes)} must be integers, got {', '.join(bad)}")
        for k in sizes:  # numpy integers as Python ints (hashable the same, JSON-writable)
            object.__setattr__(self, k, int(getattr(self, k)))
        checks = [
            (self.scale in (2, 3, 4), f"scale must be 2, 3 or 4, got {self.scale}"),
            (self.features > 0 and self.num_groups > 0 and self.num_blocks > 0,
             "features, num_groups and num_blocks must be positive"),
            (self.group_interval > 0 and self.num_groups % self.group_interval == 0,
             f"group_interval {self.group_interval} must divide num_groups {self.num_groups}"),
            (self.block_interval > 0 and self.num_blocks % self.block_interval == 0,
             f"block_interval {self.block_interval} must divide num_blocks {self.num_blocks}"),
            (self.gc_reduction > 0 and self.features % self.gc_reduction == 0,
             f"gc_reduction {self.gc_reduction} must divide features {self.features}"),
            (len(self.rgb_mean) == 3, "rgb_mean must have 3 values"),
            (self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"RNANConfig: {message}")

    @property
    def upsample_stages(self) -> tuple[int, ...]:
        return (2, 2) if self.scale == 4 else (self.scale,)


class NeuronAttention(nn.Module):
    """Eq. 7: NA(y) = y * sigmoid(PC(ReLU(DC(y)))), DC depthwise 3x3, PC pointwise 1x1."""

    features: int
    dtype: Any = jnp.float32
    depthwise: str = "grouped"

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        a = nn.relu(DepthwiseConv(features=self.features, dtype=self.dtype, impl=self.depthwise, name="dc")(y))
        a = conv(self.features, 1, self.features, self.dtype, name="pc")(a)
        return y * nn.sigmoid(a)


class ResidualNeuronAttention(nn.Module):
    """The RNA block, eq. 6: x + NA(conv3x3(ReLU(conv3x3(x)))). A scan body: (carry, _) -> (out, out)."""

    features: int
    dtype: Any = jnp.float32
    depthwise: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, jax.Array]:
        c = self.features
        y = nn.relu(checkpoint_name(conv(c, 3, c, self.dtype, name="c1")(x), "rnab_c1"))
        y = checkpoint_name(conv(c, 3, c, self.dtype, name="c2")(y), "rnab_c2")
        out = x + NeuronAttention(features=c, dtype=self.dtype, depthwise=self.depthwise, name="na")(y)
        return out, out


class GlobalContext(nn.Module):
    """The GC block, eq. 8 (GCNet, 'add' fusion): x + W_v2 ReLU(LN(W_v1 sum_j softmax(W_k x)_j x_j)).

    The softmax runs over all H*W positions in float32; it is sown as [B, H, W] into "intermediates" under
    "attention" (read it with `apply(..., mutable=["intermediates"])`)."""

    features: int
    reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, cr = self.features, self.features // self.reduction
        b, h, w, _ = x.shape
        logits = conv(1, 1, c, self.dtype, name="k")(x).astype(jnp.float32).reshape(b, h * w)
        attention = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention", attention.reshape(b, h, w))
        context = jnp.einsum("bp,bpc->bc", attention, x.reshape(b, h * w, c).astype(jnp.float32))
        t = conv(cr, 1, c, jnp.float32, name="v1")(context[:, None, None, :])
        t = nn.relu(nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="ln")(t))
        t = conv(c, 1, cr, jnp.float32, name="v2")(t)
        return x + t.astype(x.dtype)


def fuse(features: jax.Array, name: str, in_features: int, out_features: int, dtype: Any) -> jax.Array:
    """conv1x1 over the channel concatenation (in order) of stacked features [K, B, H, W, C], then conv3x3."""
    k, b, h, w, c = features.shape
    cat = jnp.moveaxis(features, 0, -2).reshape(b, h, w, k * c)
    y = conv(out_features, 1, in_features, dtype, name=f"{name}1")(cat)
    return conv(out_features, 3, out_features, dtype, name=f"{name}3")(y)


class GCRG(nn.Module):
    """Global context-enhanced residual group, eq. 5: B RNA blocks; every M-th block output concatenated ->
    conv1x1 -> conv3x3, plus the group input, then the GC block. A scan body: (carry, _) -> (out, out)."""

    features: int
    num_blocks: int
    block_interval: int
    reduction: int
    dtype: Any = jnp.float32
    depthwise: str = "grouped"
    scan_unroll: int | bool = 1
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, jax.Array]:
        c = self.features
        block = ResidualNeuronAttention
        if self.remat != "none":  # prevent_cse=False: inside a scan the recomputation cannot be CSE'd away
            block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.num_blocks, unroll=self.scan_unroll)
        _, outs = blocks(features=c, dtype=self.dtype, depthwise=self.depthwise, name="blocks")(x, None)
        m = self.block_interval
        y = fuse(outs[m - 1::m], "fuse", c * (self.num_blocks // m), c, self.dtype)
        out = GlobalContext(features=c, reduction=self.reduction, dtype=self.dtype, name="gc")(x + y)
        return out, out


# GlobalContext's transform (v1, its LayerNorm, v2) computes in float32 whatever the compute dtype.
FLOAT32_MODULES = frozenset({"v1", "ln", "v2"})


def cast_params(params: Any, dtype: Any) -> Any:
    """`params` with every leaf that the model computes with in `dtype` cast to it (the rest stay float32).

    The forward computes the same numbers as with the modules' own casts (a cast of a cast is a no-op), but
    each stacked [G, B, ...] parameter array is cast once instead of once per scan iteration: on an H200 the
    per-block converts were 1,713 kernels and 5.8 ms of the 89 ms bfloat16 step (tools/BENCHMARKS.md).
    Gradients flow back through the one cast, so the scanned weights' gradients arrive rounded to `dtype`
    (XLA folds that rounding away in the per-block casts): 0.1-0.3% apart in bfloat16. A no-op for float32."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params

    def cast(path, leaf):
        keep = any(getattr(k, "key", None) in FLOAT32_MODULES for k in path)
        return leaf if keep else leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def split_unroll(scan_unroll: int | bool | tuple[int | bool, int | bool]) -> tuple[int | bool, int | bool]:
    """(the GCRGs' scan's unroll, the RNA blocks' scan's) from `scan_unroll`: one value for both, or the pair."""
    return tuple(scan_unroll) if isinstance(scan_unroll, (tuple, list)) else (scan_unroll, scan_unroll)


def pixel_shuffle(x: jax.Array, s: int) -> jax.Array:
    """[B, H, W, C*s*s] -> [B, H*s, W*s, C] in PyTorch's PixelShuffle order (channel c*s*s + i*s + j goes to
    sub-position (i, j) of channel c)."""
    b, h, w, cs = x.shape
    c = cs // (s * s)
    x = x.reshape(b, h, w, c, s, s)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * s, w * s, c)


class RNAN(nn.Module):
    """The whole network: lr float [B, h, w, 3] in [0, 1] -> sr float32 [B, s*h, s*w, 3] (not clipped)."""

    config: RNANConfig
    depthwise: str = "grouped"
    scan_unroll: int | bool | tuple[int | bool, int | bool] = 1  # both scans', or (GCRGs', RNA blocks')
    remat: str = "none"

    @nn.compact
    def __call__(self, lr: jax.Array) -> jax.Array:
        cfg = self.config
        # As a submodule of a user's model, nothing else checks lr: a uint8 image came out as garbage near 60..255
        # without an error, a single [h, w, 3] image as "convolution requires lhs and rhs ndim to be equal".
        if not jnp.issubdtype(lr.dtype, jnp.floating):
            raise TypeError(f"RNAN: lr must be floating point with values in [0, 1], got {lr.dtype} (an 8-bit image: "
                            "divide by 255)")
        if lr.ndim != 4:
            raise ValueError(f"RNAN: lr must be [B, h, w, 3], got shape {tuple(lr.shape)}"
                             + (" (one image: pass lr[None])" if lr.ndim == 3 else ""))
        c, dtype = cfg.features, jnp.dtype(cfg.dtype)
        mean = jnp.asarray(cfg.rgb_mean, jnp.float32)
        # The residual stream (F0, block and group outputs, their sums) stays float32 whatever the compute
        # dtype: only the convs' inputs are cast. With bfloat16 residual adds the demo lost 0.08 dB.
        f0 = conv(c, 3, 3, dtype, name="head")(lr.astype(jnp.float32) - mean).astype(jnp.float32)
        # "intermediates" stacked like the parameters: with mutable=["intermediates"], the GC blocks' attention
        # maps come out under groups/gc/attention as [G, batch, h, w].
        group_unroll, block_unroll = split_unroll(self.scan_unroll)
        groups = nn.scan(GCRG, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                         length=cfg.num_groups, unroll=group_unroll)
        _, outs = groups(features=c, num_blocks=cfg.num_blocks, block_interval=cfg.block_interval,
                         reduction=cfg.gc_reduction, dtype=dtype, depthwise=self.depthwise,
                         scan_unroll=block_unroll, remat=self.remat, name="groups")(f0, None)
        n = cfg.group_interval
        x = f0 + fuse(outs[n - 1::n], "fuse", c * (cfg.num_groups // n), c, dtype)
        for i, s in enumerate(cfg.upsample_stages):
            x = pixel_shuffle(conv(c * s * s, 3, c, dtype, name=f"up_{i}")(x), s)
        sr = conv(3, 3, c, dtype, name="tail")(x)
        return sr.astype(jnp.float32) + mean
