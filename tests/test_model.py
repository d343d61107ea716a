"""The network's structure and numerics: parameter counts, shapes, pixel shuffle, GC attention, knobs."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnan_jax import RNANConfig, apply, infer_config, init
from rnan_jax.api import build, count_params
from rnan_jax.model import GlobalContext, pixel_shuffle

TINY = dict(features=16, num_groups=2, num_blocks=2, gc_reduction=4)
# Compiled once per shape and knob setting: eager Flax dispatch op by op is far slower on CPU.
japply = jax.jit(apply, static_argnames=("config", "dtype", "scan_unroll", "depthwise"))


def _count(config):
    return count_params(jax.eval_shape(lambda k: init(k, config), jax.random.key(0)))


@pytest.mark.parametrize("scale,expected", [(2, 17_156_037), (3, 17_340_677), (4, 17_303_749)])
def test_default_parameter_counts(scale, expected):
    assert _count(RNANConfig(scale=scale)) == expected


@pytest.mark.parametrize("scale,expected", [(2, 17_122_887), (3, 17_307_527), (4, 17_270_599)])
def test_parameter_counts_20x10_interval_2_reading(scale, expected):
    config = RNANConfig(scale=scale, num_groups=20, num_blocks=10, group_interval=2, block_interval=2)
    assert _count(config) == expected


def test_infer_config_reads_intervals_and_scale():
    config = RNANConfig(scale=3, features=32, num_groups=4, num_blocks=6, group_interval=2, block_interval=3,
                        gc_reduction=8)
    shapes = jax.eval_shape(lambda k: init(k, config), jax.random.key(0))
    assert infer_config(shapes) == config
    with pytest.raises(ValueError, match="not an RNAN parameter tree"):
        infer_config({"head": {}})


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shapes_odd_sizes(scale):
    params = init(jax.random.key(0), RNANConfig(scale=scale, **TINY))
    lr = jnp.full((2, 13, 17, 3), 0.5)
    assert jax.eval_shape(apply, params, lr).shape == (2, 13 * scale, 17 * scale, 3)
    assert japply(params, lr[:1]).shape == (1, 13 * scale, 17 * scale, 3)
    assert jax.eval_shape(apply, params, lr[0]).shape == (13 * scale, 17 * scale, 3)


def _torch_pixel_shuffle_numpy(x, s):
    # Independent reading of torch.nn.PixelShuffle on NCHW: out[c, h*s+i, w*s+j] = in[c*s*s + i*s + j, h, w].
    n, c_in, h, w = x.shape
    c = c_in // (s * s)
    out = np.zeros((n, c, h * s, w * s), x.dtype)
    for ch, i, j in itertools.product(range(c), range(s), range(s)):
        out[:, ch, i::s, j::s] = x[:, ch * s * s + i * s + j]
    return out


@pytest.mark.parametrize("s", [2, 3])
def test_pixel_shuffle_matches_pytorch_order(s):
    x = np.random.RandomState(0).randn(2, 4 * s * s, 5, 7).astype(np.float32)  # NCHW
    expected = _torch_pixel_shuffle_numpy(x, s).transpose(0, 2, 3, 1)
    got = pixel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), s)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_depthwise_kernel_shape_and_stacking():
    config = RNANConfig(scale=2, **TINY)
    params = init(jax.random.key(0), config)
    dc = params["groups"]["blocks"]["na"]["dc"]["kernel"]
    assert dc.shape == (2, 2, 3, 3, 1, 16)  # [G, B] stacked by nn.scan, then (3, 3, 1, C)
    assert params["groups"]["gc"]["ln"]["scale"].shape == (2, 4)


def test_pytorch_style_initialization_bounds():
    params = init(jax.random.key(0), RNANConfig(scale=2, **TINY))
    c1 = params["groups"]["blocks"]["c1"]
    bound = 1 / np.sqrt(16 * 9)
    for leaf in (c1["kernel"], c1["bias"]):
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound
    # U(-b, b) has std b / sqrt(3); Flax's lecun_normal would give sqrt(3) times that.
    assert np.std(c1["kernel"]) == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_gc_attention_sums_to_one():
    gc = GlobalContext(features=16, reduction=4)
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 16))
    variables = gc.init(jax.random.key(1), x)
    assert set(variables) == {"params"}  # init sows nothing
    out, state = gc.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_array_equal(out, gc.apply(variables, x))  # sowing leaves the output as it is
    (attention,) = state["intermediates"]["attention"]
    assert attention.shape == (2, 5, 7)
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    # The context is one vector per image: out - x is constant over positions.
    delta = np.asarray(out - x)
    np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1, :1], delta.shape), atol=1e-6)


def test_model_sows_every_groups_gc_attention():
    config = RNANConfig(scale=2, **TINY)
    params = init(jax.random.key(0), config)
    lr = jax.random.uniform(jax.random.key(1), (3, 5, 7, 3))
    model = build(config, scan_unroll=1)
    sr, state = model.apply({"params": params}, lr, mutable=["intermediates"])
    np.testing.assert_array_equal(sr, model.apply({"params": params}, lr))
    (attention,) = state["intermediates"]["groups"]["gc"]["attention"]
    assert attention.shape == (2, 3, 5, 7)  # [G, batch, h, w]
    np.testing.assert_allclose(attention.sum(axis=(2, 3)), 1.0, rtol=1e-6)


def test_full_size_model_output_is_order_one_at_init():
    params = init(jax.random.key(0), RNANConfig(scale=4))
    lr = jax.random.uniform(jax.random.key(1), (1, 12, 12, 3))
    sr = jax.jit(lambda p, x: apply(p, x, scan_unroll=1))(params, lr)
    assert sr.shape == (1, 48, 48, 3)
    assert bool(jnp.all(jnp.isfinite(sr)))
    assert float(jnp.abs(sr).max()) < 3.0  # Flax's default init gives ~1e6 here (DESIGN.md)


def test_inferred_config_equals_explicit():
    config = RNANConfig(scale=3, features=16, num_groups=2, num_blocks=4, block_interval=2, gc_reduction=4)
    params = init(jax.random.key(0), config)
    lr = jax.random.uniform(jax.random.key(1), (1, 9, 11, 3))
    np.testing.assert_array_equal(japply(params, lr), japply(params, lr, config=config))


def test_jit_vmap_grad():
    params = init(jax.random.key(0), RNANConfig(scale=2, **TINY))
    lr = jax.random.uniform(jax.random.key(1), (2, 6, 5, 3))
    eager = apply(params, lr, scan_unroll=1)  # op by op, outside jit
    np.testing.assert_allclose(jax.jit(apply)(params, lr), eager, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda x: apply(params, x)))(lr), eager, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.abs(apply(p, lr) - 0.5).mean()))(params)
    norms = [float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)]  # numpy: no compile per shape
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_bfloat16_compute_close_to_float32():
    params = init(jax.random.key(0), RNANConfig(scale=2, **TINY))
    lr = jax.random.uniform(jax.random.key(1), (2, 12, 12, 3))
    f32 = japply(params, lr)
    bf16 = japply(params, lr, dtype="bfloat16")
    assert bf16.dtype == jnp.float32  # output and parameters stay float32
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    # bfloat16 has an 8-bit mantissa: 2^-8 relative per op; 0.02 absolute on [0, 1] images (~ 5/255).
    assert float(jnp.abs(bf16 - f32).max()) < 0.02
    assert float(jnp.abs(bf16 - f32).mean()) < 0.004
    # apply casts the parameters once (model.cast_params): bit for bit the modules' own casts.
    config = RNANConfig(scale=2, **TINY, dtype="bfloat16")
    own = jax.jit(lambda p, x: build(config).apply({"params": p}, x))(params, lr)
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(own))


def test_execution_knobs_compute_the_same_function():
    params = init(jax.random.key(0), RNANConfig(scale=4, features=16, num_groups=2, num_blocks=3, gc_reduction=4))
    lr = jax.random.uniform(jax.random.key(1), (2, 9, 7, 3))
    reference = japply(params, lr, scan_unroll=1, depthwise="grouped")
    for unroll, depthwise in itertools.product([1, 2, True, (1, True), (2, 1)], ["grouped", "shifted"]):
        out = japply(params, lr, scan_unroll=unroll, depthwise=depthwise)
        np.testing.assert_allclose(out, reference, atol=2e-6, err_msg=f"unroll={unroll} depthwise={depthwise}")
    with pytest.raises(ValueError, match="depthwise"):
        apply(params, lr, depthwise="fft")


def test_remat_recomputes_the_same_gradients_from_fewer_stacked_activations():
    """execution.remat: the same loss and gradients bit for bit (bfloat16 too), while the backward's stacked
    per-block activations ([G, B, batch, h, w, C] residuals) drop from 8 (six activations, two ReLU masks) to
    the block input alone ("block") or it and the two 3x3 conv outputs ("convs")."""
    config = RNANConfig(scale=2, features=16, num_groups=2, num_blocks=3, gc_reduction=4, dtype="bfloat16")
    params = init(jax.random.key(0), config)
    lr = jax.random.uniform(jax.random.key(1), (2, 12, 12, 3))
    hr = jax.random.uniform(jax.random.key(2), (2, 24, 24, 3))
    results, stacked = {}, {}
    for remat in ("none", "block", "convs"):
        model = build(config, scan_unroll=1, depthwise="grouped", remat=remat)

        def loss(p, model=model):
            return jnp.mean(jnp.abs(model.apply({"params": p}, lr) - hr))

        results[remat] = jax.jit(jax.value_and_grad(loss))(params)
        # the residuals' shapes and dtypes, traced (as the jitted backward holds them) rather than run op by op
        residuals = jax.tree.leaves(jax.eval_shape(lambda p, loss=loss: jax.vjp(loss, p)[1], params))
        stacked[remat] = sorted(str(r.dtype) for r in residuals if r.shape[:4] == (2, 3, 2, 12))
    assert stacked == {"none": ["bfloat16"] * 6 + ["bool"] * 2, "block": ["float32"],
                       "convs": ["bfloat16", "bfloat16", "float32"]}
    for remat in ("block", "convs"):
        assert float(results[remat][0]) == float(results["none"][0])
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     results[remat][1], results["none"][1])
    with pytest.raises(ValueError, match="remat"):
        build(config, remat="all")


def test_config_validation():
    with pytest.raises(ValueError, match="scale"):
        RNANConfig(scale=8)
    with pytest.raises(ValueError, match="block_interval"):
        RNANConfig(num_blocks=20, block_interval=3)
    params = init(jax.random.key(0), RNANConfig(scale=2, **TINY))
    with pytest.raises(ValueError, match=r"\[B, h, w, 3\]"):
        apply(params, jnp.zeros((4, 4)))
    # an 8-bit image as it comes (0..255) is refused, not upscaled into values near 1,000
    with pytest.raises(TypeError, match=r"^lr must be floating point with values in \[0, 1\], got uint8 \(an 8-bit"):
        apply(params, np.zeros((4, 4, 3), np.uint8))


def test_init_draws_the_modules_own_distribution():
    from rnan_jax.model import RNAN

    config = RNANConfig(scale=2, features=32, num_groups=2, num_blocks=3, gc_reduction=4)
    fast = init(jax.random.key(0), config)
    # the module's own init, jitted: the same draws as op by op, compiled once instead of per op
    reference = jax.jit(RNAN(config, scan_unroll=1).init)(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))["params"]
    pairs = zip(jax.tree_util.tree_leaves_with_path(fast), jax.tree_util.tree_leaves(reference))
    for (path, a), b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32, path
        a, b = np.asarray(a), np.asarray(b)  # numpy's statistics: no jnp op compiled per leaf shape
        if b.size >= 512:
            assert float(np.std(a)) == pytest.approx(float(np.std(b)), rel=0.15), path
            assert float(np.abs(a).max()) <= float(np.abs(b).max()) * 1.02 + 1e-7, path
        elif float(np.std(b)) == 0:
            np.testing.assert_array_equal(a, b, err_msg=str(path))  # LayerNorm scale 1, bias 0


def test_pointwise_conv_is_a_dot_on_cpu_and_the_convolution_elsewhere():
    """Same parameters and numbers as nn.Conv's 1x1; lowered as a dot for CPU, as a convolution for GPUs."""
    import flax.linen as nn

    from rnan_jax.convs import PointwiseConv

    layer = PointwiseConv(8, 4)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    params = layer.init(jax.random.key(1), x)
    f = jax.jit(layer.apply)
    np.testing.assert_allclose(f(params, x), nn.Conv(8, (1, 1), padding="SAME").apply(params, x), atol=1e-6)
    cpu = f.trace(params, x).lower(lowering_platforms=("cpu",)).as_text()
    cuda = f.trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "dot_general" in cpu and "convolution" not in cpu
    assert "convolution" in cuda and "dot_general" not in cuda


