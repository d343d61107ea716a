"""The experiment configs: the paper's recipe, derived scales, and the typed conversion's checks."""
import os
import re
import runpy

import pytest

from rnan_jax import RNANConfig
from rnan_jax.configs import TrainConfig

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def _load(name):
    return runpy.run_path(os.path.join(EXPERIMENTS, f"{name}.py"))["get_config"]()


@pytest.mark.parametrize("name,scale", [("x2", 2), ("x3", 3), ("x4", 4)])
def test_paper_recipe(name, scale):
    cfg = TrainConfig.from_config(_load(name))
    assert cfg.model == RNANConfig(scale=scale)  # 10 GCRGs x 20 RNA blocks, 64 features, N = M = 1, r = 16
    assert (cfg.batch_size, cfg.total_steps, cfg.data.patch_size) == (16, 1_000_000, 48)
    o = cfg.optim
    assert (o.lr, o.b1, o.b2, o.schedule, o.decay_every, o.decay_factor) == (1e-4, 0.9, 0.999, "step", 200_000, 0.5)
    assert cfg.data.source == "tfds" and cfg.data.tfds_name == f"div2k/bicubic_x{scale}"
    assert (cfg.data.val_source, cfg.data.val_set) == ("benchmark", "Set5")


def test_demo_and_classic291():
    demo = TrainConfig.from_config(_load("demo"))
    assert demo.model.scale == 2 and demo.data.source == "demo" and demo.total_steps == 600
    c291 = TrainConfig.from_config(_load("classic291"))
    assert c291.data.source == "folder" and [os.path.basename(d) for d in c291.data.hr_dirs] == ["T91", "BSD200"]


def test_locked_config_rejects_a_mistyped_key_and_bad_values():
    config = _load("x4")
    config.lock()
    with pytest.raises(AttributeError, match="lrr"):
        config.optim.lrr = 2e-4
    bad = _load("x4")
    bad.optim.schedule = "linear"
    with pytest.raises(ValueError, match="optim.schedule"):
        TrainConfig.from_config(bad)
    bad = _load("x4")
    bad.model.block_interval = 3
    with pytest.raises(ValueError, match="block_interval 3 must divide num_blocks 20"):
        TrainConfig.from_config(bad)
    bad = _load("x4")
    bad.execution.depthwise = "fft"
    with pytest.raises(ValueError, match="execution.depthwise"):
        TrainConfig.from_config(bad)
    for key, value in (("remat", "all"), ("cast_params_once", "yes"), ("fusion_autotuner", "off")):
        bad = _load("x4")
        setattr(bad.execution, key, value)
        with pytest.raises(ValueError, match=f"execution.{key}"):
            TrainConfig.from_config(bad)


def test_execution_knobs_default_per_backend():
    """`auto` resolves per backend: on GPUs the scans unrolled by 2, parameters cast once and the attention branch
    recomputed (measured fastest on an H200, tools/BENCHMARKS.md); the CPU keeps every activation and the
    modules' own casts, and rolls the paper model's scans."""
    from rnan_jax import api

    paper = TrainConfig.from_config(_load("x4"))
    assert (paper.execution.cast_once, paper.execution.remat_policy) == (None, None)
    assert (api.default_cast_params_once("gpu"), api.default_remat("gpu")) == (True, "convs")
    assert (api.default_cast_params_once("cpu"), api.default_remat("cpu")) == (False, "none")
    assert api.default_knobs("gpu") == (2, "grouped") and api.default_knobs("tpu") == (1, "grouped")
    assert api.default_knobs("cpu", paper.model) == (1, "shifted")  # 200 blocks: rolled
    config = _load("x4")
    config.execution.cast_params_once, config.execution.remat = "false", "block"
    config.execution.fusion_autotuner = "FALSE"
    execution = TrainConfig.from_config(config).execution
    assert (execution.cast_once, execution.remat_policy, execution.autotune_fusions) == (False, "block", False)
    assert paper.execution.autotune_fusions is None  # auto: XLA's own default (on) everywhere, until measured
    assert api.default_fusion_autotuner("gpu") and api.default_fusion_autotuner("cpu")


