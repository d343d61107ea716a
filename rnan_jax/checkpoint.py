"""The checkpoint format (orbax) and `load(path) -> (params, RNANConfig)`.

A training workdir holds:
  checkpoints/<step>/  items params, ema (when EMA is on), opt (step + optimizer state), meta (JSON:
                       model_config, step, metrics, and the SHA-256 of each item's arrays, checked on every read);
                       the latest few are kept. The input pipeline's position
                       is the step (data.train_dataset); checkpoints of earlier versions also hold a data
                       item per process, which is not read;
  best/<step>/         items params, ema, meta of the checkpoint with the best validation PSNR;
  config.json, git_revision.txt  the resolved config and the code's revision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from rnan_jax import paths, zoo
from rnan_jax.model import RNANConfig

CHECKPOINTS, BEST = "checkpoints", "best"
WHICH = ("latest", "best", "ema")
# The CLIs' --which: "auto" (their default) is what validation scored, resolved by `resolve_which`.
CLI_WHICH = ("auto", *WHICH)
WHICH_HELP = ("Which parameters of --checkpoint: auto (those validation scored: the EMA where the run kept one, "
              "else latest), latest (the newest checkpoint's), best (best/: those that scored best) or ema (the "
              "newest checkpoint's EMA).")


class CheckpointError(ValueError):
    """A path that holds no usable rnan_jax checkpoint; the message names it."""


def manager(directory: str, *, max_to_keep: int | None = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` (created if missing), saving asynchronously, for the one run that
    writes there: it removes the partial step folders (`<step>.orbax-checkpoint-tmp*`) of a save that did not
    finish (the process killed, or stopped by a second Ctrl-C, while writing)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    logging.getLogger("absl").addFilter(_not_an_interrupted_wait)  # the same function is added once
    quiet_failed_saves()
    return ocp.CheckpointManager(paths.resolve(directory), options=options)


def _arrays(state: Any) -> dict:
    """The array items of a train state (`step.TrainState` or its abstract target): params, opt, ema."""
    arrays = {"params": state.params,
              "opt": {"step": state.step, "opt_state": state.opt_state, "loss_avg": state.loss_avg}}
    if state.ema is not None:
        arrays["ema"] = state.ema
    return arrays


def _state_items(state: Any, meta: dict | None, restore: bool) -> dict:
    """The orbax items of a train state (`step.TrainState` or its abstract target): params, opt, ema, meta."""
    array = ocp.args.StandardRestore if restore else ocp.args.StandardSave
    items = {name: array(tree) for name, tree in _arrays(state).items()}
    items["meta"] = ocp.args.JsonRestore() if restore else ocp.args.JsonSave(meta)
    return items


# In a step's meta: {item: `digest` of its arrays}. orbax keeps no checksum of the data it writes: a bit flipped in
# a data file (a disk, a network copy, a bucket) loaded without a word, and a run resumed or was scored with
# wrong weights. Steps saved before it have none and load as they did.
SHA256 = "sha256"


def digest(tree: Any) -> str | None:
    """The SHA-256 of the arrays of `tree` (each leaf's dtype, shape and bytes, in tree order), from host copies:
    of a global array, this process's replica (a multi-process run's state is replicated, and no process can fetch
    the global array whole); None when a leaf is sharded across processes (no one process holds all of it). About
    0.1 s for the paper's x4 parameters (66 MiB) on one CPU core, the copy to the host included."""
    leaves = jax.tree_util.tree_leaves(tree)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                return None
            leaves[i] = leaf.addressable_data(0)
    h = hashlib.sha256()
    for leaf in jax.device_get(leaves):
        a = np.ascontiguousarray(leaf)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _with_digests(meta: dict, arrays: dict) -> dict:
    """`meta` with the digest of each item of `arrays` (computed here, in the caller's thread: an asynchronous
    save's are those of the arrays it was given), or as it is where an item cannot be digested. Every process of a
    run computes it, of its replica (the same bytes), and orbax writes the primary process's meta."""
    digests = {name: digest(tree) for name, tree in arrays.items()}
    return meta if None in digests.values() else {**meta, SHA256: digests}