def test_the_train_step_lowered_for_a_gpu_calls_no_native_cpu_kernel():
    """The native kernels (rnan_jax/native.py) are picked per platform when the program is lowered: the
    gradient program lowered for CUDA holds none of their FFI calls, the CPU one all three."""
    from rnan_jax import native

    if not native.available():
        pytest.skip("the native CPU kernels are not built here (no C++ compiler, or RNAN_JAX_NATIVE=0)")
    config = RNANConfig(scale=2, features=16, num_groups=1, num_blocks=1)
    model = build(config, depthwise="shifted")
    lr = jnp.zeros((2, 8, 8, 3))
    params = init(jax.random.key(0), config)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, lr) ** 2)

    traced = jax.jit(jax.grad(loss)).trace(params)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    targets = ("rnan_conv_kernel_grad", "rnan_conv3x3", "rnan_depthwise_kernel_grad")
    assert all(t in cpu for t in targets)
    assert not any(t in cuda for t in targets)


SMALL = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)


@pytest.fixture(scope="module")
def small_params():
    return init(jax.random.key(0), SMALL)


@pytest.mark.parametrize("shape,hint", [((6, 5), "gray"), ((2, 6, 5, 1), "gray"), ((3, 6, 5), r"transpose\(1, 2, 0\)"),
                                        ((2, 3, 6, 5), r"transpose\(0, 2, 3, 1\)")])
