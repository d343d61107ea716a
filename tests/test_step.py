"""The train step's options: EMA, loss-spike skipping, non-finite steps, the learning-rate schedules."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnan_jax import RNANConfig, native, step
from rnan_jax.step import OptimConfig, StepSpec, create_state, empty_metrics, learning_rate, train_step

MODEL = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    return {"lr": rng.randint(0, 256, (2, 6, 6, 3)).astype(np.uint8),
            "hr": rng.randint(0, 256, (2, 12, 12, 3)).astype(np.uint8)}


def _step(spec, state):
    return jax.jit(lambda s, b, a: train_step(s, b, a, spec=spec))(state, _batch(), empty_metrics())


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_ema_is_the_moving_average_of_the_parameters():
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, ema_decay=0.9))
    state = create_state(jax.random.key(0), spec=spec)
    new, acc = _step(spec, state)
    for e, p0, p1 in zip(_leaves(new.ema), _leaves(state.params), _leaves(new.params)):
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(new.params), _leaves(state.params)))
    assert int(new.step) == 1 and float(acc["steps"]) == 1 and float(acc["loss"]) > 0
    assert create_state(jax.random.key(0), spec=StepSpec(MODEL, OptimConfig())).ema is None


def test_a_fresh_state_with_ema_goes_through_the_jitted_step_that_donates_it():
    """create_state's EMA was the parameters' own arrays: jit_train_step, which donates the state, failed at the
    first step ("Attempt to donate the same buffer twice"; a segfault on 4 devices). It is the same step as the
    one that does not donate."""
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, ema_decay=0.9))
    state = create_state(jax.random.key(0), spec=spec)
    expected, _ = _step(spec, state)
    jitted, replicated, _ = step.jit_train_step(spec, step.data_mesh(jax.devices()[:1]))
    new, acc = jitted(state, _batch(), jax.device_put(empty_metrics(), replicated))
    assert int(new.step) == 1 and float(acc["steps"]) == 1
    for a, b in zip(_leaves((new.params, new.ema)), _leaves((expected.params, expected.ema))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(new.ema), _leaves(new.params)))


def test_loss_spike_is_skipped():
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, skip_threshold=2.0))
    state = create_state(jax.random.key(0), spec=spec)
    # A running loss far below this batch's loss, past the warm-up: the step is a spike.
    state = state.replace(step=jnp.asarray(500, jnp.int32), loss_avg=jnp.asarray(1e-4, jnp.float32))
    new, acc = _step(spec, state)
    assert float(acc["skipped"]) == 1 and float(acc["nonfinite"]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(new.params), _leaves(state.params)))
    assert int(new.step) == 501 and float(new.loss_avg) == pytest.approx(1e-4)
    # The same batch against a running loss of its own size goes through.
    new, acc = _step(spec, state.replace(loss_avg=jnp.asarray(1.0, jnp.float32)))
    assert float(acc["skipped"]) == 0
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(new.params), _leaves(state.params)))


def test_non_finite_update_leaves_the_state_and_is_counted():
    spec = StepSpec(MODEL, OptimConfig(lr=1e38, eps=1e-30))
    state = create_state(jax.random.key(0), spec=spec)
    new, acc = _step(spec, state)
    assert float(acc["nonfinite"]) == 1
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(new.params), _leaves(state.params)))
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(new.opt_state), _leaves(state.opt_state)))


def test_schedules():
    step = learning_rate(OptimConfig(lr=1e-4, decay_every=200_000, decay_factor=0.5))
    assert [float(step(s)) for s in (0, 199_999, 200_000, 400_000, 999_999)] == pytest.approx(
        [1e-4, 1e-4, 5e-5, 2.5e-5, 6.25e-6])
    warm = learning_rate(OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, total_steps=110))
    assert [float(warm(s)) for s in (0, 5, 9, 10, 60, 110)] == pytest.approx([1e-4, 6e-4, 1e-3, 1e-3, 5e-4, 0],
                                                                             abs=1e-9)
    assert float(learning_rate(OptimConfig(lr=3e-4, schedule="constant"))(10**6)) == pytest.approx(3e-4)
    # a warmup does not move the step schedule's milestones (they were warmup_steps late)
    warm_step = learning_rate(OptimConfig(lr=1e-4, decay_every=1000, decay_factor=0.5, warmup_steps=100))
    assert [float(warm_step(s)) for s in (0, 50, 100, 999, 1000, 1099, 2000)] == pytest.approx(
        [1e-6, 5.1e-5, 1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])
    # explicit milestones (BasicSR's MultiStepLR; SwinIR's recipe), with and without a warmup
    swinir = learning_rate(OptimConfig(lr=2e-4, milestones="250000,400000,450000,475000", decay_factor=0.5))
    assert [float(swinir(s)) for s in (0, 249_999, 250_000, 399_999, 400_000, 450_000, 475_000, 499_999)] == \
        pytest.approx([2e-4, 2e-4, 1e-4, 1e-4, 5e-5, 2.5e-5, 1.25e-5, 1.25e-5])
    warm_ms = learning_rate(OptimConfig(lr=1e-4, milestones=" 300, 700", decay_factor=0.1, warmup_steps=100))
    assert [float(warm_ms(s)) for s in (0, 50, 100, 299, 300, 699, 700)] == pytest.approx(
        [1e-6, 5.1e-5, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6])


def test_a_warmup_s_first_step_moves_the_weights():
    """BasicSR's linear warmup (warmup_iter W): update k of the first W at lr * k / W (k from 1), the W-th at lr.
    The ramp started at 0 at the optimizer's count 0, the first update's: that step changed no weight and logged
    "lr 0", and the ramp reached lr one step late (warmup_steps=1 was a wasted step, nothing more)."""
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, schedule="constant", warmup_steps=4))
    state = create_state(jax.random.key(0), spec=spec)
    new, acc = _step(spec, state)
    assert float(acc["lr"]) == pytest.approx(2.5e-3)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(new.params), _leaves(state.params)))
    ramp = learning_rate(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=4))
    assert [float(ramp(s)) for s in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    one = learning_rate(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=1))
    assert [float(one(s)) for s in range(3)] == pytest.approx([1e-2, 1e-2, 1e-2])


@pytest.mark.parametrize("fields,message", [
    (dict(milestones="400000,200000"), "optim.milestones must be increasing positive steps, comma-separated, e.g. "
                                       "'200000,400000'; got '400000,200000'"),
    (dict(milestones="200k"), "optim.milestones must be increasing positive steps"),
    (dict(milestones="0,10"), "optim.milestones must be increasing positive steps"),
    (dict(milestones="100", schedule="cosine"), "optim.milestones is read by schedule 'step' only; the schedule is "
                                                "'cosine'"),
])
def test_bad_milestones_are_one_line(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OptimConfig(**fields)


def test_gradient_clipping_scales_the_gradient_to_the_threshold():
    # With eps far above every |g|, Adam's first update is lr * g / eps: linear in the gradient, so clipping
    # to global norm c must scale the whole update by c / |g|.
    base = OptimConfig(lr=100.0, eps=1e3)  # updates of ~0.01, far above float32 rounding of the params
    state = create_state(jax.random.key(0), spec=StepSpec(MODEL, base))
    free, acc = _step(StepSpec(MODEL, base), state)
    norm = float(acc["grad_norm"])
    clipped, acc_c = _step(StepSpec(MODEL, dataclasses.replace(base, grad_clip=norm / 4)), state)
    assert float(acc_c["grad_norm"]) == pytest.approx(norm)  # the logged norm is the one before clipping
    for p0, pf, pc in zip(_leaves(state.params), _leaves(free.params), _leaves(clipped.params)):
        np.testing.assert_allclose(pc - p0, (pf - p0) / 4, rtol=2e-3, atol=1e-6)


def test_casting_parameters_once_keeps_the_loss_and_rounds_only_the_scanned_weight_gradients():
    """model.cast_params before the forward (one cast of each stacked array) against the modules' own casts
    inside the scan: the same bfloat16 forward, so the same loss; the same gradients except the scanned
    convolution kernels', which arrive rounded to bfloat16 (0.1-0.3% of their largest entry, not more);
    GlobalContext's float32 transform keeps float32 parameters."""
    from rnan_jax.model import cast_params
    from rnan_jax.step import _loss_and_grads

    config = dataclasses.replace(MODEL, num_groups=2, num_blocks=2, dtype="bfloat16")
    params = create_state(jax.random.key(1), spec=StepSpec(config, OptimConfig())).params
    cast = cast_params(params, "bfloat16")
    dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(cast)}
    assert dtypes["['groups']['gc']['ln']['scale']"] == jnp.float32
    assert dtypes["['groups']['gc']['v1']['kernel']"] == jnp.float32
    assert dtypes["['groups']['blocks']['c1']['kernel']"] == jnp.bfloat16
    assert dtypes["['head']['kernel']"] == jnp.bfloat16
    assert cast_params(params, "float32") is params
    batch = _batch()
    lr, hr = (jnp.asarray(batch[k], jnp.float32) / 255.0 for k in ("lr", "hr"))
    results = [jax.jit(lambda p, a, b, spec=StepSpec(config, OptimConfig(), cast_params_once=once):
                       _loss_and_grads(p, a, b, spec))(params, lr, hr) for once in (True, False)]
    (loss_once, grads_once), (loss_each, grads_each) = results
    assert float(loss_once) == float(loss_each) and float(loss_once) > 0.01
    differing = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_once), _leaves(grads_each)):
        a = np.asarray(a)
        assert a.dtype == np.float32 and np.abs(b).max() > 0
        relative = np.abs(a - b).max() / np.abs(b).max()
        assert relative < 2 ** -7, jax.tree_util.keystr(path)
        if relative > 0:
            differing.append(jax.tree_util.keystr(path))
    assert differing and all(p.startswith("['groups']") and p.endswith("['kernel']") for p in differing)