def test_block_unroll_unrolls_the_rna_block_scan_apart():
    """execution.block_unroll: 0 leaves scan_unroll for both scans; else the model gets the pair (GCRGs' scan,
    each GCRG's RNA-block scan), with the groups' None resolved to the backend's default by api.build."""
    from rnan_jax import api
    from rnan_jax.configs import ExecutionConfig

    assert [ExecutionConfig(scan_unroll=n).unroll for n in (0, -1, 2)] == [None, True, 2]
    assert ExecutionConfig(block_unroll=-1).unroll == (None, True)
    assert ExecutionConfig(scan_unroll=1, block_unroll=4).unroll == (1, 4)
    config = _load("x4")
    config.execution.block_unroll = -1
    train = TrainConfig.from_config(config)
    model = api.build(train.model, scan_unroll=train.execution.unroll)
    assert model.scan_unroll == (1, True)  # CPU, 200 blocks: the groups rolled; the blocks as asked


@pytest.mark.parametrize("key,value,message", [
    ("keep_checkpoints", 0, "keep_checkpoints must be positive, got 0"),
    ("keep_checkpoints", -1, "keep_checkpoints must be positive, got -1"),
    # the data pipeline failed on it after the set-up: "error: expected non-negative integer"
    ("seed", -1, re.escape("seed must be in [0, 2**63), got -1")),
    ("seed", 2**63, re.escape(f"seed must be in [0, 2**63), got {2**63}")),
    # --config.model.rgb_mean=abc: "error: could not convert string to float: 'abc'", no key named
    ("model.rgb_mean", ("abc",), re.escape("RNANConfig: rgb_mean must be 3 numbers, got ('abc',)")),
    ("optim.warmup_steps", 1_000_000, r"optim.warmup_steps must be in \[0, total_steps 1000000\), got 1000000"),
    ("optim.warmup_steps", -5, r"optim.warmup_steps must be in \[0, total_steps 1000000\), got -5"),
    ("optim.decay_every", 0, "optim.schedule 'step' needs a positive decay_every and decay_factor; got 0 and 0.5"),
    ("optim.lr", -1e-4, "optim.lr, grad_clip, skip_threshold and eps must be >= 0"),
    ("optim.ema_decay", 1.0, r"optim.b1, b2 and ema_decay must be in \[0, 1\)"),
    # a data key that the chosen sources do not read (x4: DIV2K via TFDS, Set5 validation): ignored, it trained
    # on other data than the user named
    ("data.hr_dirs", "/data/T91", "data.hr_dirs is set but nothing reads it: data.source is 'tfds'; set "
                                  "--config.data.source=folder to train on it"),
    ("data.val_lr_dir", "/data/val_lr", "data.val_lr_dir is set but nothing reads it: data.val_source is 'benchmark'"),
])
def test_values_that_would_train_silently_wrong_fail_in_one_line(key, value, message):
    """Each of these used to train: keep_checkpoints 0 as 'keep all', -1 failing in orbax after the data was
    read, a warmup longer than the run never reaching optim.lr, decay_every 0 a constant rate, ..."""
    config = _load("x4")
    *parents, leaf = key.split(".")
    (config[parents[0]] if parents else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_config(config)


def test_edge_values_that_fit_still_convert():
    config = _load("demo")
    config.optim.update(warmup_steps=config.total_steps - 1, decay_every=0, lr=0.0)  # cosine: decay_every unused
    config.keep_checkpoints = 1
    assert TrainConfig.from_config(config).optim.warmup_steps == 599
    config.data.update(source="folder", hr_dirs="/data/T91", val_source="tfds", tfds_name="div2k/bicubic_x2")
    assert TrainConfig.from_config(config).data.tfds_name == "div2k/bicubic_x2"  # read by the validation


@pytest.mark.parametrize("key,suggested", [("patch_size", "data.patch_size"), ("lr", "optim.lr"),
                                           ("model.lr", "optim.lr"), ("optim.lrr", "optim.lr")])
def test_a_key_of_another_section_in_a_config_file_is_named_where_it_lives(key, suggested):
    """An experiment file that sets `config.patch_size` (the data section's key at the top level) was told: did you
    mean "batch_size"?, the one key it must not set to a patch size; `config.lr` got no suggestion."""
    config = _load("demo")
    *parents, leaf = key.split(".")
    (config[parents[0]] if parents else config)[leaf] = 32
    with pytest.raises(ValueError, match=re.escape(f'nothing reads: {key} (did you mean "{suggested}"?)')):
        TrainConfig.from_config(config)


@pytest.mark.parametrize("given,expected", [
    ("['/a', '/b']", "/a,/b"),  # --config.data.hr_dirs="['/a', '/b']": Python's list syntax
    ("[/a,/b]", "/a,/b"),  # the same typed without outer quotes: the shell took the inner ones
    ('("/a", "/b",)', "/a,/b"),
    ("['/a']", "/a"),
    ("/a,/b", "/a,/b"),  # the documented form, and text that is no list, stay as they are
    ("/data/x[1]", "/data/x[1]"),
])
def test_list_keys_take_python_list_syntax(given, expected):
    """`--config.data.hr_dirs=['/a','/b']` (as people type list-valued ml_collections fields) reached the pipeline as
    the folders "['/a'" and "'/b']" ("no such folder"); data.val_set=['Set5','Set14'] as the sets "['Set5'" and
    "'Set14']", which the dry run passed; optim.milestones=[100,200] was refused as not integers."""
    config = _load("demo")
    config.lock()
    config.data.update(source="folder", hr_dirs=given, lr_dirs=given)
    config.optim.update(schedule="step", milestones="[100, 200]")
    config.data.update(val_source="benchmark", val_set="['Set5', \"Set14\"]")
    cfg = TrainConfig.from_config(config)
    assert cfg.data.hr_dirs == cfg.data.lr_dirs == tuple(expected.split(","))
    assert cfg.optim.milestone_steps == (100, 200) and cfg.data.val_sets == ("Set5", "Set14")
    assert config.data.hr_dirs == given  # from_config leaves the caller's config as it was
    from rnan_jax.configs import list_text, normalize_lists

    assert list_text(given) == expected
    normalize_lists(config)  # what the CLI does, so that the dry run and config.json show the list it reads
    assert (config.data.hr_dirs, config.data.val_set, config.optim.milestones) == (expected, "Set5,Set14", "100,200")


def test_none_in_an_experiment_file_is_one_line_or_the_unset_text():
    """ml_collections lets an experiment file set any key to None: `config.seed = None` (a random seed?) failed in a
    TypeError traceback ("'<=' not supported between instances of 'int' and 'NoneType'"), and `data.augment = None`
    trained without augmentation (bool(None)). A text key whose unset value is "" takes None as that."""
    config = _load("demo")
    config.seed = None
    config.data.augment = None
    with pytest.raises(ValueError, match=re.escape("the config sets data.augment (bool, default True), seed (int, "
                                                   "default 0) to None: give each a value of its type")):
        TrainConfig.from_config(config)
    config = _load("demo")
    config.data.augment = None
    with pytest.raises(ValueError, match=re.escape("data.augment (bool, default True) to None")):
        TrainConfig.from_config(config)
    config = _load("demo")
    config.update(init_from=None)
    config.data.update(cache_dir=None, tfds_data_dir=None)
    cfg = TrainConfig.from_config(config)
    assert cfg.init_from == "" and cfg.data.cache_dir == TrainConfig.from_config(_load("demo")).data.cache_dir
    assert cfg.data.tfds_data_dir is None and config.init_from is None  # the caller's config as it was


def test_none_given_as_text_on_the_command_line_is_unset():
    """`--config.init_from=None` (as people unset a key on the command line) reached the config as the text 'None':
    the run looked for the checkpoint ./None ("init_from: .../None: no such file or folder"), data.cache_dir=None
    wrote the data cache into a folder ./None, data.tfds_data_dir=None was refused as set, and optim.milestones=None
    as not integers. A text key whose unset value is "" takes it as unset, as it takes None in a config file."""
    config = _load("demo")
    config.lock()
    config.update(init_from="None")
    config.data.update(cache_dir="None", tfds_data_dir=" None", val_dir="None")
    config.optim.update(schedule="step", milestones="None")
    cfg = TrainConfig.from_config(config)
    assert cfg.init_from == "" and cfg.optim.milestone_steps == () and cfg.data.tfds_data_dir is None
    assert cfg.data.cache_dir == TrainConfig.from_config(_load("demo")).data.cache_dir
    assert os.path.basename(cfg.data.cache_dir) != "None"
    assert config.init_from == "None"  # from_config leaves the caller's config as it was
    from rnan_jax.configs import normalize_unset

    normalize_unset(config)  # what the CLI does, so that the dry run and config.json show the unset key
    assert (config.init_from, config.data.cache_dir, config.optim.milestones) == ("", "", "")
    config.data.update(source="folder", hr_dirs="/data/None", tfds_split="None")  # only the whole text, "" keys
    normalize_unset(config)
    assert (config.data.hr_dirs, config.data.tfds_split) == ("/data/None", "None")


@pytest.mark.parametrize("name", ["x2", "x3", "x4"])
def test_paper_recipe_keeps_the_rest_of_section_3_1_and_halves_the_rate_every_200k_steps(name):
    """What test_paper_recipe leaves open of section 3.1 ("augment ... rotating 90, 180, 270 and horizontally
    flipping", L_1, Adam(0.9, 0.999), 0.0001 halved every 200 epochs = 200k steps of 1M, DESIGN.md): the loss, the
    augmentation and nothing the paper does not do (no warmup, EMA, clipping or spike skipping), the optimizer's run
    length, and the rate the schedule gives at the steps around each halving."""
    from rnan_jax import step

    cfg = TrainConfig.from_config(_load(name))
    o, d = cfg.optim, cfg.data
    assert (o.loss, d.augment, o.warmup_steps, o.ema_decay, o.grad_clip, o.skip_threshold, o.milestones) == (
        "l1", True, 0, 0.0, 0.0, 0.0, "")
    assert o.eps == 1e-8  # the paper names none: PyTorch's and optax's Adam default, which EDSR/RCAN train with
    assert o.total_steps == cfg.total_steps == 1_000_000 and cfg.model.dtype == "float32"
    rate = step.learning_rate(o)
    got = [float(rate(s)) for s in (0, 199_999, 200_000, 399_999, 400_000, 600_000, 800_000, 999_999)]
    assert got == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 1.25e-5, 6.25e-6, 6.25e-6], rel=1e-6)