def test_lr_layout_mistakes_are_named(small_params, shape, hint):
    with pytest.raises(ValueError, match=hint):
        apply(small_params, np.zeros(shape, np.float32))


def test_lr_of_0_to_255_is_refused_outside_jit_and_odd_sizes_work(small_params):
    lr = np.random.default_rng(0).random((1, 6, 5, 3)) * 255  # float64, as numpy makes it
    with pytest.raises(ValueError, match="0..255 image"):
        apply(small_params, lr)
    assert apply(small_params, lr / 255).dtype == jnp.float32
    assert jax.jit(apply)(small_params, lr).shape == (1, 12, 10, 3)  # traced: values unchecked, no error
    for shape in [(1, 1, 5, 3), (1, 5, 1, 3), (0, 4, 4, 3)]:
        assert apply(small_params, jnp.zeros(shape)).shape == (shape[0], 2 * shape[1], 2 * shape[2], 3)
    np.testing.assert_allclose(apply(small_params, lr / 255, dtype=jnp.bfloat16),
                               apply(small_params, lr / 255, dtype="bfloat16"))


def test_params_that_do_not_fit_are_named(small_params):
    with pytest.raises(ValueError, match=r"params\['up_0'\]\['bias'\] has shape \(32,\), expected \(72,\)"):
        apply(small_params, np.zeros((1, 4, 4, 3), np.float32), config=RNANConfig(**{**SMALL.__dict__, "scale": 3}))
    with pytest.raises(ValueError, match=r"variables\['params'\]"):
        apply({"params": small_params}, np.zeros((1, 4, 4, 3), np.float32))
    odd = {**small_params, "fuse1": {"kernel": np.zeros((1, 1, 5, 8)), "bias": np.zeros(8)}}
    with pytest.raises(ValueError, match=r"not an RNAN parameter tree: params\['fuse1'\]\['kernel'\] has shape"):
        infer_config(odd)
    odd = {**small_params, "up_0": {"kernel": np.zeros((3, 3, 8, 20)), "bias": np.zeros(20)}}
    with pytest.raises(ValueError, match="not an RNAN parameter tree"):
        infer_config(odd)
    with pytest.raises(ValueError, match=r"params\['tail'\]\['bias'\] is missing"):
        infer_config({k: v for k, v in small_params.items() if k != "tail"})


