"""RNAN (Ai et al., "Single Image Super-Resolution via Residual Neuron Attention Networks") as Flax linen modules.

Section 2 of the paper, read as ../shared/DESIGN.md decides: a shallow conv, G global-context-enhanced
residual groups (GCRG) of B residual neuron attention blocks (RNAB) applied with `nn.scan` (stacked
parameters: block parameters have leading axes [G, B]), global fusion of every N-th group output, a sub-pixel
upsampler and a reconstruction conv, inside an EDSR-style mean shift. Every conv uses PyTorch's default
initialization (U(+-1/sqrt(fan_in)) for kernels and biases): Flax's default explodes through 200 blocks.

Layout is NHWC. Three execution knobs change how, not what, is computed, over the same parameters:
`scan_unroll` (the unroll factor of both scans, or a pair: the GCRGs' scan's and the RNA blocks'), `depthwise`
("grouped": `feature_group_count`; "shifted": nine shifted multiply-adds) and `remat` (what the backward
recomputes of each RNA block: `REMAT_POLICIES`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from rnan_jax import native

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
DEPTHWISE_IMPLS = ("grouped", "shifted")
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
        object.__setattr__(self, "rgb_mean", tuple(float(v) for v in self.rgb_mean))
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


def torch_bound(kernel_shape: Sequence[int]) -> float:
    """PyTorch's default init bound for a conv's kernel and bias alike (kaiming_uniform with a = sqrt(5), and
    the bias rule): 1/sqrt(fan_in), fan_in = kh * kw * in / groups read off the kernel shape
    (..., kh, kw, in / groups, out); leading axes (nn.scan's stacking) do not count.

    The one statement of the rule: the modules' initializers and `api.init`'s single draw both use it."""
    return 1.0 / math.sqrt(math.prod(kernel_shape[-4:-1]))


def torch_uniform(kernel_shape: Sequence[int]) -> Callable[..., jax.Array]:
    """The initializer of the kernel and the bias of a conv with kernel shape `kernel_shape`:
    U(+-torch_bound(kernel_shape))."""
    bound = torch_bound(kernel_shape)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SameConv(nn.Module):
    """A biased `size` x `size` 'SAME' conv (`size` 1 or 3, set by the subclass) with `nn.Conv`'s parameters
    (kernel [size, size, in, out], bias [out]) and PyTorch's initialization, through `_conv`."""

    features: int
    in_features: int
    dtype: Any = jnp.float32
    size = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.size, self.size, self.in_features, self.features)
        init = torch_uniform(shape)
        kernel = self.param("kernel", init, shape).astype(self.dtype)
        bias = self.param("bias", init, (self.features,)).astype(self.dtype)
        return _conv(x.astype(self.dtype), kernel) + bias


class PointwiseConv(SameConv):
    """A biased 1x1 conv with `nn.Conv`'s parameters (kernel [1, 1, in, out], bias [out], same initialization),
    computed on CPU as a matrix product over the channel axis and elsewhere as a convolution; checkpoints do
    not depend on the form (`jax.lax.platform_dependent` picks it when the program is lowered).

    XLA:CPU lowers a 1x1 convolution's kernel gradient to a convolution over transposed activations: one
    transpose of a whole activation per conv, 24 of the small model's 48 per step; as a dot, the gradient
    contracts the rows in place (one-core step 200 -> 178 ms, tools/BENCHMARKS.md), and through `native_conv`
    that contraction is a native kernel. GPUs and TPUs keep the convolution that their measurements were taken
    with until a GPU session compares the two."""

    size = 1


def _pointwise_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _plain_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 'SAME' cross-correlation with an HWIO kernel of size 1 (a dot on CPU) or 3, as XLA computes it."""
    if kernel.shape[0] == 1:
        return jax.lax.platform_dependent(x, kernel, cpu=_pointwise_dot, default=_pointwise_conv)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _native_3x3(in_features: int, features: int) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """The native CPU kernel for a 3x3 conv with these channel counts, if one takes it: Winograd's F(2x2, 3x3)
    (`native.conv3x3_winograd`) with 16 or more channels on both sides, the direct `native.conv3x3` from fewer
    than 16."""
    if native.winograd_supported(in_features, features):
        return native.conv3x3_winograd
    if native.conv3x3_narrow(in_features, features):
        return native.conv3x3
    return None


def _native_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_plain_conv`, except a 3x3 conv that a native kernel takes (`_native_3x3`) on CPU."""
    fast = _native_3x3(kernel.shape[2], kernel.shape[3]) if kernel.shape[0] == 3 else None
    if fast is None:
        return _plain_conv(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=lambda x, k: fast(x, k).astype(x.dtype), default=_plain_conv)


