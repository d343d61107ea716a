"""The run directory's lock (local flock, gs:// lock object) as a rerun or a second run meets it."""
import os
import re
import socket
import time

import pytest
from test_gcs import gcs  # noqa: F401 (fixture: fake-gcs-server with the bucket "bucket")


def test_a_local_run_s_train_lock_copied_to_a_gs_workdir_is_not_said_to_go_stale(gcs, tmp_path, monkeypatch):  # noqa: F811
    """A local run leaves its train.lock (a flock's file, which says who held it and nothing of when it was last
    alive). Copied up with the workdir (trained on a workstation, resumed on a TPU VM), the gs:// run refused it,
    saying to "rerun once the lock is 10 min stale": such a lock is never stale, so that rerun was refused again."""
    from rnan_jax import paths, rundir

    local = str(tmp_path / "run")
    os.makedirs(local)
    with rundir.exclusive(local):
        pass
    left = open(os.path.join(local, rundir.LOCK_FILE)).read()  # the local lock, left after its run
    assert re.fullmatch(r"pid \d+ on .+, started .* UTC\n", left)
    url = "gs://bucket/copied"
    lock = f"{url}/{rundir.LOCK_FILE}"
    left = left.replace(f" on {socket.gethostname()},", " on workstation,")  # copied from another machine
    paths.write_text(lock, left)
    monkeypatch.setattr(rundir, "URL_LOCK_STALE_S", 0.5, raising=False)
    time.sleep(1)  # older than the stale time: still refused, as it was, but not told to wait for it
    for _ in range(2):
        with pytest.raises(ValueError) as e:
            with rundir.exclusive(url):
                pass
        assert str(e.value) == (
            f"--workdir {url}: another run is training in it ({left.strip()}); let it finish or stop it first, or use "
            f"another --workdir; its lock {lock} does not say when its run was last alive (a local run's "
            "train.lock, copied with the workdir?): if no run is training there, delete it")
    assert paths.read_text(lock) == left
    paths.remove(lock)  # as the line says
    with rundir.exclusive(url):
        assert paths.read_text(lock).startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
    assert not paths.exists(lock)


def test_a_checkpoint_of_adam_state_alone_from_before_the_optimizer_chain_resumes(tmp_path):
    """Revisions before the optimizer became always a chain of two (clipping or optax.identity(), then Adam)
    saved, for a run without clipping (the default), Adam's state alone as opt_state. The current code failed to
    restore it ("tree structures do not match"), the trainer called every such step damaged, moved them all to
    checkpoints_damaged/ and trained again from step 0. Now it restores into the chain, every array as saved."""
    import jax
    import numpy as np

    from rnan_jax import checkpoint
    from rnan_jax.model import RNANConfig
    from rnan_jax.step import OptimConfig, StepSpec, create_state

    spec = StepSpec(RNANConfig(scale=2, features=4, num_groups=1, num_blocks=1, gc_reduction=2),
                    OptimConfig(lr=1e-3, ema_decay=0.9))
    state = create_state(jax.random.key(0), spec=spec)
    assert not jax.tree_util.tree_leaves(state.opt_state[0])  # optax.identity()'s state: no arrays
    adam = jax.tree_util.tree_map(lambda x: np.full(x.shape, 3, x.dtype), state.opt_state[1])  # not zeros
    old = state.replace(step=np.int32(7), opt_state=adam)  # the old layout: Adam's state alone
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), async_save=False)
    checkpoint.save_train_state(mngr, 7, old, checkpoint.meta_for(spec.model, 7, best_psnr=20.0))
    mngr.wait_until_finished()

    target = jax.eval_shape(lambda: state)
    restored, meta = checkpoint.restore_train_state(mngr, 7, target)
    assert meta["step"] == 7 and int(restored.step) == 7
    assert jax.tree_util.tree_structure(restored.opt_state) == jax.tree_util.tree_structure(state.opt_state)
    for got, want in zip(jax.tree_util.tree_leaves(restored.opt_state), jax.tree_util.tree_leaves(adam)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree_util.tree_leaves((restored.params, restored.ema)),
                         jax.tree_util.tree_leaves((state.params, state.ema))):
        np.testing.assert_array_equal(got, want)