def _torch_layout(params, config):
    """The state_dict that ../shared/peers/rnan_torch.py would hold for `params` (HWIO -> OIHW)."""
    sd = {"mean": np.asarray(config.rgb_mean, np.float32).reshape(1, 3, 1, 1)}

    def conv(prefix, p):
        sd[f"{prefix}.weight"] = np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))
        sd[f"{prefix}.bias"] = np.asarray(p["bias"])

    for name in ("head", "fuse1", "fuse3", "tail"):
        conv(name, params[name])
    for i in range(len(config.upsample_stages)):
        conv(f"up.{2 * i}", params[f"up_{i}"])
    one = lambda tree, *index: jax.tree_util.tree_map(lambda a: a[index], tree)  # noqa: E731
    for g in range(config.num_groups):
        group = one(params["groups"], g)
        for name in ("fuse1", "fuse3"):
            conv(f"groups.{g}.{name}", group[name])
        for name in ("k", "v1", "v2"):
            conv(f"groups.{g}.gc.{name}", group["gc"][name])
        sd[f"groups.{g}.gc.ln.weight"] = np.asarray(group["gc"]["ln"]["scale"]).reshape(-1, 1, 1)
        sd[f"groups.{g}.gc.ln.bias"] = np.asarray(group["gc"]["ln"]["bias"]).reshape(-1, 1, 1)
        for b in range(config.num_blocks):
            block = one(group["blocks"], b)
            for name in ("c1", "c2"):
                conv(f"groups.{g}.blocks.{b}.{name}", block[name])
            for name in ("dc", "pc"):
                conv(f"groups.{g}.blocks.{b}.na.{name}", block["na"][name])
    return sd