def test_the_fusion_autotuner_is_switched_off_on_gpus_only_and_by_an_option_this_jaxlib_knows():
    """execution.fusion_autotuner=false compiles the step with XLA's option off on a GPU; elsewhere, and by
    default, the step compiles with no options. The option's name is one this jaxlib accepts: a misspelt one
    fails the compile ("No such compile option"), also on the CPU."""
    off = StepSpec(MODEL, OptimConfig(), fusion_autotuner=False)
    assert step.compiler_options(off, "gpu") == {"xla_gpu_experimental_enable_fusion_autotuner": False}
    assert step.compiler_options(off, "cpu") == {} == step.compiler_options(off, "tpu")
    for spec in (StepSpec(MODEL, OptimConfig()), StepSpec(MODEL, OptimConfig(), fusion_autotuner=True)):
        assert step.compiler_options(spec, "gpu") == {}
    compiled = jax.jit(lambda x: x + 1, compiler_options=step.compiler_options(off, "gpu"))
    assert float(compiled(jnp.float32(1))) == 2.0
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_no_such_option": False})(jnp.float32(1))


def test_batch_chunks_resolves_the_default_and_rejects_a_chunking_that_would_not_split(monkeypatch):
    """The trainer and tools/benchmark.py both resolve execution.batch_chunks here, so neither runs (or
    reports) a chunk count that the step would silently ignore."""
    assert step.batch_chunks(0, 16, 1) == step.default_batch_chunks(16, 1)
    # the CPU default: 2 chunks of an even batch; without the native kernels 4 chunks of at least 4 samples;
    # one chunk on accelerators or many devices
    batches = (2, 3, 4, 6, 8, 12, 16, 20, 64)
    monkeypatch.setattr(native, "available", lambda: True)
    assert [step.default_batch_chunks(b, 1, "cpu") for b in batches] == [1, 1, 2, 2, 2, 2, 2, 2, 2]
    monkeypatch.setattr(native, "available", lambda: False)
    assert [step.default_batch_chunks(b, 1, "cpu") for b in batches] == [1, 1, 2, 2, 2, 2, 4, 4, 4]
    assert step.default_batch_chunks(16, 1, "gpu") == step.default_batch_chunks(16, 2, "cpu") == 1
    assert step.batch_chunks(4, 16, 1) == 4
    with pytest.raises(ValueError, match="execution.batch_chunks 3 does not divide the per-device batch 4"):
        step.batch_chunks(3, 4, 1)
    with pytest.raises(ValueError, match="batch_chunks -1"):
        step.batch_chunks(-1, 4, 1)