@jax.custom_vjp
def native_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_plain_conv` whose kernel gradient on CPU is a native kernel (`native.conv_kernel_grad`, reading x and
    the output gradient in place; XLA:CPU transposes the gradient for YNNPACK first, leaves a 3x3 conv with 3
    output channels to Eigen, and contracts a 1x1 conv's rows in a slow dot). A 3x3 conv's forward and input
    gradient (the same conv of the output gradient with the kernel flipped and transposed) run natively too: by
    Winograd's F(2x2, 3x3) (`native.conv3x3_winograd`, 2.25x fewer multiply-adds than YNNPACK's direct convs)
    with 16 or more channels on both sides, directly (`native.conv3x3`) from or to fewer than 16. The 1x1
    convs' forward and input gradient stay XLA's, and on other platforms all of it."""
    return _native_forward(x, kernel)


def _native_conv_fwd(x, kernel):
    return _native_forward(x, kernel), (x, kernel)


def _native_conv_bwd(residuals, g):
    x, kernel = residuals

    def xla_input_grad(g, kernel):
        return jax.vjp(lambda x: _plain_conv(x, kernel), x)[1](g)[0]

    fast = _native_3x3(kernel.shape[3], kernel.shape[2]) if kernel.shape[0] == 3 else None
    if fast is None:
        dx = xla_input_grad(g, kernel)
    else:  # the same conv of g with the kernel flipped and transposed
        dx = jax.lax.platform_dependent(
            g, kernel, cpu=lambda g, k: fast(g, jnp.flip(k, (0, 1)).swapaxes(2, 3)).astype(x.dtype),
            default=xla_input_grad)

    def xla_grad(x, g):
        return jax.vjp(lambda k: _plain_conv(x, k), kernel)[1](g)[0].astype(jnp.float32)

    def native_grad(x, g):
        return native.conv_kernel_grad(x, g, kernel.shape[0])

    dk = jax.lax.platform_dependent(x, g, cpu=native_grad, default=xla_grad)
    return dx, dk.astype(kernel.dtype)


native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 'SAME' conv (HWIO kernel of size 1 or 3) through `native_conv` where the native kernel gradient takes
    it (CPU kernels built, one channel count a multiple of 16), else `_plain_conv`: the same numbers up to
    rounding."""
    if x.ndim == 4 and native.conv_supported(kernel.shape[2], kernel.shape[3]) and native.available():
        return native_conv(x, kernel)
    return _plain_conv(x, kernel)


class Conv3x3(SameConv):
    """A biased 3x3 'SAME' conv with `nn.Conv`'s parameters (kernel [3, 3, in, out], bias [out]) and PyTorch's
    initialization, through `native_conv` on CPU where it applies: checkpoints do not depend on the form."""

    size = 3


def conv(features: int, kernel: int, in_features: int, dtype: Any, name: str | None = None) -> nn.Module:
    """A biased 'SAME' conv (1x1 or 3x3) with PyTorch-style initialization: `PointwiseConv` or `Conv3x3`."""
    if kernel == 1:
        return PointwiseConv(features, in_features, dtype, name=name)
    if kernel == 3:
        return Conv3x3(features, in_features, dtype, name=name)
    raise ValueError(f"conv: kernel size {kernel} is not 1 or 3")


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    h, w = x.shape[-3], x.shape[-2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0] for i in range(3) for j in range(3))


@jax.custom_vjp
def shifted_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 depthwise cross-correlation ('SAME', kernel [3, 3, 1, C]) as nine shifted multiply-adds.

    Its gradient is written out (the input gradient is the same sum with the flipped kernel, the kernel
    gradient nine channel sums) instead of left to autodiff, whose transpose of the nine slices XLA:CPU
    turned into separate pad fusions, each materializing the whole tensor (39 ms of a 205 ms step). On CPU the
    kernel gradient is one pass of a C++ kernel (`native.depthwise_kernel_grad`) when it could be built: as nine
    sums, XLA:CPU still wrote out every shifted copy for YNNPACK's reductions."""
    return _shifted_sum(x, kernel)


def _shifted_depthwise_fwd(x, kernel):
    return _shifted_sum(x, kernel), (x, kernel)


def _shifted_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """The depthwise kernel's gradient as nine channel sums of shifted products, float32 [3, 3, 1, C]."""
    h, w = x.shape[-3], x.shape[-2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dk = jnp.stack([jnp.sum(xp[:, i:i + h, j:j + w, :] * g, axis=tuple(range(g.ndim - 1)))
                    for i in range(3) for j in range(3)])
    return dk.reshape(3, 3, 1, x.shape[-1]).astype(jnp.float32)


def _shifted_depthwise_bwd(residuals, g):
    x, kernel = residuals
    dx = _shifted_sum(g, jnp.flip(kernel, (0, 1)))
    if x.ndim == 4 and native.available():  # on CPU, one pass of a native kernel (rnan_jax/native.py)
        dk = jax.lax.platform_dependent(x, g, cpu=native.depthwise_kernel_grad, default=_shifted_kernel_grad)
    else:
        dk = _shifted_kernel_grad(x, g)
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv ('DC' of eq. 7): kernel [3, 3, 1, C], bias [C], the layout of `nn.Conv` with
    `feature_group_count=C`, computed either through `feature_group_count` or as shifted multiply-adds."""

    features: int
    dtype: Any = jnp.float32
    impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (3, 3, 1, self.features)
        init = torch_uniform(shape)
        kernel = self.param("kernel", init, shape).astype(self.dtype)
        bias = self.param("bias", init, (self.features,)).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.impl == "grouped":
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.features)
        elif self.impl == "shifted":
            y = shifted_depthwise(x, kernel)
        else:
            raise ValueError(f"depthwise must be one of {DEPTHWISE_IMPLS}, got {self.impl!r}")
        return y + bias


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
