"""The training loop: sharded steps, validation, checkpoints, resume, preemption, observability.

`train_and_evaluate(config, workdir)` is what `python -m rnan_jax.train` runs. The state is replicated and
the batch sharded over a 1-D "data" mesh of all devices of all processes; each process feeds its own share
of the batch (`jax.make_array_from_process_local_data`). The step is jitted once with the state donated.
Stopping on a signal is `preemption`'s, the workdir's own files and checks `rundir`'s, what it validates on
`validation`'s.
"""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import socket
import sys
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging

from rnan_jax import (checkpoint, cli, data, figures, inference, loader, paths, preemption, rundir, sources, step,
                      summary, validation, zoo)
from rnan_jax.api import build, count_params, init
from rnan_jax.configs import TrainConfig, flatten_config
from rnan_jax.model import RNANConfig


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss); the message says what was kept."""


CPU_NOTE_PARAMS = 2_000_000  # above this a CPU run gets a line saying it is one (the paper's model: 17 M)


_run_log: summary.RunLog | None = None  # the workdir's train.log while a run is on


def _log(message: str) -> None:
    if jax.process_index() == 0:
        logging.info(message)
        print(message, flush=True)
        if _run_log is not None:
            _run_log.write(message)


def _copy_matching(params: Any, source: Any, origin: str) -> Any:
    """`params` with every leaf whose path and shape match in `source` replaced; reports the rest."""
    src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
    copied, kept = 0, []

    def pick(path, leaf):
        nonlocal copied
        other = src.get(jax.tree_util.keystr(path))
        if other is not None and other.shape == leaf.shape:
            copied += 1
            return jnp.asarray(other, leaf.dtype)
        kept.append(jax.tree_util.keystr(path))
        return leaf

    out = jax.tree_util.tree_map_with_path(pick, params)
    _log(f"init_from {origin}: copied {copied} parameter arrays; kept the fresh initialization for "
         f"{len(kept)}: {', '.join(kept) if kept else 'none'}")
    return out


_INIT_FROM_SAME = ("features", "num_groups", "num_blocks", "group_interval", "block_interval", "gc_reduction")


def _init_source(cfg: TrainConfig) -> tuple[dict, RNANConfig, str]:
    """The parameters and architecture that `cfg.init_from` names, and which they are ("its EMA at step 4" or
    "its parameters at step 4"; "" for a zoo model's); raises CheckpointError or ValueError (one line, naming
    init_from) for a path that holds none, or an architecture that differs beyond the scale."""
    try:  # a run trained with EMA gives its EMA: the parameters its validation scored
        which = checkpoint.scored(cfg.init_from)
        source, source_cfg, named = checkpoint.load_named(cfg.init_from, which=which)  # named: the step read
        what = "" if zoo.is_zoo(cfg.init_from) else (
            f"{'its EMA' if which == 'ema' else 'its parameters'} at step {named.step}, ")
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"init_from: {e}") from None
    differs = [f"{k} {getattr(source_cfg, k)} vs {getattr(cfg.model, k)}" for k in _INIT_FROM_SAME
               if getattr(source_cfg, k) != getattr(cfg.model, k)]
    if differs:
        raise ValueError(f"init_from {cfg.init_from}: its architecture differs beyond the scale "
                         f"({'; '.join(differs)}); only the upsampler may differ")
    return source, source_cfg, what


def _resume(mngr: ocp.CheckpointManager, target: step.TrainState, it: Any, cfg: TrainConfig,
            workdir: str) -> tuple[step.TrainState, dict, int] | None:
    """(state, meta, step) of the newest readable checkpoint, or None when there is none. A damaged step is
    reported in one line and moved aside (kept, under checkpoints_damaged/), and the one before it tried;
    a checkpoint of another architecture is refused in one line naming both."""
    directory = os.fspath(mngr.directory)
    steps = sorted(mngr.all_steps(), reverse=True)
    for at in steps:
        try:
            saved = checkpoint.config_from_meta(checkpoint.read_meta(directory, at))
        except (checkpoint.CheckpointError, KeyError, TypeError) as e:
            saved, error = None, checkpoint.damaged(directory, at, e, hint=False)
        if saved is not None:
            if not checkpoint.same_architecture(saved, cfg.model):  # init_from takes another scale only
                raise ValueError(_other_architecture(saved, cfg, workdir))
            try:
                state, meta = checkpoint.restore_train_state(mngr, at, target)
                if target.ema is not None and state.ema is None:  # EMA switched on for this run: start it here
                    state = state.replace(ema=jax.tree_util.tree_map(jnp.copy, state.params))
                    _log(f"{directory}/{at} holds no EMA (saved with optim.ema_decay 0): the EMA starts from "
                         "its parameters")
                elif target.ema is None and checkpoint.holds_ema(directory, at):  # switched off:
                    _log(f"{directory}/{at} holds an EMA, which optim.ema_decay 0 drops: validation and best/ "
                         "score the parameters from here")  # it was dropped without a word
                next_batch, saved_batch = _next_batch(meta, int(state.step), cfg.batch_size)
                if saved_batch != cfg.batch_size:
                    _log(f"batch_size changed from {saved_batch} to {cfg.batch_size}: the training data goes on at "
                         f"patch {next_batch * cfg.batch_size:,} (global batch {next_batch:,} of {cfg.batch_size}), "
                         "past the patches trained on")
                it.set_state({"next_batch": next_batch})
                return state, meta, at
            except Exception as e:  # orbax/tensorstore raise many kinds for missing or corrupt files
                if _other_layout(e):  # whole, of another version's state: moved aside, each step was, and the run
                    raise ValueError(  # started again from step 0
                        f"{directory}/{at}: its saved training state has another structure than this version of "
                        f"rnan_jax builds ({' '.join(str(e).split())[:200]}); it is not damaged and was left as it "
                        "is: resume it with the version that wrote it (its git_revision.txt), or use another "
                        "--workdir (--config.init_from=WORKDIR copies its parameters)") from None
                error = checkpoint.damaged(directory, at, e, hint=False)
        where = _move_aside(mngr, at)
        then = "trying the step before it" if at != steps[-1] else "no checkpoint before it: training starts afresh"
        _log(f"{error}; moved it to {where}; {then}")
    return None


def _other_architecture(saved: RNANConfig, cfg: TrainConfig, workdir: str) -> str:
    """The one-line refusal of a workdir whose checkpoints are of another architecture than `cfg.model`."""
    init_from = all(getattr(saved, k) == getattr(cfg.model, k) for k in _INIT_FROM_SAME)  # init_from takes another
    return (f"{workdir} holds an {checkpoint.describe(saved)}; the config asks for an "  # scale only
            f"{checkpoint.describe(cfg.model)}. Use another --workdir" + init_from * (
                f" (with --config.init_from={workdir} to start from its matching parameters)"))


def _check_architecture(directory: str, cfg: TrainConfig, workdir: str) -> None:
    """Raises ValueError (`_other_architecture`) when the newest checkpoint in `directory` with a readable record is
    of another architecture: before the data, whose first decode (into a cache of the new scale) can take many
    minutes; `_resume` refused it only after them. A damaged record is left for `_resume` to report."""
    for at in reversed(checkpoint.complete_steps(directory)):
        try:
            saved = checkpoint.config_from_meta(checkpoint.read_meta(directory, at))
        except (checkpoint.CheckpointError, KeyError, TypeError):
            continue
        if not checkpoint.same_architecture(saved, cfg.model):
            raise ValueError(_other_architecture(saved, cfg, workdir))
        return


# In a checkpoint's meta: the training patches taken so far (global batches of each run's batch_size, in order from
# patch 0) and the batch_size of the run that saved it, so that a run resumed with another batch_size goes on where
# the data left off. Global batch `step` of the new size (as before) trained again on patches already trained on
# (a smaller batch: the last steps' own patches, in the same order) or skipped some (a larger).
_NEXT_PATCH, _BATCH_SIZE = "next_patch", "batch_size"


def _next_batch(meta: dict, at: int, batch_size: int) -> tuple[int, int]:
    """(the global batch of `batch_size` that the run resumed from checkpoint `at` reads first: the first that holds no
    patch trained on, the batch size that saved it). A checkpoint saved without the record (before it was kept)
    resumes at global batch `at`, as it did: its batch size is not known (config.json's is the start's)."""
    patch, saved = meta.get(_NEXT_PATCH), meta.get(_BATCH_SIZE)
    if not (type(patch) is int and type(saved) is int and patch >= 0 and saved > 0):
        return at, batch_size
    return -(-patch // batch_size), saved


def _move_aside(mngr: ocp.CheckpointManager, at: int) -> str:
    """Moves checkpoint `at` of `mngr` under checkpoints_damaged/ (process 0 moves it, every process waits for that)
    and reloads `mngr`; returns where it went."""
    where = checkpoint.move_aside(os.fspath(mngr.directory), at) if jax.process_index() == 0 else "(moved by process 0)"
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"rnan_jax_moved_aside_{at}")
    mngr.reload()
    return where


def _other_layout(error: BaseException) -> bool:
    """Whether a restore failed because the checkpoint's tree is not the one this code builds (orbax's words for
    it), rather than for a missing or corrupt file."""
    text = str(error)
    return isinstance(error, ValueError) and ("tree structures do not match" in text or "Structure mismatch" in text)


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """What a run with this config would do, without reading data or writing anything: every config key
    (as `--config.KEY=VALUE` sets it), the parameter count, the devices, processes and batch split."""
    cfg = TrainConfig.from_config(config)
    shapes = jax.eval_shape(lambda: init(jax.random.key(cfg.seed), cfg.model))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    n_dev, n_proc = jax.device_count(), jax.process_count()
    lines = ["config (override any key with --config.KEY=VALUE):"]
    lines += [f"  {key} = {value!r}" for key, value in flatten_config(config)]
    lines.append(f"model: RNAN x{cfg.model.scale}, {n_params:,} parameters")
    lines.append(f"devices: {n_dev} x {jax.devices()[0].device_kind} ({jax.default_backend()}), {n_proc} process(es), "
                 f"{jax.local_device_count()} local")
    per_device = f"{cfg.batch_size // n_dev} per device" if cfg.batch_size % n_dev == 0 else (
        f"NOT divisible by the {n_dev} devices: the run would stop")
    if cfg.batch_size % n_dev == 0:
        try:
            chunks = step.batch_chunks(cfg.execution.batch_chunks, cfg.batch_size // n_dev, n_dev)
            per_device += f", in {chunks} chunk(s)" if chunks > 1 else ""
        except ValueError as e:
            per_device += f"; {e}: the run would stop"
    lines.append(f"global batch {cfg.batch_size} ({per_device}) of {cfg.data.patch_size}x{cfg.data.patch_size} "
                 f"LR patches; {cfg.total_steps:,} steps")
    if (problem := rundir.problem(workdir)) is not None:
        state = f"{problem.split(': ', 1)[1]}: the run would stop"
    elif paths.isdir(workdir):
        directory = os.path.join(workdir, checkpoint.CHECKPOINTS)
        steps = checkpoint.complete_steps(directory)
        state = f"exists; the run resumes from its step {steps[-1]}" if steps else "exists, no checkpoint yet"
        try:  # what the run would find there (it said "resumes" of a workdir the run refuses or leaves as it is)
            meta = checkpoint.read_meta(directory, steps[-1]) if steps else {}
            saved = checkpoint.config_from_meta(meta) if steps else None
        except (checkpoint.CheckpointError, KeyError, TypeError):
            meta, saved = {}, None  # damaged: the run moves it aside and tries the step before
        if saved is not None and not checkpoint.same_architecture(saved, cfg.model):
            state = (f"holds an {checkpoint.describe(saved)}, the config an {checkpoint.describe(cfg.model)}: "
                     "the run would stop")
        elif meta.get(_UNVALIDATED) is True:  # the run validates it first (it said "would do nothing" of the last)
            state = (f"exists; a stop ended the validation of its step {steps[-1]}: the run validates it, then "
                     + ("resumes from it" if steps[-1] < cfg.total_steps else "is done"))
        elif steps and steps[-1] >= cfg.total_steps:
            state = (f"already at step {steps[-1]} of total_steps {cfg.total_steps}: the run would do nothing "
                     "(raise --config.total_steps to train on)")
    else:
        state = "not created yet; a run creates it"
    lines.append(f"workdir: {workdir} ({state}); dry run: nothing read or written")
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, float]:
    """Trains (resuming from the latest checkpoint in `workdir`), validates and checkpoints.

    Returns the last logged metrics and validation results. `stop_after` ends the loop after that step
    without saving, as a crash would (for tests of resuming). Raises ValueError for a config that does
    not fit, TrainingError for a non-finite loss, preemption.Preempted after SIGTERM's or Ctrl-C's checkpoint.
    """
    global _run_log
    cfg = TrainConfig.from_config(config)
    workdir = paths.resolve(workdir)  # gs://bucket/run stays a URL
    rundir.prepare(workdir)
    with rundir.exclusive(workdir), summary.RunLog(os.path.join(workdir, summary.RUN_LOG)) as _run_log:
        _run_log.write(f"started: {shlex.join(sys.argv)} (rnan_jax "  # quoted: a folder with a space reruns as one
                       f"{summary.git_revision(summary.package_dir())}, {_versions()}, {socket.gethostname()})")
        try:
            with preemption.Preemption() as signals:
                signals.before_training = "start (or resume from the latest checkpoint)"
                return _train(cfg, config, workdir, stop_after, signals)
        except BaseException as e:  # what ended the run, in the log too (the CLI prints it)
            _run_log.write(f"stopped: {type(e).__name__}: {e}")
            raise
        finally:
            _run_log = None


def _versions() -> str:
    """Python's and the stack's versions, for train.log (it named jax's alone: a run's numbers also follow jaxlib's
    kernels, flax's and optax's code, orbax's format)."""
    from importlib import metadata

    found = []
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found + [f"Python {sys.version.split()[0]}"])