_CHUNKS_ON_DEVICES = """
import jax, numpy as np
from rnan_jax import RNANConfig, step
spec = step.StepSpec(RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2),
                     step.OptimConfig(), batch_chunks=2)
f, replicated, sharded = step.jit_train_step(spec, step.data_mesh())
state = jax.eval_shape(lambda: step.create_state(jax.random.key(0), spec=spec))
state, acc = (jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), t)
              for t in (state, step.empty_metrics()))
batch = {k: jax.ShapeDtypeStruct((8, p, p, 3), np.uint8, sharding=sharded) for k, p in (("lr", 6), ("hr", 12))}
print("collective-permute" in f.lower(state, batch, acc).compile().as_text())
"""


def test_batch_chunks_on_several_devices_move_no_samples_between_them():
    """Chunks of the global batch taken contiguously (jnp.split) each lay on some of the devices: the compiled
    step moved samples between devices (collective-permutes) every step. Strided chunks stay where they are."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _CHUNKS_ON_DEVICES], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr[-3000:]


_STEP_ON_DEVICES = """
import jax, json, numpy as np
from rnan_jax import RNANConfig, step
spec = step.StepSpec(RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2),
                     step.OptimConfig(ema_decay=0.9), batch_chunks={chunks})
rng = np.random.RandomState(0)
batch = {{"lr": rng.randint(0, 256, (8, 6, 6, 3)).astype(np.uint8),
          "hr": rng.randint(0, 256, (8, 12, 12, 3)).astype(np.uint8)}}
