"""The train state, the optimizer and the train step: pure functions, jitted once by the trainer.

`train_step(state, batch, acc, *, spec)` takes uint8 batches ({"lr": [B, p, p, 3], "hr": [B, sp, sp, 3]}),
converts them on the device, and returns the new state and the running sums of its metrics (`acc`), so the
host reads metrics only at log steps. A step whose loss, gradient or update is not finite leaves the
parameters untouched and is counted in `acc["nonfinite"]`; the trainer stops on it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from rnan_jax import native
from rnan_jax.api import build, default_cast_params_once, default_fusion_autotuner, init
from rnan_jax.model import RNANConfig, cast_params

_LOSS_AVG_DECAY = 0.99
_SKIP_WARMUP = 100  # steps before loss-spike skipping starts (the running loss must settle first)
LOSSES = ("l1", "l2", "charbonnier")
# model.dtype float16: the loss is multiplied by this for the gradient, which is divided by it after (static loss
# scaling). Unscaled, a mean loss's gradient of each output pixel (1/pixels: 2.3e-6 at batch 16 of 48x48, x2)
# underflowed float16 in the backward: the attention convs' gradients came out all zero, the rest rounded.
FLOAT16_LOSS_SCALE = 2.0 ** 12


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer settings (`optim.*` in the config) and the run length; defaults are the paper's."""

    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "step"  # "step": x decay_factor every decay_every steps (or at milestones); "cosine"; "constant"
    decay_every: int = 200_000
    decay_factor: float = 0.5
    # schedule "step": comma-separated steps at which the rate is multiplied by decay_factor, in place of every
    # decay_every (BasicSR's MultiStepLR, EDSR's --decay 200-400; SwinIR's "250000,400000,450000,475000")
    milestones: str = ""
    warmup_steps: int = 0
    grad_clip: float = 0.0  # global-norm clipping threshold (0: off)
    skip_threshold: float = 0.0  # skip a step whose loss exceeds this times the running loss (EDSR; 0: off)
    ema_decay: float = 0.0  # parameter EMA for evaluation (BasicSR uses 0.999; 0: off)
    # The pixel loss on [0, 1] RGB: "l1" (the paper's), "l2" (mean squared error, as SRCNN/VDSR) or
    # "charbonnier" (mean of sqrt(d^2 + charbonnier_eps^2), LapSRN's smooth L1)
    loss: str = "l1"
    charbonnier_eps: float = 1e-3
    total_steps: int = 1_000_000

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """`milestones` as steps (() when empty). Raises ValueError for text that is not integers."""
        return tuple(int(m) for m in self.milestones.split(",")) if self.milestones.strip() else ()

    def __post_init__(self):
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"optim.schedule must be step, cosine or constant, got {self.schedule!r}")
        try:
            steps = self.milestone_steps
        except ValueError:
            steps = ()
        if self.milestones.strip() and (not steps or min(steps) <= 0 or list(steps) != sorted(set(steps))):
            raise ValueError(f"optim.milestones must be increasing positive steps, comma-separated, e.g. "
                             f"'200000,400000'; got {self.milestones!r}")
        if self.milestones.strip() and self.schedule != "step":
            raise ValueError(f"optim.milestones is read by schedule 'step' only; the schedule is {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"optim.loss must be {', '.join(LOSSES[:-1])} or {LOSSES[-1]}, got {self.loss!r}")
        if self.charbonnier_eps <= 0:
            raise ValueError(f"optim.charbonnier_eps must be positive, got {self.charbonnier_eps}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any  # EMA of params, or None when optim.ema_decay is 0
    loss_avg: jax.Array  # running loss (optim.loss), the reference for skip_threshold


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the step closes over: hashable, so the jitted step compiles once per spec."""

    model: RNANConfig
    optim: OptimConfig
    scan_unroll: int | bool | None = None
    depthwise: str | None = None
    batch_chunks: int = 1  # gradients of this many equal parts of the batch, computed apart and averaged
    cast_params_once: bool | None = None  # model.cast_params before the forward (bf16-rounded grads); None: default
    remat: str | None = None  # what the backward recomputes of each RNA block (model.REMAT_POLICIES); None: default
    fusion_autotuner: bool | None = None  # XLA:GPU's fusion autotuner when the step compiles; None: default


# XLA's name for the fusion autotuner's switch (a DebugOptions field, so jit's compiler_options takes it).
FUSION_AUTOTUNER_OPTION = "xla_gpu_experimental_enable_fusion_autotuner"


def compiler_options(spec: StepSpec, platform: str) -> dict[str, bool]:
    """XLA options the step compiles with on `platform` ("cpu", "gpu", ...): the fusion autotuner's switch on
    GPUs where `spec` turns it off; nothing otherwise (XLA's defaults), so that a jaxlib that lacks the
    option fails only a run that asked for it."""
    on = default_fusion_autotuner(platform) if spec.fusion_autotuner is None else spec.fusion_autotuner
    return {FUSION_AUTOTUNER_OPTION: False} if platform == "gpu" and not on else {}


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "step":
        if cfg.milestone_steps:
            decay = optax.piecewise_constant_schedule(cfg.lr, {m: cfg.decay_factor for m in cfg.milestone_steps})
        else:
            decay = optax.exponential_decay(cfg.lr, cfg.decay_every, cfg.decay_factor, staircase=True)
        # join_schedules counts the second schedule from the warmup's end: the milestones stay multiples of
        # decay_every from step 0 (EDSR's MultiStepLR), not warmup_steps later
        base = decay if cfg.warmup_steps <= 0 else lambda count: decay(count + cfg.warmup_steps)
    elif cfg.schedule == "cosine":
        base = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1))
    else:
        base = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps <= 0:
        return base
    # BasicSR's linear warmup (warmup_iter): the k-th update of the first warmup_steps at lr * k / warmup_steps,
    # the last of them at lr. optax reads the schedule at the count of updates already applied (0 for the first):
    # a ramp from 0 made the first update a step of rate 0 (weights unchanged, "lr 0" logged).
    warmup = optax.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps - 1)
    return optax.join_schedules([warmup, base], [cfg.warmup_steps])


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    # Always a chain of two, so that the optimizer state has one structure whether clipping is on or not:
    # a run can be resumed with clipping switched on (e.g. after a non-finite loss).
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adam)


def create_state(rng: jax.Array, params: Any = None, *, spec: StepSpec) -> TrainState:
    """A fresh state; `params` (e.g. from init_from) replaces the random initialization."""
    params = init(rng, spec.model) if params is None else params
    # The EMA a copy, not the parameters' own arrays: `jit_train_step` donates the state, and a buffer in it
    # twice failed the first step ("Attempt to donate the same buffer twice"; a segfault on several devices)
    ema = jax.tree_util.tree_map(jnp.copy, params) if spec.optim.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(spec.optim).init(params),
                      ema=ema, loss_avg=jnp.zeros((), jnp.float32))


def empty_metrics() -> dict[str, jax.Array]:
    """The running sums `train_step` adds to, and "lr": the learning rate of the latest step (not a sum)."""
    names = ("loss", "grad_norm", "steps", "skipped", "nonfinite", "lr")
    return {k: jnp.zeros((), jnp.float32) for k in names}


def updates_applied(opt_state: Any) -> jax.Array:
    """How many updates the optimizer has applied: the schedule's position, which a skipped (spike or
    non-finite) step does not advance, so it trails `TrainState.step` by the steps skipped."""
    adam = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)]
    return adam[0].count


def pixel_loss(sr: jax.Array, hr: jax.Array, kind: str = "l1", eps: float = 1e-3) -> jax.Array:
    """The mean over all samples of `kind` ("l1", "l2" or "charbonnier", see OptimConfig.loss) of sr - hr."""
    d = sr - hr
    if kind == "l1":
        return jnp.mean(jnp.abs(d))
    if kind == "l2":
        return jnp.mean(jnp.square(d))
    if kind == "charbonnier":
        return jnp.mean(jnp.sqrt(jnp.square(d) + eps * eps))
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def train_loss(params: Any, lr: jax.Array, hr: jax.Array, spec: StepSpec) -> jax.Array:
    """The network's `spec.optim.loss` on one batch (lr, hr float in [0, 1])."""
    model = build(spec.model, scan_unroll=spec.scan_unroll, depthwise=spec.depthwise, remat=spec.remat)
    if default_cast_params_once() if spec.cast_params_once is None else spec.cast_params_once:
        params = cast_params(params, spec.model.dtype)
    sr = model.apply({"params": params}, lr)
    return pixel_loss(sr, hr, spec.optim.loss, spec.optim.charbonnier_eps)


def default_batch_chunks(per_device_batch: int, num_devices: int, backend: str | None = None) -> int:
    """On a one-device CPU run 2 equal chunks for an even batch of at least 4, else 1; without the native
    kernels (`native.available()` false) 4 chunks of at least 4 samples each where the batch allows.

    Measured on 2 cores (tools/BENCHMARKS.md): before the Winograd conv kernels the small model at batch 16
    took 71 ms a step in 4 chunks, 78 in 2 (C 48: 147 and 158 ms) on an AMD EPYC; with them 4 and 2 are level
    there (55.0-55.2 against 53.8-56.2 ms, 8: 58.1-59.7), and 2 is faster on an Intel Xeon in each of 6 pairs
    (C 32: 95-98 against 101-110 ms; C 48: 164-180 against 170-194); without them, 2 and 4 level on the Xeon
    (191-193 against 191-208 ms). XLA:CPU's executor offloads ready work to the other core only when more
    than 8 kernels are ready at once: more independent chunks keep both cores busy more of the time, until
    they make the kernels too small; the native kernels run on a pool of their own, so 2 chunks suffice."""
    if (backend or jax.default_backend()) != "cpu" or num_devices != 1:
        return 1
    if per_device_batch % 4 == 0 and per_device_batch >= 16 and not native.available():
        return 4
    return 2 if per_device_batch >= 4 and per_device_batch % 2 == 0 else 1


def batch_chunks(requested: int, per_device_batch: int, num_devices: int) -> int:
    """execution.batch_chunks as the step runs it: `requested`, or `default_batch_chunks` for 0. Raises
    ValueError when it is negative or does not divide the per-device batch (the step would not split it)."""
    chunks = requested or default_batch_chunks(per_device_batch, num_devices)
    if chunks < 0 or per_device_batch % chunks:
        raise ValueError(f"execution.batch_chunks {chunks} does not divide the per-device batch {per_device_batch}")
    return chunks


def _value_and_grad(params: Any, lr: jax.Array, hr: jax.Array, spec: StepSpec) -> tuple[jax.Array, Any]:
    """`train_loss` and its gradient; in float16 through a loss scaled by FLOAT16_LOSS_SCALE."""
    if jnp.dtype(spec.model.dtype) != jnp.float16:
        return jax.value_and_grad(train_loss)(params, lr, hr, spec)
    scale = FLOAT16_LOSS_SCALE
    loss, grads = jax.value_and_grad(lambda p: train_loss(p, lr, hr, spec) * scale)(params)
    return loss / scale, jax.tree_util.tree_map(lambda g: g / scale, grads)


def _loss_and_grads(params: Any, lr: jax.Array, hr: jax.Array, spec: StepSpec) -> tuple[jax.Array, Any]:
    """The mean loss (optim.loss) and its gradient. With `batch_chunks` n > 1 the batch's n equal parts go through
    separate forward/backward passes whose losses and gradients are averaged: the same numbers (up to the
    order of the float sums), as independent programs that XLA:CPU runs on separate threads (its convolution
    kernels use one thread each at these sizes): 27% off the small model's step on 2 cores."""
    n = spec.batch_chunks
    if n <= 1 or lr.shape[0] % n:
        return _value_and_grad(params, lr, hr, spec)
    # Chunk c is samples c, c + n, c + 2n, ...: with the batch sharded over devices in contiguous blocks (of a
    # multiple of n samples), each device holds its own share of every chunk, where contiguous chunks
    # (jnp.split) each lay on a few devices and were moved between them (collective-permutes) every step.
    def split(x: jax.Array) -> list[jax.Array]:
        strided = x.reshape(x.shape[0] // n, n, *x.shape[1:])
        return [strided[:, c] for c in range(n)]

    parts = [_value_and_grad(params, a, b, spec) for a, b in zip(split(lr), split(hr))]
    loss = sum(p[0] for p in parts) / n
    return loss, jax.tree_util.tree_map(lambda *g: sum(g) / n, *[p[1] for p in parts])


def data_mesh(devices: Any = None) -> jax.sharding.Mesh:
    """A 1-D mesh named "data" over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), ("data",), (jax.sharding.AxisType.Auto,), devices=devices)


def jit_train_step(spec: StepSpec, mesh: jax.sharding.Mesh):
    """`train_step` jitted for `mesh`: the state and metrics replicated and donated, the batch sharded over
    "data". Returns (step function, replicated sharding, batch sharding). The trainer and the benchmark
    both run this one."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    options = compiler_options(spec, mesh.devices.flat[0].platform)
    jitted = jax.jit(functools.partial(train_step, spec=spec, mesh=mesh), in_shardings=(replicated, batch, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=(0, 2), compiler_options=options or None)
    return jitted, replicated, batch


def _data_parallel_loss_and_grads(params: Any, lr: jax.Array, hr: jax.Array, spec: StepSpec,
                                  mesh: jax.sharding.Mesh) -> tuple[jax.Array, Any]:
    """`_loss_and_grads` of each device's share of the batch (sharded over "data"), averaged over the devices:
    the whole batch's (equal shares), each device computing its own share only. Left to XLA's partitioner,
    the native CPU kernels (custom calls, which it cannot split) made it gather the whole batch onto every
    device before the network's first convolution, so that each device computed every sample."""
    def local(p, a, b):
        return jax.lax.pmean(_loss_and_grads(p, a, b, spec), "data")

    data = jax.sharding.PartitionSpec("data")
    return jax.shard_map(local, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), data, data),
                         out_specs=jax.sharding.PartitionSpec(), check_vma=False)(params, lr, hr)


def train_step(state: TrainState, batch: dict[str, jax.Array], acc: dict[str, jax.Array], *,
               spec: StepSpec, mesh: jax.sharding.Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    lr = batch["lr"].astype(jnp.float32) / 255.0
    hr = batch["hr"].astype(jnp.float32) / 255.0
    if mesh is not None and mesh.size > 1:  # the batch sharded over the mesh's "data" axis (jit_train_step)
        loss, grads = _data_parallel_loss_and_grads(state.params, lr, hr, spec, mesh)
    else:
        loss, grads = _loss_and_grads(state.params, lr, hr, spec)
    updates, opt_state = optimizer(spec.optim).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    spike = (spec.optim.skip_threshold > 0) & (state.step >= _SKIP_WARMUP) & (
        loss > spec.optim.skip_threshold * state.loss_avg)
    keep = finite & ~spike

    def choose(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new, old)

    params = choose(params, state.params)
    ema = state.ema
    if ema is not None:
        d = spec.optim.ema_decay
        ema = choose(jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params), ema)
    warm = state.step > 0
    loss_avg = jnp.where(keep, jnp.where(warm, _LOSS_AVG_DECAY * state.loss_avg + (1 - _LOSS_AVG_DECAY) * loss,
                                         loss), state.loss_avg)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=choose(opt_state, state.opt_state),
                           ema=ema, loss_avg=loss_avg)
    acc = {"loss": acc["loss"] + jnp.where(finite, loss, 0.0),
           "grad_norm": acc["grad_norm"] + jnp.where(finite, grad_norm, 0.0),
           "steps": acc["steps"] + 1, "skipped": acc["skipped"] + spike.astype(jnp.float32),
           "nonfinite": acc["nonfinite"] + (~finite).astype(jnp.float32),
           # the rate this step's update took (or would have): the schedule at the optimizer's count, not at
           # state.step, which runs ahead of it by every skipped step
           "lr": jnp.asarray(learning_rate(spec.optim)(updates_applied(state.opt_state)), jnp.float32)}
    return new_state, acc