def test_the_optimizer_runs_as_long_as_the_config_and_its_cosine_follows_it():
    """optim's total_steps is the top-level one (the run's): the demo's cosine over 600 steps is half way at step
    300 (lr/2) and zero at 600; over OptimConfig's default 1M steps it stayed at the full rate all run."""
    from rnan_jax import step

    cfg = TrainConfig.from_config(_load("demo"))
    assert cfg.optim.total_steps == cfg.total_steps == 600
    rate = step.learning_rate(cfg.optim)
    assert [float(rate(s)) for s in (0, 300, 600)] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-9)
    config = _load("demo")
    config.total_steps = 1200
    assert float(step.learning_rate(TrainConfig.from_config(config).optim)(600)) == pytest.approx(5e-4, rel=1e-6)


def test_demo_small291_and_classic291_are_the_recipes_their_documents_give():
    """demo: DESIGN.md's "small model (batch 8 of 24x24, Adam 1e-3 with cosine decay over 600 steps)", x2, C 32,
    2 x 3. small291: the training config recorded in zoo:small_x2 (the run that made it). classic291: the x2 paper
    recipe with the folder source."""
    from rnan_jax import zoo

    demo = TrainConfig.from_config(_load("demo"))
    assert (demo.batch_size, demo.data.patch_size, demo.optim.lr, demo.optim.schedule, demo.total_steps) == (
        8, 24, 1e-3, "cosine", 600)
    assert (demo.model.scale, demo.model.features, demo.model.num_groups, demo.model.num_blocks) == (2, 32, 2, 3)
    small = _load("small291")
    recorded = zoo.meta("small_x2")["config.json"]
    for section in ("model", "optim"):
        given = {k: v for k, v in small[section].items() if k in recorded[section]}
        assert given == {k: tuple(v) if isinstance(v, list) else v for k, v in recorded[section].items()}, section
    for key in ("batch_size", "total_steps", "seed"):
        assert small[key] == recorded[key], key
    for key in ("patch_size", "augment", "val_set", "val_max_images"):
        assert small.data[key] == recorded["data"][key], key
    assert [os.path.basename(d) for d in small.data.hr_dirs.split(",")] == ["T91", "BSD200"]
    c291, x2 = _load("classic291").to_dict(), _load("x2").to_dict()
    for config in (c291, x2):
        config["data"] = {k: v for k, v in config["data"].items() if k not in ("source", "hr_dirs", "num_workers")}
    assert c291 == x2