out = {{}}
for devices in (jax.devices()[:1], jax.devices()):
    f, replicated, sharded = step.jit_train_step(spec, step.data_mesh(devices))
    state = jax.jit(lambda k: step.create_state(k, spec=spec), out_shardings=replicated)(jax.random.key(0))
    acc = jax.device_put(step.empty_metrics(), replicated)
    b = {{k: jax.device_put(v, sharded) for k, v in batch.items()}}
    hlo = f.lower(state, b, acc).compile().as_text()
    state, acc = f(state, b, acc)
    out[len(devices)] = {{"gathers": hlo.count("all-gather"), "loss": float(acc["loss"]),
                          "grad_norm": float(acc["grad_norm"]),
                          "params": [np.asarray(x).ravel().tolist() for x in jax.tree_util.tree_leaves(state)]}}
print(json.dumps(out))
"""


@pytest.mark.parametrize("chunks", [1, 2])
def test_each_of_four_devices_computes_its_share_of_the_batch_and_the_step_is_the_one_device_step(chunks):
    """The batch sharded over 4 devices, the state replicated: left to XLA's partitioner, the native CPU kernels
    (custom calls, which it cannot split) had it gather the whole batch onto every device (all-gathers), so each
    device computed every sample, the CPU step of 2 devices slower than one's. Each device now computes its own
    share; the loss, gradient norm, parameters and EMA after the step are the one-device step's."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _STEP_ON_DEVICES.format(chunks=chunks)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, four = (json.loads(r.stdout.splitlines()[-1])[k] for k in ("1", "4"))
    assert four["gathers"] == 0
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-6) and one["loss"] > 0.1
    assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert len(four["params"]) == len(one["params"]) > 30
    for a, b in zip(four["params"], one["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_batch_chunks_give_the_loss_and_gradient_of_the_whole_batch():
    params = create_state(jax.random.key(0), spec=StepSpec(MODEL, OptimConfig())).params
    b = _batch()
    b = {k: np.concatenate([v, v[::-1] // 2]) for k, v in b.items()}  # 4 samples, 2 chunks of 2
    lr, hr = (jnp.asarray(b[k], jnp.float32) / 255.0 for k in ("lr", "hr"))
    # jitted as the train step runs it: op by op, each chunk's forward and backward took seconds of dispatch
    whole, chunked = (jax.jit(lambda p, a, b, spec=spec: step._loss_and_grads(p, a, b, spec))(params, lr, hr)
                      for spec in (StepSpec(MODEL, OptimConfig()), StepSpec(MODEL, OptimConfig(), batch_chunks=2)))
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    for a, c in zip(_leaves(whole[1]), _leaves(chunked[1])):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-7)


def test_pixel_losses_against_numpy():
    rng = np.random.RandomState(3)
    sr, hr = rng.rand(2, 5, 4, 3).astype(np.float32), rng.rand(2, 5, 4, 3).astype(np.float32)
    d = sr.astype(np.float64) - hr
    assert float(step.pixel_loss(sr, hr, "l1")) == pytest.approx(np.abs(d).mean(), rel=1e-6)
    assert float(step.pixel_loss(sr, hr, "l2")) == pytest.approx((d ** 2).mean(), rel=1e-6)
    assert float(step.pixel_loss(sr, hr, "charbonnier", 0.1)) == pytest.approx(np.sqrt(d ** 2 + 0.01).mean(), rel=1e-6)
    # Charbonnier is L1 where |d| >> eps, and eps where d = 0.
    assert float(step.pixel_loss(sr, hr, "charbonnier", 1e-6)) == pytest.approx(np.abs(d).mean(), rel=1e-4)
    assert float(step.pixel_loss(hr, hr, "charbonnier", 1e-3)) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("loss", ["l1", "l2", "charbonnier"])
def test_the_step_trains_on_the_configured_loss(loss):
    """The step's loss is optim.loss of the network's output (computed apart here with apply and numpy), and
    its gradient is that loss's: L2's and Charbonnier's differ from L1's."""
    from rnan_jax import apply

    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, loss=loss, charbonnier_eps=0.05))
    state = create_state(jax.random.key(0), spec=spec)
    new, acc = _step(spec, state)
    batch = _batch()
    sr = np.asarray(apply(state.params, batch["lr"] / 255.0, config=MODEL), np.float64)
    d = sr - batch["hr"] / 255.0
    expected = {"l1": np.abs(d), "l2": d ** 2, "charbonnier": np.sqrt(d ** 2 + 0.05 ** 2)}[loss].mean()
    assert float(acc["loss"]) == pytest.approx(expected, rel=1e-5)
    grads = jax.grad(step.train_loss)(state.params, batch["lr"] / 255.0, batch["hr"] / 255.0, spec)
    l1_grads = jax.grad(step.train_loss)(state.params, batch["lr"] / 255.0, batch["hr"] / 255.0,
                                         dataclasses.replace(spec, optim=OptimConfig(lr=1e-2)))
    same = all(np.allclose(a, b) for a, b in zip(_leaves(grads), _leaves(l1_grads)))
    assert same == (loss == "l1")


def test_an_unknown_loss_is_one_line():
    with pytest.raises(ValueError, match=r"optim.loss must be l1, l2 or charbonnier, got 'L1'"):
        OptimConfig(loss="L1")
    with pytest.raises(ValueError, match=r"optim.charbonnier_eps must be positive, got 0.0"):
        OptimConfig(loss="charbonnier", charbonnier_eps=0.0)


def test_float16_gradients_do_not_underflow():
    """model.dtype float16 (tools/compare_dtypes.py trains it): a mean loss's gradient of each output pixel
    (1/pixels) underflowed float16 in the backward, so that the attention convs' gradients came out all zero
    and the others rounded off; through the scaled loss each gradient is float32's to float16's precision."""
    config = RNANConfig(scale=2, features=16, num_groups=1, num_blocks=2, gc_reduction=4)
    params = create_state(jax.random.key(0), spec=StepSpec(config, OptimConfig())).params
    rng = np.random.RandomState(0)
    lr = jnp.asarray(rng.rand(8, 32, 32, 3), jnp.float32)
    hr = jnp.asarray(rng.rand(8, 64, 64, 3), jnp.float32)
    results = {}
    for dtype in ("float32", "float16"):
        spec = StepSpec(dataclasses.replace(config, dtype=dtype), OptimConfig(), scan_unroll=1, depthwise="grouped")
        results[dtype] = jax.jit(lambda p, a, b, spec=spec: step._loss_and_grads(p, a, b, spec))(params, lr, hr)
    assert float(results["float16"][0]) == pytest.approx(float(results["float32"][0]), rel=1e-3)
    errors = {}
    for (path, g16), g32 in zip(jax.tree_util.tree_leaves_with_path(results["float16"][1]),
                                _leaves(results["float32"][1])):
        name = jax.tree_util.keystr(path)
        if name != "['groups']['gc']['k']['bias']":  # no gradient at all (a constant under the softmax)
            errors[name] = np.linalg.norm(np.asarray(g16, np.float64) - g32) / np.linalg.norm(g32)
    assert len(errors) == 29 and max(errors.values()) < 0.02, errors


def test_two_steps_are_adam_with_the_configured_betas_and_eps_against_numpy():
    """Adam's first update is lr * sign-like g / (|g| + eps) whatever b1 and b2 are (bias correction): the second
    step is where they show. Both steps against Adam written out in numpy on the network's own gradients."""
    b1, b2, eps, lr = 0.5, 0.8, 1e-3, 1e-2
    spec = StepSpec(MODEL, OptimConfig(lr=lr, b1=b1, b2=b2, eps=eps, schedule="constant"))
    state = create_state(jax.random.key(0), spec=spec)
    batch = _batch()
    a, b = batch["lr"] / 255.0, batch["hr"] / 255.0
    grad = jax.jit(lambda p: jax.grad(step.train_loss)(p, a, b, spec))
    one, _ = _step(spec, state)
    two, _ = _step(spec, one)
    g1 = [np.asarray(g, np.float64) for g in _leaves(grad(state.params))]
    g2 = [np.asarray(g, np.float64) for g in _leaves(grad(one.params))]
    for p0, p1, p2, x1, x2 in zip(_leaves(state.params), _leaves(one.params), _leaves(two.params), g1, g2):
        m, v = (1 - b1) * x1, (1 - b2) * x1 ** 2
        np.testing.assert_allclose(p1, p0 - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps), rtol=0, atol=2e-5)
        m, v = b1 * m + (1 - b1) * x2, b2 * v + (1 - b2) * x2 ** 2
        np.testing.assert_allclose(p2, p1 - lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps), rtol=0,
                                   atol=2e-5)
    assert max(np.abs(np.asarray(p2) - p1).max() for p1, p2 in zip(_leaves(one.params), _leaves(two.params))) > 1e-3