def test_convert_round_trip_and_bad_state_dicts_named_by_key(small_params):
    from rnan_jax.convert import from_torch_state_dict

    sd = _torch_layout(small_params, SMALL)
    for state_dict in (sd, {f"module.{k}": v for k, v in sd.items()}):  # DataParallel's prefix too
        jax.tree_util.tree_map(np.testing.assert_array_equal, from_torch_state_dict(state_dict, SMALL), small_params)
    with pytest.raises(ValueError, match=r"groups\.0\.blocks\.1\.c2\.weight missing"):
        from_torch_state_dict({k: v for k, v in sd.items() if k != "groups.0.blocks.1.c2.weight"}, SMALL)
    with pytest.raises(ValueError, match=r"groups\.0\.blocks\.2\.c1\.weight is not a parameter"):
        from_torch_state_dict({**sd, "groups.0.blocks.2.c1.weight": sd["groups.0.blocks.1.c1.weight"]}, SMALL)
    with pytest.raises(ValueError, match=r"groups\.0\.blocks\.1\.c1\.weight has shape \(8, 8, 1, 1\), expected "
                                         r"\(8, 8, 3, 3\)"):
        from_torch_state_dict({**sd, "groups.0.blocks.1.c1.weight": np.zeros((8, 8, 1, 1))}, SMALL)
    with pytest.raises(ValueError, match=r"up\.0\.weight has shape"):
        from_torch_state_dict(sd, RNANConfig(**{**SMALL.__dict__, "scale": 3}))


def test_bfloat16_bias_gradients_are_summed_in_float32():
    """Every conv's bias gradient is a sum over the whole batch of the output gradient, whose terms under a mean
    loss are tiny: summed in bfloat16 (autodiff's sum of a bfloat16 add) it stalled, the reconstruction conv's
    three bias gradients all near one value (-0.0086 against -0.016, -0.082, -0.064 in float32 at batch 16 of
    48x48), the other biases' several times too small. Now each is float32's to bfloat16's precision."""
    config = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=2, gc_reduction=2)
    params = init(jax.random.key(0), config)
    lr = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
    hr = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model = build(RNANConfig(**{**config.__dict__, "dtype": dtype}), scan_unroll=1, depthwise="grouped")
        grads[dtype] = jax.jit(jax.grad(lambda p, m=model: jnp.mean(jnp.abs(m.apply({"params": p}, lr) - hr))))(
            params)
    errors = {}
    for (path, b16), f32 in zip(jax.tree_util.tree_leaves_with_path(grads["bfloat16"]),
                                jax.tree_util.tree_leaves(grads["float32"])):
        name = jax.tree_util.keystr(path)
        # the depthwise bias's gradient is dominated by the bfloat16 forward's rounding (4% apart either way); the
        # GC transform computes in float32, its logits' bias has no gradient (softmax)
        if name.endswith("['bias']") and "['gc']" not in name and "['dc']" not in name:
            b16, f32 = np.asarray(b16, np.float64), np.asarray(f32, np.float64)
            errors[name] = np.linalg.norm(b16 - f32) / np.linalg.norm(f32)
    assert len(errors) == 10 and max(errors.values()) < 0.02, errors
    assert errors["['tail']['bias']"] < 0.01  # was 0.68