def test_read_scalars_parts_the_runs_of_a_version_that_wrote_no_start(tmp_path):
    """Versions before summary.Writer's purge_step wrote one event file per run, without a SessionLog START: a run
    that logged steps 1-3 over 100 s and its resume an hour later (steps 4-6 over 200 s) were one session, and
    tools/compare_dtypes.py's table said "4200 s from the first to the last logged value". Each such file is a run;
    a run's later file of the current version (".0002", no START) is not."""
    from tensorboardX import SummaryWriter

    from rnan_jax import scalars

    log, scratch = tmp_path / "tensorboard", tmp_path / "scratch"
    log.mkdir()
    # two runs of an old version (steps 1-3, then 4-6 an hour later), then a resume by this one in two files
    runs = (("events.out.tfevents.1000.vm", None, {1: 1000.0, 2: 1050.0, 3: 1100.0}),
            ("events.out.tfevents.5000.vm", None, {4: 5000.0, 5: 5100.0, 6: 5200.0}),
            ("events.out.tfevents.9000.vm.0001", 7, {7: 9000.0}),
            ("events.out.tfevents.9010.vm.0002", None, {8: 9010.0}))
    for name, purge, walls in runs:
        writer = SummaryWriter(str(scratch), purge_step=purge)
        for s, wall in walls.items():
            writer.add_scalar("train/loss", 1.0 / s, s, walltime=wall)
        writer.close()
        (scratch / os.listdir(scratch)[0]).rename(log / name)
    run = scalars.read_scalars(str(log))
    assert sorted(run["train/loss"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert run.sessions == [(1000.0, 1100.0), (5000.0, 5200.0), (9000.0, 9010.0)]
    assert scalars.comparison_table({"float32": run}).splitlines()[-1] == (
        "float32: 310 s from the first to the last logged value of each of its 3 runs (the 7700 s between them "
        "left out)")


def _same(a, b):
    import jax
    import numpy as np

    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _flip_a_bit_that_orbax_reads(item_dir, saved):
    """Flips one bit in a data file (zstd) of the orbax item at `item_dir` where orbax still reads the item, with
    other values than `saved`: the corruption of a disk, a copy or a bucket that nothing noticed."""
    import orbax.checkpoint as ocp

    from rnan_jax import checkpoint

    data_dir = item_dir / "ocdbt.process_0" / "d"
    files = sorted((p for p in data_dir.iterdir() if p.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"),
                   key=lambda p: -p.stat().st_size)
    target = checkpoint._single_device_target(str(item_dir))
    for path in files:
        data = bytearray(path.read_bytes())
        for offset in range(len(data) // 2, len(data), 97):
            data[offset] ^= 1
            path.write_bytes(data)
            try:
                with checkpoint.quiet():
                    read = ocp.StandardCheckpointer().restore(str(item_dir), target)
            except Exception:  # noticed (a zstd error): not the case of interest
                read = None
            if read is not None and not _same(read, saved):
                return
            data[offset] ^= 1
            path.write_bytes(data)
    raise AssertionError(f"{item_dir}: no bit found whose flip orbax reads")


def test_a_bit_flipped_in_a_checkpoint_s_data_is_refused_naming_the_step_and_the_one_before(tmp_path):
    """orbax keeps no checksum of the data it writes: a bit flipped in a data file of a step (a disk, a network
    copy, a bucket) loaded without a word, and evaluate scored, make_zoo shipped and a resumed run trained on
    wrong weights. Every step's meta now holds the SHA-256 of its items' arrays, computed as they are saved and
    checked on every read: the damaged step is refused in one line naming it and the step before it (a resumed run
    moves it aside and takes that one). A step saved without one (an older version's) loads as before."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from rnan_jax import checkpoint
    from rnan_jax.model import RNANConfig
    from rnan_jax.step import OptimConfig, StepSpec, create_state

    spec = StepSpec(RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2),
                    OptimConfig(lr=1e-3, ema_decay=0.9))
    states = {s: create_state(jax.random.key(s), spec=spec).replace(step=np.int32(s)) for s in (3, 5)}
    states = {s: st.replace(ema=jax.tree_util.tree_map(lambda x: x * 0.5, st.params)) for s, st in states.items()}
    workdir = tmp_path / "run"
    ckpts, best = workdir / checkpoint.CHECKPOINTS, workdir / checkpoint.BEST
    mngr = checkpoint.manager(str(ckpts))  # asynchronous, as training saves
    for s, st in states.items():
        checkpoint.save_train_state(mngr, s, st, checkpoint.meta_for(spec.model, s, best_psnr=20.0))
    mngr.wait_until_finished()
    best_mngr = checkpoint.manager(str(best), max_to_keep=1, async_save=False)
    checkpoint.save_best(best_mngr, 5, states[5], checkpoint.meta_for(spec.model, 5, val_psnr=20.0))
    assert sorted(checkpoint.read_meta(str(ckpts), 5)[checkpoint.SHA256]) == ["ema", "opt", "params"]
    assert sorted(checkpoint.read_meta(str(best), 5)[checkpoint.SHA256]) == ["ema", "params"]
    target = jax.eval_shape(lambda: states[5])
    assert _same(checkpoint.restore_train_state(mngr, 5, target)[0], states[5])
    assert _same(checkpoint.load(str(workdir))[0], states[5].params)
    assert _same(checkpoint.load(str(workdir), which="best")[0], states[5].ema)

    _flip_a_bit_that_orbax_reads(ckpts / "5" / "params", states[5].params)
    _flip_a_bit_that_orbax_reads(best / "5" / "ema", states[5].ema)
    said = r"damaged checkpoint \({}: its arrays are not those saved \(SHA-256 [0-9a-f]{{12}}\.\.\., recorded " \
           r"[0-9a-f]{{12}}\.\.\.\): a file of it changed since it was written\)"
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(workdir))
    assert re.fullmatch(f"{ckpts}/5: {said.format('params')}; the steps before it: 3 \\(pass {ckpts}/3 to use the "
                        f"newest\\)", str(e.value)), str(e.value)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(workdir), which="best")
    assert re.fullmatch(f"{best}/5: {said.format('ema')}", str(e.value)), str(e.value)
    with pytest.raises(checkpoint.CheckpointError, match="^params: its arrays are not those saved "):
        checkpoint.restore_train_state(mngr, 5, target)  # the trainer moves the step aside, and takes step 3
    assert _same(checkpoint.load(str(workdir), which="ema")[0], states[5].ema)  # the item not damaged
    assert _same(checkpoint.load(str(ckpts / "3"))[0], states[3].params)
    assert _same(checkpoint.restore_train_state(mngr, 3, target)[0], states[3])
    # a state of another version, whose dtype orbax casts to (other bytes, the same values), is not damaged
    cast = target.replace(loss_avg=jax.ShapeDtypeStruct(target.loss_avg.shape, "bfloat16"))
    assert checkpoint.restore_train_state(mngr, 3, cast)[0].loss_avg.dtype == "bfloat16"

    old = tmp_path / "old" / checkpoint.CHECKPOINTS  # saved by a version before the digests: read as it was
    old_mngr = checkpoint.manager(str(old), async_save=False)
    old_mngr.save(4, args=ocp.args.Composite(params=ocp.args.StandardSave(states[3].params),
                                             meta=ocp.args.JsonSave(checkpoint.meta_for(spec.model, 4))))
    old_mngr.wait_until_finished()
    assert checkpoint.SHA256 not in checkpoint.read_meta(str(old), 4)
    assert _same(checkpoint.load(str(old))[0], states[3].params)


def test_a_restored_train_state_keeps_its_running_loss_step_and_ema(tmp_path):
    """restore_train_state gives back every array of the state saved, the running loss (`loss_avg`, the reference of
    optim.skip_threshold) included: restored as 0, a resumed run with skip_threshold > 0 took every step's loss
    for a spike above 0 x threshold and skipped every step from there on."""
    import jax
    import numpy as np

    from rnan_jax import checkpoint
    from rnan_jax.model import RNANConfig
    from rnan_jax.step import OptimConfig, StepSpec, create_state

    spec = StepSpec(RNANConfig(scale=2, features=4, num_groups=1, num_blocks=1, gc_reduction=2),
                    OptimConfig(lr=1e-3, ema_decay=0.9, skip_threshold=10.0))
    state = create_state(jax.random.key(0), spec=spec)
    state = state.replace(step=np.int32(7), loss_avg=np.float32(0.0625),
                          ema=jax.tree_util.tree_map(lambda x: x * 0.5 + 1, state.params))
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), async_save=False)
    checkpoint.save_train_state(mngr, 7, state, checkpoint.meta_for(spec.model, 7, best_psnr=20.0))
    mngr.wait_until_finished()
    restored, meta = checkpoint.restore_train_state(mngr, 7, jax.eval_shape(lambda: state))
    assert float(restored.loss_avg) == 0.0625 and int(restored.step) == 7 and meta["best_psnr"] == 20.0
    assert _same((restored.params, restored.ema, restored.opt_state), (state.params, state.ema, state.opt_state))


def test_a_step_folder_without_params_is_not_the_newest_checkpoint(tmp_path):
    """A step folder holding no params/ (a copy of the workdir cut off, a save on a store without orbax's tmp folders)
    is not a complete checkpoint: `load` reads the newest step that holds them, and says which."""
    import shutil

    from rnan_jax import checkpoint

    state, ckpts = _a_tiny_run_saved_at_step_5(tmp_path)
    shutil.copytree(ckpts / "5" / "meta", ckpts / "9" / "meta")  # step 9's copy cut off after its meta
    assert checkpoint.complete_steps(str(ckpts)) == [5]
    params, _, named = checkpoint.load_named(str(tmp_path))
    assert named == checkpoint.Named(5, "step 5") and _same(params, state.params)


def test_a_file_where_the_run_writes_any_of_its_folders_is_named_before_it_starts(tmp_path):
    """`problem` names a file at each folder a run writes in its workdir (checkpoints_damaged/ too, where a damaged
    step is moved aside mid-run), not only at the workdir itself."""
    from rnan_jax import rundir

    for name in ("checkpoints", "best", "tensorboard", "checkpoints_damaged"):
        workdir = tmp_path / name / "run"
        workdir.mkdir(parents=True)
        (workdir / name).write_text("notes")
        assert rundir.problem(str(workdir)) == (f"--workdir {workdir}: a file is in the way at {workdir}/{name} (the "
                                                "run writes a folder there)")
    assert rundir.problem(str(tmp_path / "checkpoints")) is None


def test_load_reads_the_newest_step_when_the_one_located_is_removed_while_it_reads(tmp_path, monkeypatch):
    """A run training in the workdir removes its older steps as it saves new ones: a step located and then removed
    before it was read is not an error; `load_named` reads the newest then, and names it."""
    import shutil

    from rnan_jax import checkpoint

    state, ckpts = _a_tiny_run_saved_at_step_5(tmp_path)
    real, read = checkpoint._read, []

    def saved_meanwhile(directory, at, which):
        read.append(at)
        if at == 5:  # the run saved step 9 and removed step 5 as this read began
            shutil.copytree(ckpts / "5", ckpts / "9")
            shutil.rmtree(ckpts / "5")
        return real(directory, at, which)

    monkeypatch.setattr(checkpoint, "_read", saved_meanwhile)
    params, _, named = checkpoint.load_named(str(tmp_path))
    assert read == [5, 9] and named == checkpoint.Named(9, "step 9") and _same(params, state.params)


def _a_tiny_run_saved_at_step_5(tmp_path):
    """(the train state of a tiny x2 model at step 5, the checkpoints/ folder of `tmp_path` holding it)."""
    import jax
    import numpy as np

    from rnan_jax import checkpoint
    from rnan_jax.model import RNANConfig
    from rnan_jax.step import OptimConfig, StepSpec, create_state

    spec = StepSpec(RNANConfig(scale=2, features=4, num_groups=1, num_blocks=1, gc_reduction=2), OptimConfig(lr=1e-3))
    state = create_state(jax.random.key(0), spec=spec).replace(step=np.int32(5))
    ckpts = tmp_path / checkpoint.CHECKPOINTS
    mngr = checkpoint.manager(str(ckpts), async_save=False)
    checkpoint.save_train_state(mngr, 5, state, checkpoint.meta_for(spec.model, 5))
    mngr.wait_until_finished()
    return state, ckpts