def test_the_ema_moves_from_its_own_value_not_from_the_parameters():
    """A fresh state's EMA equals its parameters, which hid an EMA computed from the parameters before the step: an
    EMA that differs (a resumed run's) moves to decay * ema + (1 - decay) * the new parameters."""
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, ema_decay=0.9))
    state = create_state(jax.random.key(0), spec=spec)
    state = state.replace(ema=jax.tree_util.tree_map(lambda p: p * 0 + 0.5, state.params))
    new, _ = _step(spec, state)
    for e, p1 in zip(_leaves(new.ema), _leaves(new.params)):
        np.testing.assert_allclose(e, 0.9 * 0.5 + 0.1 * p1, rtol=1e-6, atol=1e-7)


def test_a_skipped_spike_leaves_the_optimizer_state_and_its_schedule_where_they_were():
    """A spike's gradient must not enter Adam's moments, nor advance its count (the schedule's position)."""
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, skip_threshold=2.0))
    state = create_state(jax.random.key(0), spec=spec)
    state = state.replace(step=jnp.asarray(500, jnp.int32), loss_avg=jnp.asarray(1e-4, jnp.float32))
    new, acc = _step(spec, state)
    assert float(acc["skipped"]) == 1
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(new.opt_state), _leaves(state.opt_state)))
    assert int(step.updates_applied(new.opt_state)) == 0
    # its loss is still in the logged sums (as the steps it counts are): the loss the step took had it gone through
    _, through = _step(spec, state.replace(loss_avg=jnp.asarray(1.0, jnp.float32)))
    assert float(through["skipped"]) == 0 and float(acc["loss"]) == pytest.approx(float(through["loss"]), rel=1e-6)
    assert float(acc["loss"]) > 0.05 and float(acc["steps"]) == 1  # the mean's count too


def test_the_running_loss_starts_at_the_first_loss_then_decays_and_skipping_waits_for_step_100():
    spec = StepSpec(MODEL, OptimConfig(lr=1e-2, skip_threshold=2.0))
    state = create_state(jax.random.key(0), spec=spec)
    new, acc = _step(spec, state)  # step 0: the running loss is the first loss, not 1% of it
    assert float(new.loss_avg) == pytest.approx(float(acc["loss"]), rel=1e-6) and float(acc["loss"]) > 0.05
    new, acc = _step(spec, state.replace(step=jnp.asarray(5, jnp.int32), loss_avg=jnp.asarray(0.3, jnp.float32)))
    assert float(new.loss_avg) == pytest.approx(0.99 * 0.3 + 0.01 * float(acc["loss"]), rel=1e-6)
    # a loss far above the running loss is a spike from step 100 on (counted from 0), not before
    low = jnp.asarray(1e-4, jnp.float32)
    for at, skipped in ((99, 0), (100, 1)):
        _, acc = _step(spec, state.replace(step=jnp.asarray(at, jnp.int32), loss_avg=low))
        assert float(acc["skipped"]) == skipped, at