def test_a_gradient_of_a_gradient_goes_through_the_native_kernels():
    """Second-order reverse mode (MAML-style meta-learning: the loss after one inner SGD step, differentiated w.r.t.
    the parameters before it; a penalty on the input gradient) through the default CPU path, whose convs' forward and
    gradients are native kernels: it raised "The FFI call to `rnan_conv3x3` cannot be differentiated". Now it equals
    the pure-XLA path's (native kernels off) to float32 rounding."""
    from rnan_jax import native

    if not native.available():
        pytest.skip("the native CPU kernels are not built here (no C++ compiler, or RNAN_JAX_NATIVE=0)")
    config = RNANConfig(scale=2, features=16, num_groups=1, num_blocks=1, gc_reduction=4)
    params = init(jax.random.key(0), config)
    lr = jax.random.uniform(jax.random.key(1), (1, 5, 4, 3))
    hr = jax.random.uniform(jax.random.key(2), (1, 10, 8, 3))

    def loss(p, x):
        return jnp.mean((apply(p, x, depthwise="shifted") - hr) ** 2)

    def meta(p):  # the loss after one inner SGD step
        return loss(jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p, lr)), lr)

    def penalty(x):
        return jnp.sum(jax.grad(loss, argnums=1)(params, x) ** 2)

    for f, arg in ((meta, params), (penalty, lr)):
        got = jax.jit(jax.grad(f))(arg)
        with native.disabled():
            expected = jax.jit(jax.grad(f))(arg)
        scale = max(float(np.abs(e).max()) for e in jax.tree.leaves(expected))  # numpy: no compile per shape
        assert scale > 0
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale), got, expected)