@pytest.mark.parametrize("key,value,message", [
    ("optim.b2", 1.0, r"optim.b1, b2 and ema_decay must be in \[0, 1\); got 0.9, 1.0 and 0.0"),
    ("optim.eps", -1e-8, "optim.lr, grad_clip, skip_threshold and eps must be >= 0"),
    ("optim.decay_factor", 0.0,
     "optim.schedule 'step' needs a positive decay_every and decay_factor; got 200000 and 0.0"),
    ("optim.decay_factor", -0.5, "optim.schedule 'step' needs a positive decay_every and decay_factor"),
    ("execution.batch_chunks", -1, "execution.batch_chunks must be 0 .the default. or positive, got -1"),
])
def test_optimizer_and_execution_values_that_cannot_work_are_refused(key, value, message):
    """b2 = 1 (Adam's second moment never moves), a negative eps, a decay factor of 0 (the rate 0 after the first
    halving) or below, a negative number of batch parts: each refused in one line before the run."""
    config = _load("x4")
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_config(config)


def test_milestones_replace_decay_every_and_the_execution_knobs_reach_the_run():
    """With optim.milestones the step schedule decays there, so decay_every 0 is no "schedule that never decays";
    execution.depthwise and remat reach the model as the implementation and policy named."""
    from rnan_jax import step

    config = _load("x4")
    config.optim.update(milestones="100,300", decay_every=0)
    config.execution.update(depthwise="shifted", remat="block")
    cfg = TrainConfig.from_config(config)
    assert [float(step.learning_rate(cfg.optim)(s)) for s in (99, 100, 299, 300)] == pytest.approx(
        [1e-4, 5e-5, 5e-5, 2.5e-5], rel=1e-6)
    assert (cfg.execution.depthwise_impl, cfg.execution.remat_policy) == ("shifted", "block")


@pytest.mark.parametrize("key", ["lr", "eps", "decay_factor", "grad_clip", "skip_threshold", "charbonnier_eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_or_infinite_optimizer_value_is_refused(key, value):
    """`nan < 0` is False: --config.optim.lr=nan (an unset shell variable's float('nan')) passed every check and the
    run trained on NaN until its first log stopped it; inf likewise."""
    config = _load("x4")
    config.optim[key] = value
    with pytest.raises(ValueError, match=f"optim values must be finite numbers; got {key}={value}$"):
        TrainConfig.from_config(config)


@pytest.mark.parametrize("value", [0.5, 1.0])
def test_a_skip_threshold_at_or_below_one_is_refused(value):
    """skip_threshold 0.5 (0 < t <= 1 was accepted) skips every step whose loss is above half the running loss: most
    of them, and the running loss, updated by kept steps only, sinks until every step is skipped."""
    config = _load("x4")
    config.optim.skip_threshold = value
    with pytest.raises(ValueError, match=rf"optim.skip_threshold .* 0 \(off\) or above 1 .*; got {value}$"):
        TrainConfig.from_config(config)
    config.optim.skip_threshold = 1.5
    assert TrainConfig.from_config(config).optim.skip_threshold == 1.5
