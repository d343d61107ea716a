"""The convolutions RNAN is built from, and how each is computed, as Flax linen modules.

`conv` makes a biased 'SAME' 1x1 (`PointwiseConv`) or 3x3 (`Conv3x3`) conv, `DepthwiseConv` the 3x3 depthwise
conv of neuron attention. Their parameters are `nn.Conv`'s (kernel [k, k, in / groups, out], bias [out]) with
PyTorch's default initialization (`torch_bound`), so checkpoints do not depend on how a conv is computed: on
CPU, where the native kernels build (rnan_jax/native.py), through custom VJPs whose forward or gradients are
native kernels (`native_conv`, `shifted_depthwise`), elsewhere as XLA's convolutions. Layout is NHWC.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnan_jax import native

DEPTHWISE_IMPLS = ("grouped", "shifted")


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


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` (bias [C] over y's last axis), whose bias gradient sums the output gradient in float32.

    Autodiff's sum runs in the output's dtype: in bfloat16 the many tiny terms of a mean loss's gradient
    stalled it (the reconstruction conv's three bias gradients, all about -0.0086 against -0.016, -0.082 and
    -0.064 in float32 at a batch of 16 48x48 patches; the other biases' 3-4x too small)."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, bias


def _add_bias_bwd(bias, g):
    return g, jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _biased(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias`: through `add_bias` below float32 only, so that the float32 step's program stays as it was."""
    return y + bias if y.dtype == jnp.float32 else add_bias(y, bias)


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
        return _biased(_conv(x.astype(self.dtype), kernel), bias)


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


def _differentiable(fast: Callable[..., jax.Array], reference: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fast` (a native kernel's call, which JAX cannot differentiate) with the derivatives of `reference`, the same
    function in XLA's operations. A first-order gradient never differentiates these calls (they are the custom VJPs'
    own rules, its program unchanged); a gradient of a gradient (MAML-style meta-learning, a gradient penalty, a
    Hessian-vector product) does, and raised "The FFI call to `rnan_conv3x3` cannot be differentiated"."""

    @jax.custom_vjp
    def f(*args):
        return fast(*args)

    def f_fwd(*args):
        return fast(*args), args

    def f_bwd(args, g):
        return jax.vjp(reference, *args)[1](g)

    f.defvjp(f_fwd, f_bwd)
    return f


def _native_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_plain_conv`, except a 3x3 conv that a native kernel takes (`_native_3x3`) on CPU."""
    fast = _native_3x3(kernel.shape[2], kernel.shape[3]) if kernel.shape[0] == 3 else None
    if fast is None:
        return _plain_conv(x, kernel)
    return jax.lax.platform_dependent(
        x, kernel, cpu=_differentiable(lambda x, k: fast(x, k).astype(x.dtype), _plain_conv), default=_plain_conv)


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
        dtype = x.dtype

        def transposed(conv3x3):
            return lambda g, k: conv3x3(g, jnp.flip(k, (0, 1)).swapaxes(2, 3)).astype(dtype)

        dx = jax.lax.platform_dependent(
            g, kernel, cpu=_differentiable(transposed(fast), transposed(_plain_conv)), default=xla_input_grad)

    shape, dtype = kernel.shape, kernel.dtype  # closed over as values: the rules below may be differentiated

    def xla_grad(x, g):
        return jax.vjp(lambda k: _plain_conv(x, k), jnp.zeros(shape, dtype))[1](g)[0].astype(jnp.float32)

    def native_grad(x, g):
        return native.conv_kernel_grad(x, g, shape[0])

    dk = jax.lax.platform_dependent(x, g, cpu=_differentiable(native_grad, xla_grad), default=xla_grad)
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
        dk = jax.lax.platform_dependent(
            x, g, cpu=_differentiable(native.depthwise_kernel_grad, _shifted_kernel_grad), default=_shifted_kernel_grad)
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
        return _biased(y, bias)