def _digest_problem(meta: Any, restored: dict, step_dir: str) -> CheckpointError | None:
    """The error for an item of `restored` ({item: arrays}, of the step at `step_dir`) whose digest is not the one
    its step's `meta` records (None where it matches or none is recorded: a step saved before digests were)."""
    recorded = meta.get(SHA256) if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        return None
    for name, tree in restored.items():
        want = recorded.get(name)
        if want is None or (got := digest(tree)) is None or got == want:
            continue
        if not _as_saved(os.path.join(step_dir, name), tree):  # cast onto another version's dtypes: other bytes
            continue
        return CheckpointError(f"{name}: its arrays are not those saved (SHA-256 {got[:12]}..., recorded "
                               f"{want[:12]}...): a file of it changed since it was written")
    return None


def _as_saved(item_dir: str, tree: Any) -> bool:
    """Whether the arrays of `tree`, restored from the item at `item_dir`, have the dtypes and shapes they were saved
    with: a train state of another version (a dtype changed) has orbax cast them, which changes their bytes and not
    their values. True when the item's metadata cannot be read."""
    if (saved := _saved_tree(item_dir)) is None:
        return True
    kinds = sorted(f"{np.dtype(m.dtype).str}{tuple(m.shape)}" for m in jax.tree_util.tree_leaves(saved))
    return kinds == sorted(f"{np.dtype(x.dtype).str}{tuple(x.shape)}" for x in jax.tree_util.tree_leaves(tree))


def _saved_tree(item_dir: str) -> Any:
    """The tree of array metadata (dtypes, shapes) orbax recorded for the item at `item_dir`; None where that
    metadata is missing or unreadable."""
    try:
        with quiet():
            return ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    except Exception:  # orbax raises many kinds for missing or corrupt files
        return None


def room_problem(mngr: ocp.CheckpointManager, step: int, items: Any) -> str | None:
    """One line when the local filesystem of `mngr` lacks the room for checkpoint `step` of `items` (about
    their bytes: orbax stores the arrays as they are; the older checkpoints it removes go only after the new
    one is complete), after the save in flight has finished; None when there is room, or for a gs:// URL.
    Saving into a full disk failed in orbax's save threads with hundreds of lines of tracebacks."""
    directory = os.fspath(mngr.directory)
    mngr.wait_until_finished()
    free = paths.free_bytes(directory)
    need = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(items)) * 1.02 + 2**16  # + metadata
    if free is None or free >= need:
        return None
    return (f"no room for checkpoint {step} in {directory}: it needs about {need / 2**20:,.1f} MiB, "
            f"{free / 2**20:,.1f} MiB are free")