def test_an_rnan_submodule_s_parameters_are_named_where_they_nest(small_params):
    """RNAN inside a user's module (a GAN's generator wrapper): its parameters nest under the submodule's name, and
    apply / infer_config / upscale_image given the whole tree said only "not an RNAN parameter tree (missing or odd
    entry: 'head')". Now they name the sub-tree to pass, which computes what the wrapper computes."""
    import flax.linen as nn

    from rnan_jax import upscale_image
    from rnan_jax.model import RNAN

    class Generator(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.clip(RNAN(SMALL, name="rnan")(x), 0.0, 1.0)

    lr = jax.random.uniform(jax.random.key(1), (1, 5, 6, 3))
    shapes = jax.eval_shape(Generator().init, jax.random.key(0), lr)
    assert jax.tree.map(lambda s: s.shape, shapes["params"]["rnan"]) == jax.tree.map(np.shape, small_params)
    variables = {"params": {"rnan": small_params}}
    np.testing.assert_allclose(Generator().apply(variables, lr), jnp.clip(japply(small_params, lr), 0.0, 1.0),
                               atol=1e-6)
    gan = {"generator": variables["params"], "discriminator": {"Dense_0": {"kernel": np.zeros((3, 1))}}}
    for call in (lambda: apply(gan, lr), lambda: apply(gan, lr, config=SMALL), lambda: infer_config(gan),
                 lambda: upscale_image(gan, np.zeros((4, 4, 3), np.uint8))):
        with pytest.raises(ValueError, match=r"^params holds an RNAN's parameters under params\['generator'\]"
                                             r"\['rnan'\] \(RNAN as a submodule\): pass "
                                             r"params\['generator'\]\['rnan'\]"):
            call()
    with pytest.raises(ValueError, match=r"pass variables\['params'\]\['rnan'\], the bare tree of the RNAN submodule"):
        apply(variables, lr)
    assert infer_config(gan["generator"]["rnan"]) == SMALL


def test_the_module_refuses_an_8_bit_or_unbatched_lr_in_one_line(small_params):
    """The linen module used directly (as a user's submodule) has no `apply` in front of it: a uint8 image gave
    values near 60..255 without an error, an unbatched [h, w, 3] one "convolution requires lhs and rhs ndim to be
    equal" from inside the head conv."""
    from rnan_jax.model import RNAN

    module, variables = RNAN(SMALL), {"params": small_params}
    lr = np.random.default_rng(0).integers(0, 256, (1, 5, 6, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match=r"^RNAN: lr must be floating point with values in \[0, 1\], got uint8"):
        module.apply(variables, lr)
    with pytest.raises(ValueError, match=r"^RNAN: lr must be \[B, h, w, 3\], got shape \(5, 6, 3\) \(one image: "
                                         r"pass lr\[None\]\)"):
        module.apply(variables, lr[0] / 255.0)
    np.testing.assert_allclose(module.apply(variables, lr / 255.0), japply(small_params, lr / 255.0), atol=1e-6)


def test_group_and_block_interval_2_match_the_pytorch_peer(torch_rnan):
    """Every N-th group's output (groups N, 2N, ...) enters global fusion, not groups 1, N + 1, ...: the same
    parameter count either way, so only the numbers tell (the parity tests' configs used N = 1)."""
    import torch

    from rnan_jax.convert import from_torch_state_dict

    config = RNANConfig(scale=2, features=8, num_groups=4, num_blocks=4, group_interval=2, block_interval=2,
                        gc_reduction=2)
    torch.manual_seed(0)
    model = torch_rnan(scale=2, c=8, n_groups=4, n_blocks=4, group_interval=2, block_interval=2, r=2).eval()
    params = from_torch_state_dict(model.state_dict(), config)
    lr = np.random.RandomState(0).rand(1, 9, 11, 3).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(lr).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(japply(params, lr, config=config)), expected, atol=1e-5)


def test_the_module_s_own_init_draws_every_block_and_group_apart():
    """RNAN(config).init (the module as a user's submodule) draws each stacked block and group with its own key:
    with one key shared along a scan, every block of a group (or every group) starts as the same function."""
    from rnan_jax.model import RNAN

    config = RNANConfig(scale=2, features=8, num_groups=2, num_blocks=3, gc_reduction=2)
    params = jax.jit(RNAN(config, scan_unroll=1).init)(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    for name, leaf in (("c1", params["groups"]["blocks"]["c1"]["kernel"]),
                       ("dc", params["groups"]["blocks"]["na"]["dc"]["kernel"])):
        flat = np.asarray(leaf).reshape(6, -1)  # [G * B, ...]
        for i, j in itertools.combinations(range(6), 2):
            assert not np.allclose(flat[i], flat[j]), (name, i, j)
    groups = params["groups"]
    for name, leaf in (("k", groups["gc"]["k"]["kernel"]), ("v1", groups["gc"]["v1"]["kernel"]),
                       ("fuse1", groups["fuse1"]["kernel"])):
        assert not np.allclose(leaf[0], leaf[1]), name  # [G, ...]


def test_architecture_sizes_must_be_integers():
    """RNANConfig(scale=2.0) or features=32.0 passed the checks and failed deep in JAX ("Shapes must be 1D sequences
    of concrete values of integer type, got (3, 3, 8, 32.0)"); numpy integers are taken as Python ints."""
    import numpy as np

    for bad in ({"scale": 2.0}, {"features": 32.0}, {"num_blocks": True}):
        with pytest.raises(ValueError, match=rf"RNANConfig: scale, .* must be integers, got {list(bad)[0]}="):
            RNANConfig(**bad)
    config = RNANConfig(scale=np.int64(2), features=np.int32(32))
    assert (type(config.scale), type(config.features)) == (int, int) and config == RNANConfig(scale=2, features=32)