def _images_record(it: loader.BatchIterator) -> str:
    return f"{it.images.count} images, sha256 of names and sizes {it.images.digest.hex()[:16]}"


def _train(cfg: TrainConfig, config: ml_collections.ConfigDict, workdir: str,
           stop_after: int | None, signals: preemption.Preemption) -> dict[str, float]:
    n_dev = jax.device_count()
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices")
    mesh = step.data_mesh()
    chunks = step.batch_chunks(cfg.execution.batch_chunks, cfg.batch_size // n_dev, n_dev)
    spec = step.StepSpec(cfg.model, cfg.optim, cfg.execution.unroll, cfg.execution.depthwise_impl, chunks,
                         cfg.execution.cast_once, cfg.execution.remat_policy, cfg.execution.autotune_fusions)
    train_step, replicated, batch_sharding = step.jit_train_step(spec, mesh)

    # init_from is read before the data, whose first decode can take many minutes, unless the run resumes (a
    # checkpoint of another architecture is refused before them too)
    _check_architecture(os.path.join(workdir, checkpoint.CHECKPOINTS), cfg, workdir)
    fresh = cfg.init_from and not checkpoint.complete_steps(os.path.join(workdir, checkpoint.CHECKPOINTS))
    source = _init_source(cfg) if fresh else None
    # The data before the checkpoint managers (a workdir that cannot be written has failed already, in
    # _prepare_workdir): a manager's start-up cleanup thread, cut off by the exit that a data error causes,
    # printed orbax's tracebacks ("cannot schedule new futures after shutdown") under the one-line error.
    validator = validation.Validator(cfg)  # before the training data, whose first decode can take many minutes
    it = data.train_iterator(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed, announce=_log)
    if jax.process_count() > 1:
        _check_same_images(it)
    stop_check = _stop_check(validator, signals)
    images = _images_record(it)
    if _run_log is not None:  # which images, in train.log (the first decode's line alone said how many)
        _run_log.write(f"training images: {images}")
    mngr = checkpoint.manager(os.path.join(workdir, checkpoint.CHECKPOINTS), max_to_keep=cfg.keep_checkpoints)
    # Synchronous: orbax names its multi-host barrier for an async save by the step alone, so two managers
    # saving the same step asynchronously collide ("Barrier _async_write_complete.<step> is already ongoing").
    best_mngr = checkpoint.manager(os.path.join(workdir, checkpoint.BEST), max_to_keep=1, async_save=False)

    rng = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(partial(step.create_state, spec=spec), rng)
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    best_psnr, unvalidated = -math.inf, False
    resumed = _resume(mngr, target, it, cfg, workdir)
    if resumed is not None:
        state, meta, latest = resumed
        unvalidated = meta.get(_UNVALIDATED) is True  # a stop ended its validation: the rerun does it first
        since_log = _since_log(meta)
        best_psnr = float(meta.get("best_psnr", -math.inf))
        _log(f"resumed from {mngr.directory}/{latest} (step {int(state.step)})")
        if meta.get("training_images", images) != images:  # images added or removed: a silent change of the data
            _log(f"the training images changed since step {latest} was saved ({meta['training_images']} then, "
                 f"{images} now): the batches from here are not those the run would have had")
        if cfg.init_from:  # given to a run that exists: it would otherwise seem to have been applied
            _log(f"init_from {cfg.init_from} not read: it starts a new run, and this one resumes its own checkpoint")
        signals.before_training = f"resume from step {latest} again"
        if changes := rundir.config_changes(workdir, config):
            _log(f"config changed since the run that made {workdir} (its config.json): {'; '.join(changes)}")
    else:
        params, since_log = None, step.empty_metrics()
        if cfg.init_from:
            source_params, source_cfg, what = source or _init_source(cfg)
            params = _copy_matching(init(rng, cfg.model), source_params, f"{cfg.init_from} "
                                    f"({what}x{source_cfg.scale} -> x{cfg.model.scale})")
        if params is not None:  # committed to one device by the copy: jit refused them for the others' state
            params = jax.device_put(jax.device_get(params), replicated)
        state = jax.jit(partial(step.create_state, spec=spec), out_shardings=replicated)(rng, params)
        rundir.write_info(workdir, config)
    # best/ may hold a step past the resumed one (validated, then lost before its checkpoint): a new best must
    # beat it too, or the one there is kept.
    best_dir_psnr, chosen_on = checkpoint.best_psnr(os.fspath(best_mngr.directory))
    if best_psnr > -math.inf and not checkpoint.complete_steps(os.fspath(best_mngr.directory)):
        _log(f"{best_mngr.directory} holds no checkpoint (removed, or not copied with the run): the next validation "
             f"writes it, not only one above the {best_psnr:.3f} dB recorded")  # it stayed empty until one beat it
        best_psnr = -math.inf
    best_psnr = max(best_psnr, best_dir_psnr)
    if chosen_on is not None and not validator.same_first_set(chosen_on):  # its PSNR is of other images
        _log(f"validation changed since {best_mngr.directory} was chosen (on {chosen_on}): the next validation "
             "replaces it")
        best_psnr = -math.inf
    _log(f"RNAN x{cfg.model.scale} on {n_dev} {jax.devices()[0].platform} device(s), {jax.process_count()} "
         f"process(es); global batch {cfg.batch_size}; parameters:\n{summary.parameter_table(state.params)}")
    _log(f"validation: {validator.describe()}")
    n_params = count_params(state.params)
    if jax.default_backend() == "cpu" and n_params > CPU_NOTE_PARAMS:
        _log(f"note: this is a CPU run of a {n_params:,}-parameter model, seconds per step (README, "
             "'Training'); for a GPU install rnan_jax[cuda12], for a Cloud TPU VM rnan_jax[tpu]")

    if int(state.step) >= cfg.total_steps and not unvalidated:
        _log(f"nothing to do: {workdir} is already at step {int(state.step)} of total_steps {cfg.total_steps} "
             f"(use another --workdir, or raise --config.total_steps to train on)")
        it.close()
        return {}

    first = int(state.step)
    offset = it.get_state()["next_batch"] - first  # the data's global batch minus the step (`_next_batch`)
    writer = summary.Writer(os.path.join(workdir, "tensorboard"), resumed_from=first)
    acc = jax.device_put(since_log, replicated)  # resumed between two logs: the sums of the steps since the last
    results: dict[str, float] = {}
    t_last, s_last = time.time(), first
    module = build(cfg.model, scan_unroll=spec.scan_unroll, depthwise=spec.depthwise, remat=spec.remat)  # resolved
    unroll = module.scan_unroll
    off = " fusion autotuner off," if step.compiler_options(spec, mesh.devices.flat[0].platform) else ""
    progress = _progress(first, cfg.total_steps)
    interrupted, doing, s = False, "train", first
    costs = {"validation": 0.0, "save": 0.0}  # the latest measured seconds of each pause, for the ETA

    def log_train(s: int, trained_until: float | None = None) -> None:
        """Logs the means of the steps since the last log, up to step `s`, the speed and the ETA (the steps' time
        ends at `trained_until` when a pause followed them)."""
        nonlocal acc, t_last, s_last
        host = jax.device_get(acc)
        acc = jax.device_put(step.empty_metrics(), replicated)
        _check_finite(host, s, mngr)
        now = trained_until or time.time()
        # the run's first step alone since the last log: its time is the compile's, not a speed (a resumed run's
        # first log at the step after a SIGTERM's checkpoint, or log_every 1, read 0.14 steps/s and an ETA of hours
        # for a run of seconds)
        timed = s > s_last and (s_last > first or s == cfg.total_steps)
        rate = (s - s_last) / max(now - t_last, 1e-9) if timed else None
        t_last, s_last = now, s
        pauses = sum(cost * _pauses_from(s, every, cfg.total_steps) for cost, every in (
            (costs["validation"], cfg.eval_every), (costs["save"], cfg.checkpoint_every)))
        train = _train_metrics(host, s, rate, cfg, pauses)
        results.update(train)
        writer.scalars(s, {f"train/{k}": v for k, v in train.items()})
        _log(summary.log_line(s, cfg.total_steps, train))

    def validate(s: int, saved: bool = False) -> bool:
        """Validates step `s` (to best/ if it scores best so far); False when a stop request ended the validation.
        `saved`: `s` is the checkpoint a stop saved before its validation (written to TensorBoard unless a rerun
        did)."""
        nonlocal best_psnr, doing
        paused_at, doing = _synced_time(state), "validation"
        write = not (saved and _validation_written(workdir, s))
        scores = _validate(validator, state, s, cfg, writer, mngr, stop_check, saved, write)
        if scores is None:
            return False
        results.update(scores)
        if scores["val/psnr"] > best_psnr:
            best_psnr = scores["val/psnr"]
            with _saving(mngr):
                _check_room(best_mngr, s, (state.params, state.ema), mngr)
                checkpoint.save_best(best_mngr, s, state, checkpoint.meta_for(
                    cfg.model, s, val_psnr=best_psnr, validation=validator.describe()))
        doing = "train"  # its cost without the compile of image sizes not seen before, which the next do not repeat
        costs["validation"] = max(time.time() - paused_at - validator.compile_s, 0.0)
        return True

    signals.training_begins()  # from here a signal is a flag: the step reached is saved
    pending = False  # a checkpoint save in flight whose outcome is not checked yet
    try:
        if unvalidated and not validate(first, saved=True):  # stopped again: its checkpoint, saved, is the one
            raise preemption.Preempted(
                f"{signal.Signals(signals.signum).name} while validating step {first}: its checkpoint in "
                f"{mngr.directory} is kept; rerun the same command to validate it and resume", signals.signum)
        if unvalidated and jax.process_index() == 0:  # validated now: the flag, left, had every rerun validate it
            checkpoint.drop_from_meta(os.fspath(mngr.directory), first, _UNVALIDATED)  # again (the last step: forever)
        t_last = time.time()  # the first step's time is the compile's, without that validation
        if first < cfg.total_steps:
            _log(f"compiling the train step (scan unroll {'full' if unroll is True else unroll}, remat "
                 f"{module.remat};{off} seconds for small models, minutes for the paper's on a CPU) ...")
        for s in range(first + 1, cfg.total_steps + 1):
            asked = time.time()  # the wait for a batch that never comes (a dead worker, noticed in seconds): no step's
            try:
                batch = next(it)
            except sources.DataError as e:  # a worker process died, a cache file changed: the steps trained stay
                kept = _keep_reached(mngr, state, acc, first, cfg, best_psnr, results, images,
                                     lambda at: log_train(at, asked), offset=offset)
                raise sources.DataError(f"{e}; {kept}") from None
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
            state, acc = train_step(state, batch, acc)
            if pending and jax.process_count() == 1 and not mngr.is_saving_in_progress():
                pending = False  # its failure stops the run now, not at the next save (training on meanwhile)
                with _saving(mngr):
                    mngr.wait_until_finished()
            if s == first + 1:  # the compile's cost, measured (a long compile was announced above)
                jax.block_until_ready(acc)
                _log(f"first step, compiling included: {time.time() - t_last:.1f} s")
                if s % cfg.log_every and s != cfg.total_steps:  # the first log's speed and ETA without it
                    t_last, s_last = time.time(), s
            if progress is not None:
                progress.update(1)
            final = s == cfg.total_steps
            if s % cfg.log_every == 0 or final:
                log_train(s)
            paused_at = None  # validation and saves are not training: the next log's steps/s leaves them out
            stopped = False  # a validation a stop request ended (every process's, as one decision: `_stop_check`)
            if s % cfg.eval_every == 0 or final:
                paused_at = _synced_time(state)
                stopped = not validate(s)
            if stop_after is not None and s >= stop_after:
                break
            at_log = jax.process_count() == 1 or s % cfg.log_every == 0
            stop = stopped or (preemption.agree(signals.requested) if at_log else False)
            since_log = None  # the sums a stop logs, kept in its checkpoint too (`_save_step`)
            if stop and s % cfg.log_every and not final:  # the steps since the last log: the rerun resumes after
                since_log = jax.device_get(acc)  # them, and their loss was never logged (a gap in the curve); the
                log_train(s, paused_at)  # rerun's next log is their mean with its own steps', as the uninterrupted
            if s % cfg.checkpoint_every == 0 or final or stop:  # run's (it was of the rerun's steps alone: a dip)
                paused_at = paused_at or _synced_time(state)
                saving = time.time()
                host = jax.device_get(acc) if since_log is None else since_log
                _check_finite(host, s, mngr)
                _save_step(mngr, s, state, cfg, best_psnr, results, images, host, stopped, offset=offset)
                pending = True
                costs["save"] = time.time() - saving
            if paused_at is not None:
                t_last += time.time() - paused_at
            if stop and final and not stopped:  # saved above, nothing is left to do: the run ends as a whole one does
                _log(f"{signal.Signals(signals.signum).name} during the last step: the run is complete")
            elif stopped:
                with _saving(mngr):
                    mngr.wait_until_finished()
                raise preemption.Preempted(
                    f"{signal.Signals(signals.signum).name} while validating step {s}: saved a checkpoint at step {s} "
                    f"in {mngr.directory}; rerun the same command to validate it" + " and resume" * (not final),
                    signals.signum)
            elif stop:
                with _saving(mngr):
                    mngr.wait_until_finished()
                raise preemption.Preempted(f"{signal.Signals(signals.signum).name}: saved a checkpoint at step {s} "
                                           f"in {mngr.directory}; rerun the same command to resume", signals.signum)
        with _saving(mngr):
            mngr.wait_until_finished()  # the last saves, whose failure is the run's
            best_mngr.wait_until_finished()
        writer.close()  # its last flush may fail: the error is the run's
    except ValueError as e:
        if (reason := checkpoint.write_failure(e)) is None:
            raise
        raise _stopped(f"cannot save a checkpoint in {os.path.dirname(os.fspath(mngr.directory))} ({reason})",
                       mngr) from None
    except jax.errors.JaxRuntimeError as e:
        if not inference.is_out_of_memory(e):
            raise
        raise _stopped(_out_of_memory(e, cfg, doing, s, chunks, module.remat), mngr, advice="") from None
    except OSError as e:  # the run's logs (train.log, tensorboard/) on a full disk: nothing after it can be saved
        raise _stopped(f"cannot write in {workdir} ({e.strerror or e}) at step {s}", mngr,
                       advice=_advice(e, e.strerror or str(e), workdir)) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, not waiting for a save that may be in flight
        interrupted = True
        checkpoint.abandon_saves()
        raise cli.StopNow(f"stopped without a checkpoint of the step reached; rerun the same command to "
                          f"resume from the latest complete one in {mngr.directory}") from None
    finally:
        if not interrupted:  # done already, unless the run failed: that error is the one
            for manager in (mngr, best_mngr):
                with contextlib.suppress(ValueError, OSError):
                    manager.wait_until_finished()
        with contextlib.suppress(OSError):
            writer.close()
        it.close()
        if progress is not None:
            progress.close()
    if "val/psnr" in results:
        psnr, bicubic = results["val/psnr"], results["val/bicubic_psnr"]
        gain = psnr - bicubic if psnr != bicubic else 0.0  # both inf (flat images reproduced exactly): nan
        _log(f"done: {int(state.step)} steps; validation PSNR {psnr:.3f} dB vs bicubic {bicubic:.3f} dB "
             f"({gain:+.3f} dB); checkpoints in {mngr.directory}")
    return results


_UNVALIDATED = "validation_stopped"  # in a checkpoint's meta: a stop request ended the step's validation


def _save_step(mngr: ocp.CheckpointManager, s: int, state: step.TrainState, cfg: TrainConfig, best_psnr: float,
               results: dict[str, float], images: str, since_log: dict, unvalidated: bool = False, *,
               offset: int) -> None:
    """Saves step `s` (asynchronously), with the best PSNR so far, the last validation scores, the training
    images (`_images_record`), `since_log` (the host's running sums of the steps since the last log) and the data's
    position (`_NEXT_PATCH`: global batch `s + offset` is the next) in its meta; `unvalidated`: its validation was
    stopped, and the run that resumes from it validates it first."""
    meta = checkpoint.meta_for(cfg.model, s, best_psnr=best_psnr, training_images=images, **{
        k: v for k, v in results.items() if k.startswith("val/")}, since_last_log={
        k: float(v) for k, v in since_log.items()}, **{_UNVALIDATED: True} if unvalidated else {},
        **{_NEXT_PATCH: (s + offset) * cfg.batch_size, _BATCH_SIZE: cfg.batch_size})
    with _saving(mngr):
        _check_room(mngr, s, state, mngr)
        checkpoint.save_train_state(mngr, s, state, meta)


def _keep_reached(mngr: ocp.CheckpointManager, state: step.TrainState, acc: Any, first: int, cfg: TrainConfig,
                  best_psnr: float, results: dict[str, float], images: str, log: Callable[[int], None], *,
                  offset: int) -> str:
    """When the data stops a run between two steps: saves a checkpoint of the step reached, as SIGTERM does (after
    `log` of the steps since the last log, as SIGTERM logs them), and says where the rerun resumes from. A run of
    several processes saves none: the others wait in the train step, and a save waits for all of them."""
    reached, saved, note = int(state.step), False, ""
    if jax.process_count() == 1 and reached > first and reached % cfg.checkpoint_every:  # else saved already
        host = jax.device_get(acc)
        if (nonfinite := int(host["nonfinite"])) == 0:
            if host["steps"] > 0:
                log(reached)
            # the sums `log` logged, for the rerun's next log (`_since_log`): the uninterrupted run's mean, not its
            _save_step(mngr, reached, state, cfg, best_psnr, results, images, host, offset=offset)  # own steps' alone
            saved = True
        else:
            note = f" (step {reached} not saved: {nonfinite} step(s) since the last log had a non-finite loss)"
    mngr.wait_until_finished()
    if (latest := mngr.latest_step()) is None:  # best/ may hold a step (it said "no checkpoint yet" of that too)
        return f"{_kept(mngr)[0]}{note}: a rerun starts afresh"
    return f"the last checkpoint is step {latest}{', saved now,' * saved} in {mngr.directory}{note}"


def _since_log(meta: dict) -> dict[str, Any]:
    """The running sums of the steps between the last log and a checkpoint, from its meta (`_save_step`): the
    resumed run's first log is then their mean with its own steps', as the uninterrupted run's was (it was of the
    resumed steps alone, and those before the checkpoint were in no record). Empty sums for a meta without them."""
    saved, empty = meta.get("since_last_log"), step.empty_metrics()
    if not isinstance(saved, dict) or set(saved) != set(empty):
        return empty
    return {k: jnp.asarray(saved[k], jnp.float32) for k in empty}


def _check_same_images(it: loader.BatchIterator) -> None:
    """Raises ValueError (one line, in every process) unless every process read the same training images (their
    `data.ImageList`s): each cuts its part of global batch k from its own list, so lists that differ make global
    batches that are no one sequence, silently."""
    mine = np.concatenate([[it.images.count], np.frombuffer(it.images.digest, np.uint32)]).astype(np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    other = next((i for i, row in enumerate(every) if not np.array_equal(row, every[0])), None)
    if other is None:
        return
    it.close()
    first, count = int(every[0, 0]), int(every[other, 0])
    which = (f"process 0: {first} images, process {other}: {count}" if first != count else
             f"process 0 and process {other}: {first} images each, not the same names or sizes")
    raise ValueError(f"the processes' training images differ ({which}): every process must read the same images "
                     "(a copy that differs, or an image one of them skipped: see its warnings)")


def _stop_check(validator: validation.Validator, signals: preemption.Preemption) -> Callable[[], bool] | None:
    """What the validation asks before each image: whether a stop was requested (SIGTERM, Ctrl-C), so that the
    stop no longer waits for the whole validation. With several processes it is one decision for all, a reduction
    per image (each upscales every image: a collective of one flag beside that costs nothing); every process must
    then ask it as often, so processes whose validation images differ in number keep the stop for after the
    validation (a mismatch of collectives would hang)."""
    if jax.process_count() == 1:
        return lambda: signals.requested
    counts = np.asarray(multihost_utils.process_allgather(np.array([validator.count], np.int32))).ravel()
    if np.all(counts == counts[0]):
        return lambda: preemption.agree(signals.requested)
    _log(f"the processes' validation images differ in number ({', '.join(map(str, counts))}): a stop request "
         "during a validation waits for its end")
    return None


def _pauses_from(s: int, every: int, total: int) -> int:
    """How many of the validations (or saves) every `every` steps and at the last one are still to come at step `s`'s
    log (which precedes its own)."""
    return total // every - (s - 1) // every + (total % every != 0)


def _train_metrics(host: dict, s: int, rate: float | None, cfg: TrainConfig, pauses: float = 0.0) -> dict[str, float]:
    """Means over the steps since the last log (non-finite ones excluded), the learning rate of the last
    step (the one it applied: the schedule at the optimizer's count, behind the step after skipped steps),
    speed and ETA (with `pauses`, the seconds that the validations and saves still to come take as measured);
    without the speed and ETA when `rate` is None (not measured yet: the first step compiles)."""
    n = max(host["steps"] - host["nonfinite"], 1)
    out = {"loss": host["loss"] / n, "grad_norm": host["grad_norm"] / n, "lr": float(host["lr"]),
           "skipped": host["skipped"]}
    if rate is not None:
        out.update(steps_per_s=rate, patches_per_s=rate * cfg.batch_size,
                   eta_s=(cfg.total_steps - s) / rate + pauses if rate > 0 else math.inf)
    return out


def _synced_time(state: step.TrainState) -> float:
    """The time once the steps dispatched so far have run (the pause that follows is then timed alone)."""
    jax.block_until_ready(state)
    return time.time()


def _validate(validator: validation.Validator, state: step.TrainState, s: int, cfg: TrainConfig,
              writer: summary.Writer, mngr: ocp.CheckpointManager,
              stop: Callable[[], bool] | None = None, saved: bool = False, write: bool = True
              ) -> dict[str, float] | None:
    """Scores the EMA parameters when there are some, else the parameters; logs and writes them (to TensorBoard
    unless not `write`). None, with nothing logged or written, when `stop` ended the validation
    (`Validator.__call__`). `saved`: step `s` is the checkpoint that a stop saved before its validation."""
    scored = state.ema if state.ema is not None else state.params
    try:
        done = validator(scored, cfg.num_val_images_logged, stop)
    except inference.NonFiniteOutputError as e:  # diverged between two logs (or an overflow in model.dtype)
        if saved and not (cfg.model.dtype == "float16" and _finite(scored)):
            raise _diverged(f"validating step {s}: {e} (model.dtype {cfg.model.dtype})", s, mngr) from None
        if saved:  # kept, as it is: each rerun validated it again and stopped again, told to "rerun"
            raise TrainingError(f"validating step {s}: {e} (model.dtype float16, which overflows where bfloat16 and "
                                f"float32 do not); its checkpoint in {mngr.directory} is kept: rerun with "
                                "--config.model.dtype=bfloat16 to validate it and resume") from None
        kept, then = _kept(mngr)
        raise TrainingError(f"validating step {s}: {e} (model.dtype {cfg.model.dtype}); stopped without saving: "
                            f"{kept}. float16 overflows where bfloat16 and float32 do not; rerun to {then}") from None
    if done is None:
        return None
    scores, strips = done
    if write:
        writer.scalars(s, scores)
        writer.images(s, strips)
    _log(f"step {s}: validation PSNR {scores['val/psnr']:.3f} dB, SSIM {scores['val/ssim']:.4f} "
         f"(bicubic {scores['val/bicubic_psnr']:.3f} dB){validator.others_line(scores)}")
    return scores


def _finite(tree: Any) -> bool:
    """Whether every value of `tree` (replicated arrays: one copy read) is finite."""
    return all(bool(np.isfinite(np.asarray(x.addressable_shards[0].data if isinstance(x, jax.Array) else x)).all())
               for x in jax.tree_util.tree_leaves(tree))


def _diverged(line: str, s: int, mngr: ocp.CheckpointManager) -> TrainingError:
    """The error for checkpoint `s`, saved by a stop before its validation, whose parameters that validation found not
    finite: moved aside (kept, under checkpoints_damaged/, as a damaged step is), so that the rerun resumes from the
    step before it; left in place, every rerun validated it again and stopped again."""
    where = _move_aside(mngr, s)
    kept, then = _kept(mngr)
    return TrainingError(f"{line}; the run diverged before the stop that saved this step: moved its checkpoint to "
                         f"{where}; {kept}: lower optim.lr or set optim.grad_clip, then rerun to {then}")


def _validation_written(workdir: str, s: int) -> bool:
    """Whether the workdir's metrics.jsonl (`summary.Writer` writes every scalar there too) holds step `s`'s
    validation, as `figures.read_validation` reads it (a resumed run's marker drops the lines after its step): a
    rerun that validated the step a stop saved, then was lost before its next checkpoint, wrote it, and the next
    rerun, validating that step again, wrote a second point at it."""
    try:
        steps, _, _ = figures.read_validation(workdir)
    except (figures.FigureError, OSError):  # none yet, or unreadable: written again, as before
        return False
    return s in steps


def _out_of_memory(error: Exception, cfg: TrainConfig, doing: str, s: int, chunks: int, remat: str) -> str:
    """One line for a device out of memory in the train step or in validation: where, the error's first line,
    and the settings that need less."""
    first = str(error).strip().splitlines()[0]
    where = f"out of {jax.devices()[0].platform} memory"
    if doing == "validation":
        return (f"{where} validating step {s}: {first} Fewer or smaller validation images (data.val_max_images, "
                "data.val_source) need less")
    per_device = cfg.batch_size // jax.device_count()
    less = ["A smaller batch_size or data.patch_size"]
    if more := next((n for n in range(chunks + 1, per_device + 1) if per_device % n == 0), None):
        less.append(f"execution.batch_chunks={more} (gradients of {more} parts)")
    if remat != "block":
        less.append("execution.remat=block")
    return (f"{where} in the train step (global batch {cfg.batch_size}, {per_device} per device, of "
            f"{cfg.data.patch_size}x{cfg.data.patch_size} LR patches, model.dtype {cfg.model.dtype}, remat {remat}): "
            f"{first} {', '.join(less[:-1]) + ' or ' if len(less) > 1 else ''}{less[-1]} needs less")


def _check_room(mngr: ocp.CheckpointManager, s: int, items: Any, checkpoints: ocp.CheckpointManager) -> None:
    """Stops the run in one line, before a save that the disk has no room for (`checkpoint.room_problem`)."""
    if (line := checkpoint.room_problem(mngr, s, items)) is not None:
        raise _stopped(line, checkpoints)
    if (error := checkpoint.write_problem(os.fspath(mngr.directory))) is not None:
        raise error  # as orbax's save would raise it, without its 300 s wait (`_saving` words it)


_WRITABLE_REASONS = {os.strerror(code) for code in checkpoint.NOT_WRITABLE}


def _advice(error: BaseException, reason: str, directory: str) -> str:
    """What to do before the rerun, by the reason a write failed: make the folder writable (a permission, a
    read-only mount; it said "make room" of those too), else make room."""
    if reason not in _WRITABLE_REASONS:
        return "make room and "
    filename = getattr(error, "filename", None)
    folder = os.path.dirname(filename) if isinstance(filename, str) and filename else directory
    return f"make {folder} writable and "


@contextlib.contextmanager
def _saving(checkpoints: ocp.CheckpointManager):
    """Stops the run in one line (`_stopped`) when a checkpoint save, or the wait for one in flight, fails to write
    (`checkpoint.write_failure`): orbax raises an async save's failure at the next wait or save."""
    try:
        yield
    except (ValueError, OSError) as e:
        if (reason := checkpoint.write_failure(e)) is None:
            raise
        workdir = os.path.dirname(os.fspath(checkpoints.directory))
        raise _stopped(f"cannot save a checkpoint in {workdir} ({reason})", checkpoints,
                       advice=_advice(e, reason, os.fspath(checkpoints.directory))) from None


def _stopped(line: str, mngr: ocp.CheckpointManager, advice: str = "make room and ") -> TrainingError:
    """The error a run stops with: `line`, what it leaves in `mngr` (`_kept`) and what the rerun does."""
    kept, then = _kept(mngr)
    return TrainingError(f"{line}; {kept}: {advice}rerun to {then}")


def _kept(mngr: ocp.CheckpointManager) -> tuple[str, str]:
    """What a run that stops without saving leaves (once the saves in flight are done), and what a rerun does."""
    with contextlib.suppress(ValueError, OSError):  # a save that failed: its step is not among the complete ones
        mngr.wait_until_finished()
    directory = os.fspath(mngr.directory)
    if steps := checkpoint.complete_steps(directory):
        return f"the last good checkpoint (step {steps[-1]}) is intact", "resume from it"
    best = os.path.join(os.path.dirname(directory), checkpoint.BEST)
    if best_steps := checkpoint.complete_steps(best):  # it said "there is no checkpoint yet" of a run with one there
        return (f"there is no checkpoint to resume from yet ({best}/{best_steps[-1]} holds the parameters that "
                "validated best)", "start afresh")
    return "there is no checkpoint yet", "start afresh"


def _check_finite(host: dict, s: int, mngr: ocp.CheckpointManager) -> None:
    if host["nonfinite"] > 0:
        kept, then = _kept(mngr)
        raise TrainingError(
            f"non-finite loss or gradient in {int(host['nonfinite'])} step(s) up to step {s}; stopped without "
            f"saving: {kept}. Lower optim.lr or set optim.grad_clip, then rerun to {then}")


def _progress(first: int, total: int):
    if jax.process_index() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=first, unit="step", dynamic_ncols=True, leave=False)