def write_problem(directory: str) -> OSError | None:
    """The OSError of making a folder in the local `directory` (read-only, a full disk), as orbax's save would
    make its step's folder; None when it can, or for a gs:// URL. A save whose folder cannot be made waited in
    orbax's other save threads for that folder's signal, 300 s (the process's exit too), then printed their
    tracebacks."""
    if paths.is_url(directory):
        return None
    # named by host and process: the processes of a multi-host run probe one shared folder at once (NFS), and
    # process ids repeat across hosts (a container's are the same on each)
    probe = os.path.join(directory, f".rnan_jax_write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.mkdir(probe)
    except FileExistsError:  # left by a process killed before its rmdir: it could make it
        pass
    except OSError as e:
        return e
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


def save_train_state(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (a `step.TrainState`) as checkpoint `step`: params, opt, ema, meta. No data item: the
    input pipeline's position is the step (`data.train_dataset`), so a run resumes under any process count."""
    meta = _with_digests(meta, _arrays(state))
    mngr.save(step, args=ocp.args.Composite(**_state_items(state, meta, restore=False)), force=True)


def restore_train_state(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`, restored onto the shardings of `target` (a `step.TrainState` of
    arrays or ShapeDtypeStructs). A checkpoint saved without EMA (optim.ema_decay 0) restored for a target
    with one gives `state.ema` None: the caller starts the EMA. Raises CheckpointError for an item with a
    file missing, else what orbax raises for unreadable files."""
    from rnan_jax.step import TrainState

    quiet_failed_reads()
    step_dir = os.path.join(os.fspath(mngr.directory), str(step))
    if target.ema is not None and not paths.exists(os.path.join(step_dir, "ema")):
        target = target.replace(ema=None)
    items = _state_items(target, None, restore=True)
    for item in items:
        if item != "meta":
            check_item(os.path.join(step_dir, item))
    adam_alone = _adam_alone(os.path.join(step_dir, "opt"), target.opt_state)
    if adam_alone:  # restored into the chain's second state, the first (no arrays) taken from the target
        items = _state_items(target.replace(opt_state=target.opt_state[1]), None, restore=True)
    r = mngr.restore(step, args=ocp.args.Composite(**items))
    problem = _digest_problem(r["meta"], {name: r[name] for name in items if name != "meta"}, step_dir)
    if jax.process_count() > 1:  # one decision for all: a process that resumed alone would wait for the others
        from jax.experimental import multihost_utils

        bad = multihost_utils.process_allgather(np.int32(problem is not None))
        if problem is None and np.any(bad):
            problem = CheckpointError(f"its arrays as process {int(np.argmax(bad))} read them are not those saved")
    if problem is not None:
        raise problem
    opt_state = r["opt"]["opt_state"]
    if adam_alone:
        opt_state = type(target.opt_state)((target.opt_state[0], opt_state))
    state = TrainState(step=r["opt"]["step"], params=r["params"], opt_state=opt_state,
                       ema=r["ema"] if target.ema is not None else None, loss_avg=r["opt"]["loss_avg"])
    return state, r["meta"]


def _adam_alone(opt_dir: str, opt_state: Any) -> bool:
    """Whether the opt item at `opt_dir` holds the optimizer state of a run before the optimizer became always a
    chain of two (clipping or `optax.identity()`, then Adam): one trained without clipping saved Adam's state
    alone, [Adam's {count, mu, nu}, the schedule's {count}], where `opt_state` (the chain's) is (the first's state,
    which holds no arrays, Adam's). Such a checkpoint failed to restore, was called damaged and moved aside, and
    the run started again from step 0. False when the metadata cannot be read (the restore then reports it)."""
    if not (isinstance(opt_state, tuple) and len(opt_state) == 2 and not jax.tree_util.tree_leaves(opt_state[0])):
        return False
    try:
        saved = _saved_tree(opt_dir)["opt_state"]
    except (TypeError, KeyError):  # missing or unreadable metadata: the restore reports it
        return False
    adam = opt_state[1]
    return (isinstance(saved, (list, tuple)) and isinstance(adam, tuple) and len(saved) == len(adam)
            and isinstance(saved[0], dict) and {"mu", "nu"} <= set(saved[0]))


def save_best(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves the parameters (and EMA) of the best validation so far under `best/` (params, ema, meta).

    A step at or after `step` already there was left by a run that went further and was lost (resumed from an
    earlier checkpoint); the caller only saves above its PSNR (`best_psnr`), so it is replaced. orbax would
    otherwise skip the save (a step not after its latest) and keep the stale one."""
    arrays = {k: v for k, v in _arrays(state).items() if k != "opt"}
    items = {k: v for k, v in _state_items(state, _with_digests(meta, arrays), restore=False).items() if k != "opt"}
    for stale in mngr.all_steps():
        if stale >= step:
            mngr.delete(stale)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def best_psnr(directory: str) -> tuple[float, str | None]:
    """The validation PSNR recorded with the newest checkpoint in `directory` (a `best/` folder), and what it
    was measured on (the run's `Validator.describe()`; None in a record older than that field); -inf when there is
    none or its record is unreadable."""
    steps = complete_steps(directory)
    try:
        meta = read_meta(directory, steps[-1]) if steps else {}
        return float(meta["val_psnr"]) if steps else -math.inf, meta.get("validation")
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
        return -math.inf, None


def meta_for(config: RNANConfig, step: int, **metrics: Any) -> dict:
    """The JSON record stored with every checkpoint."""
    return {"model_config": dataclasses.asdict(config), "step": int(step), **metrics}


def config_from_meta(meta: dict) -> RNANConfig:
    fields = dict(meta["model_config"])
    fields["rgb_mean"] = tuple(fields["rgb_mean"])
    return RNANConfig(**fields)


@contextlib.contextmanager
def quiet():
    """Hides orbax's INFO/WARNING chatter (e.g. "Metadata file does not exist" on a good checkpoint) while
    reading, unless the user asked for more with --verbosity (absl verbosity INFO or above)."""
    if absl_logging.get_verbosity() >= absl_logging.INFO:
        yield
        return
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


def _closed_loop_callback(unraisable: Any) -> bool:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    # orbax's read coroutine that the failed restore left unawaited, closed when collected: its `except
    # BaseException` turns the GeneratorExit into an Exception ("Exception ignored in: <coroutine object
    # _read_array_index_and_device_put>", with a 60-line TensorStore spec)
    code = getattr(unraisable.object, "cr_code", None)
    return (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
            and isinstance(getattr(unraisable.exc_value, "__cause__", None), GeneratorExit))


_SHARD_READ = "Encountered error while reading array index"  # how orbax 0.12's per-shard read reports a failure


def _not_an_unretrieved_read(record: logging.LogRecord) -> bool:
    """A filter for asyncio's logger: False for its report of a failed orbax read that nobody awaited: the task
    is orbax's `async_deserialize()`, or (as the timing falls) the `_wrap_awaitable()` around a tensorstore read
    whose error names its spec."""
    text = str(record.msg)
    if not text.startswith("Task exception was never retrieved"):
        return True
    error = str(record.exc_info[1]) if record.exc_info and record.exc_info[1] is not None else text
    tensorstore_read = "tensorstore_spec" in error and ("Error reading" in error or "Error opening" in error)
    shard_read = error.startswith(_SHARD_READ)
    return not ("coro=<async_deserialize()" in text or ("coro=<_wrap_awaitable()" in text and tensorstore_read)
                or ("coro=<_read_array_index_and_device_put()" in text and shard_read))


def quiet_failed_reads() -> None:
    """Keeps a failed restore's report to the one error it raises. orbax reads an item's arrays as tasks on an
    event loop of its own; when one read fails (a damaged checkpoint), the others finish later, on
    tensorstore's threads: their callbacks find the loop closed (asyncio reports each as an unraisable
    'Event loop is closed' with its traceback) and their failures are never retrieved (asyncio logs each,
    with a traceback, when the task is collected): dozens of tracebacks for one damaged item, after the
    restore has raised. Only those two kinds are dropped, for the rest of the process (they come late); any
    other unraisable error or asyncio log is reported as before. Idempotent."""
    logging.getLogger("asyncio").addFilter(_not_an_unretrieved_read)  # the same function is added once
    _drop_closed_loop_callbacks()


def _drop_closed_loop_callbacks() -> None:
    previous = sys.unraisablehook
    if getattr(previous, "_rnan_jax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook._rnan_jax_quiet = True
    sys.unraisablehook = hook


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a quota
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a folder made read-only, a read-only mount


def write_failure(error: BaseException) -> str | None:
    """The reason (e.g. "No space left on device") when `error` is orbax's failure to write a checkpoint's
    files, as its save raises it (a ValueError from tensorstore: "Error writing", or "Failed writing" for an
    array's data file; an OSError for orbax's own metadata files), else None."""
    text = str(error)
    if isinstance(error, OSError) and error.errno in _NO_ROOM + NOT_WRITABLE:
        return os.strerror(error.errno)
    if not isinstance(error, (ValueError, OSError)) or not re.search(r"(Error|Failed) writing", text):
        return None
    code = re.search(r"os_error_code='(\d+)'", text)
    return os.strerror(int(code.group(1))) if code else text.splitlines()[0][:200]


def _not_a_failed_write(record: logging.LogRecord) -> bool:
    """A filter for absl's and asyncio's loggers: False for the reports of a checkpoint write that failed from
    orbax's save threads (each array's, with a traceback) and from asyncio (its futures, never retrieved); the
    save raises that failure in the caller's thread."""
    error = record.exc_info[1] if record.exc_info else None
    unretrieved = "exception was never retrieved" in str(record.msg).split("\n", 1)[0]
    return not (error is not None and write_failure(error) is not None and
                (unretrieved or not _not_from_orbax(record)))


def quiet_failed_saves() -> None:
    """Keeps a failed save's report (a full disk, a quota) to the one error it raises: orbax's save threads log
    each array's failed write with its traceback, and tensorstore's callbacks into the event loop that orbax
    closed on the failure print 'Event loop is closed' with theirs, some 800 lines. Idempotent."""
    logging.getLogger("absl").addFilter(_not_a_failed_write)
    logging.getLogger("asyncio").addFilter(_not_a_failed_write)
    _drop_closed_loop_callbacks()


def _not_from_orbax(record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def _not_an_interrupted_wait(record: logging.LogRecord) -> bool:
    """A filter for absl's logger: False for orbax's error when Ctrl-C lands in its wait for a save (the
    interruption is reported once, by the caller)."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt) and not _not_from_orbax(record))


def abandon_saves() -> None:
    """For a process that stops while a save may be in flight (a second Ctrl-C) and will not wait for it:
    orbax's save threads then fail as the interpreter shuts down, each logging errors with tracebacks
    ('cannot schedule new futures after interpreter shutdown'), and the coroutines of its writes that never
    ran warn at exit ("coroutine '...write_fragment' was never awaited"); both are dropped from here on. The
    save's partial folder is removed when a run next opens the workdir (`manager`)."""
    logging.getLogger("absl").addFilter(_not_from_orbax)
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    quiet_failed_reads()


def check_item(item_dir: str) -> None:
    """Raises CheckpointError when a file that every saved item holds is missing, before orbax is asked to
    read it (orbax then fails with tracebacks from its background threads rather than one error)."""
    names = set(paths.listdir(item_dir)) if paths.isdir(item_dir) else set()
    required = ["_METADATA"] + (["manifest.ocdbt"] if any(n.startswith("ocdbt.process_") for n in names) else [])
    missing = [n for n in required if n not in names]
    if missing:
        raise CheckpointError(f"{item_dir}: {', '.join(missing)} missing")


def _single_device_target(item_dir: str) -> Any:
    """Abstract arrays for restoring an item onto one local device, whatever topology saved it."""
    check_item(item_dir)
    metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
    if metadata is None or getattr(metadata, "tree", None) is None:
        raise CheckpointError(f"{item_dir}: its array metadata (_METADATA) is missing or unreadable")
    tree = metadata.tree
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def _locate(path: str, which: str) -> tuple[str, int]:
    """(manager directory, step) of the checkpoint that `path` and `which` name."""
    try:
        path = paths.resolve(path)
        found = paths.exists(path)
    except ValueError as e:  # a gs:// path without gcsfs: the message names the path and the fix
        raise CheckpointError(str(e)) from None
    except OSError as e:  # a storage that cannot be reached
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None
    if not found:
        raise CheckpointError(f"{path}: no such file or folder")
    if paths.isdir(os.path.join(path, "params")):  # one step's folder
        step_name = os.path.basename(path)
        if not step_name.isdigit():
            raise CheckpointError(f"{path}: a checkpoint step folder must be named by its step number")
        if which == "best" and os.path.basename(os.path.dirname(path)) != BEST:  # it gave this step's EMA
            raise CheckpointError(f"{path}: which 'best' (--which best) reads a workdir's {BEST}/ folder, and this "
                                  f"step is not in one: pass the workdir, or which 'ema' or 'latest' for this step")
        return os.path.dirname(path), int(step_name)
    if paths.isdir(os.path.join(path, CHECKPOINTS)):  # a training workdir
        path = os.path.join(path, BEST if which == "best" else CHECKPOINTS)
        if not paths.isdir(path):
            raise CheckpointError(f"{path}: no best checkpoint yet (it is written after the first validation)")
    elif paths.isdir(os.path.join(path, BEST)) and complete_steps(os.path.join(path, BEST)):  # a workdir of best/
        if which != "best":  # alone (its checkpoints/ removed, or not copied): it was "not an rnan_jax checkpoint"
            raise CheckpointError(f"{path}: holds only {BEST}/, no {CHECKPOINTS}/: pass which 'best' (--which best) "
                                  f"or {os.path.join(path, BEST)}")
        path = os.path.join(path, BEST)
    elif which == "best" and os.path.basename(path) == CHECKPOINTS:  # it gave the newest step's EMA
        raise CheckpointError(f"{path}: which 'best' (--which best) reads a workdir's {BEST}/ folder, not its "
                              f"{CHECKPOINTS}/: pass {os.path.dirname(path)}")
    steps = complete_steps(path)
    if not steps and os.path.basename(path) in (CHECKPOINTS, BEST):
        raise CheckpointError(f"{path}: no complete checkpoint yet (training has not finished its first save, "
                              "or the save was interrupted)")
    if not steps:
        raise CheckpointError(f"{path}: not an rnan_jax checkpoint (expected a training workdir, its "
                              f"{CHECKPOINTS}/ or {BEST}/ folder, or one step's folder holding params/)")
    return path, max(steps)


def complete_steps(directory: str) -> list[int]:
    """Steps in `directory` whose save finished (orbax's tmp folders of interrupted saves left out), sorted."""
    if not paths.isdir(directory):
        return []
    steps = ocp.utils.checkpoint_steps(directory)
    return sorted(s for s in steps if paths.isdir(os.path.join(directory, str(s), "params")))


def damaged(directory: str, step: int, error: BaseException, *, hint: bool = True) -> CheckpointError:
    """The one-line error for a step that exists but cannot be read, naming it (and, with `hint`, the steps
    before it)."""
    earlier = [s for s in complete_steps(directory) if s < step]
    while str(error).startswith(_SHARD_READ) and error.__cause__ is not None:  # orbax 0.12's wrapper, whose text
        error = error.__cause__  # is the array index and the read's repr, cut off before the reason
    detail = " ".join(str(error).split())[:200]
    detail = detail if isinstance(error, CheckpointError) else f"{type(error).__name__}: {detail}"
    hint = (f"; the steps before it: {', '.join(map(str, earlier))} (pass {directory}/{earlier[-1]} to use "
            "the newest)" if earlier and hint else "")
    return CheckpointError(f"{directory}/{step}: damaged checkpoint ({detail}){hint}")


def describe(config: RNANConfig) -> str:
    return (f"x{config.scale} model (features {config.features}, {config.num_groups} groups x "
            f"{config.num_blocks} blocks, intervals {config.group_interval}/{config.block_interval}, "
            f"GC reduction {config.gc_reduction})")


def same_architecture(a: RNANConfig, b: RNANConfig) -> bool:
    """Whether parameters of `a` fit `b` (the compute dtype does not matter: parameters are float32)."""
    return dataclasses.replace(a, dtype="float32") == dataclasses.replace(b, dtype="float32")


def move_aside(directory: str, step: int) -> str:
    """Moves a damaged step out of the manager's folder to `<directory>_damaged/<step>` (kept, not deleted)."""
    target = os.path.join(directory + "_damaged", str(step))
    n = 0
    while paths.exists(target if n == 0 else f"{target}.{n}"):  # the same step damaged before: kept too
        n += 1
    target = target if n == 0 else f"{target}.{n}"
    paths.makedirs(os.path.dirname(target))
    paths.rename(os.path.join(directory, str(step)), target)
    return target


def read_meta(directory: str, step: int) -> dict:
    """The JSON record of one step (model config, step, metrics); raises CheckpointError when unreadable."""
    path = os.path.join(directory, str(step), "meta", "metadata")  # where orbax's JsonSave puts it
    try:
        if not paths.isfile(path) and paths.isdir(os.path.dirname(path)):  # another orbax layout
            with quiet():
                return ocp.CheckpointManager(directory).restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return json.loads(paths.read_text(path))
    except Exception as e:  # a missing or corrupt record, however orbax reports it
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None


def load(path: str | os.PathLike, *, which: str = "latest") -> tuple[dict, RNANConfig]:
    """Parameters and architecture from a training workdir, one step's checkpoint folder, or a model of the
    package's zoo ("zoo:small_x2", see MODEL_ZOO.md).

    which: "latest" (the newest checkpoint's parameters), "best" (those that scored the best validation PSNR:
    with EMA on, the EMA, which validation scores), or "ema" (the newest checkpoint's exponential moving average
    of the parameters). Raises `CheckpointError`. `load_named` also says which step it read.
    """
    params, config, _ = load_named(path, which=which)
    return params, config


def scored(path: str | os.PathLike) -> str:
    """The `which` of the parameters that the newest checkpoint at `path` was validated with: "ema" where it
    holds an EMA (validation scores the EMA when it is on), else "latest". Raises `CheckpointError`."""
    if zoo.is_zoo(os.fspath(path)):
        return "latest"
    directory, step = _locate(os.fspath(path), "latest")
    return "ema" if holds_ema(directory, step) else "latest"


def holds_ema(directory: str, step: int) -> bool:
    """Whether checkpoint `step` in `directory` holds an EMA of its parameters (saved with optim.ema_decay > 0)."""
    return paths.isdir(os.path.join(directory, str(step), "ema"))


def resolve_which(path: str | os.PathLike, which: str) -> str:
    """`which` as `load` takes it: "auto" (the CLIs' default) is `scored(path)`, the parameters validation scored
    (the EMA of a run trained with it: --which latest scored the raw parameters, and gave other numbers than the
    run had logged for that step); the others as they are. Raises `CheckpointError`."""
    if which != "auto":
        return which
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        return "latest"  # `load` refuses the path in its own words ("" is not the current folder)
    return scored(path)


def _read(directory: str, step: int, which: str) -> tuple[dict, RNANConfig]:
    """The parameters and architecture of checkpoint `step` in `directory`, as `load` names them."""
    validated = which == "best" and holds_ema(directory, step)  # what scored best
    item = "ema" if which == "ema" or validated else "params"
    item_dir = os.path.join(directory, str(step), item)
    if not paths.isdir(item_dir):
        raise CheckpointError(f"{os.path.dirname(item_dir)}: holds no {item} (was the run trained with EMA?)")
    quiet_failed_reads()
    try:
        meta = read_meta(directory, step)
        config = config_from_meta(meta)
        with quiet():
            restored = ocp.CheckpointManager(directory).restore(step, args=ocp.args.Composite(**{
                item: ocp.args.StandardRestore(_single_device_target(item_dir))}))
        if (problem := _digest_problem(meta, {item: restored[item]}, os.path.join(directory, str(step)))) is not None:
            raise problem
    except Exception as e:  # orbax/tensorstore raise many kinds for missing or corrupt files
        raise damaged(directory, step, e) from None
    return restored[item], config


class Named(NamedTuple):
    """What `load_named` read, for a report to name: `step`, the checkpoint step the parameters are of (of a zoo file,
    the step its meta records, None where it records none), and `text`, that in words: "step 8", or a zoo file's
    record ("the run's ema at step 2000")."""

    step: int | None
    text: str


def zoo_words(meta: dict) -> tuple[int | None, str]:
    """(step, words) of what a zoo file's `meta` (tools/make_zoo.py's record) says its parameters are: "the run's
    ema at step 2000", or "the run's latest, its step not recorded" (a file made before make_zoo recorded it)."""
    which, step = meta.get("which"), meta.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    if not which:
        return step, "a zoo file that records no run" + (f", step {step}" if step is not None else "")
    return step, f"the run's {which}" + (f" at step {step}" if step is not None else ", its step not recorded")


def named_source(path: str, which: str, flag: str = "--checkpoint") -> str:
    """How a CLI names the parameters it read, in its flags' words: "--checkpoint runs/x4 --which ema"; of a zoo
    file "--checkpoint zoo:NAME" alone (`which` does not apply: `Named.text` says what its record holds)."""
    return f"{flag} {path}" + ("" if zoo.is_zoo(path) else f" --which {which}")


def load_named(path: str | os.PathLike, *, which: str = "latest") -> tuple[dict, RNANConfig, Named]:
    """`load`, and which parameters it read (`Named`): the step of a checkpoint, the one read (located once and read
    as located; where a run training in the workdir removed it meanwhile, as it removes its older steps and the
    best/ step a better one replaces, the newest then: the step named is the step read), or what a zoo file's meta
    records. The CLIs' reports named `--which ema` alone, which a live run makes one of several steps, and a zoo
    file `--which latest` whatever its run's parameters were. Raises `CheckpointError`."""
    if which not in WHICH:
        raise CheckpointError(f"which must be one of {WHICH}, got {which!r}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):  # "" would be the current folder
        raise CheckpointError(f"path must name a workdir, checkpoint folder or zoo model, got {path!r}")
    path = os.fspath(path)
    if zoo.is_zoo(path):  # shipped weights: one set of parameters, `which` does not apply
        if which != "latest":  # --which ema/best gave those same parameters without a word
            raise CheckpointError(f"{path}: a zoo model holds one set of parameters (those make_zoo took from its "
                                  f"run), so which {which!r} (--which) does not apply")
        try:
            params, config, meta = zoo.read(zoo.path_of(path))  # a shipped file: read checks its SHA-256
        except zoo.ZooError as e:
            raise CheckpointError(str(e)) from None
        return params, config, Named(*zoo_words(meta))
    located = _locate(path, which)
    while True:
        try:
            params, config = _read(*located, which)
            return params, config, Named(located[1], f"step {located[1]}")
        except CheckpointError:
            try:
                newest = _locate(path, which)
            except CheckpointError:
                newest = located
            if newest == located:
                raise
            located = newest


def drop_from_meta(directory: str, step: int, key: str) -> None:
    """Rewrites the JSON record of checkpoint `step` in `directory` (`read_meta`'s file) without `key`, every other
    entry (the SHA-256s included) as it was: a local file through a partial one renamed over it, a gs:// object in
    one upload, so that a reader finds the old record or the new one whole (orbax cannot save a step again). Nothing
    is written where `key` is absent or the record is in another orbax layout. Raises CheckpointError (unreadable)
    or OSError."""
    path = os.path.join(directory, str(step), "meta", "metadata")
    meta = read_meta(directory, step)
    if key not in meta or not paths.isfile(path):
        return
    text = json.dumps({k: v for k, v in meta.items() if k != key})
    if paths.is_url(path):
        paths.write_text(path, text)
    else:
        paths.write_atomically(path, lambda f: f.write(text.encode()))
