"""The training config: the frozen dataclasses that define every key, its default and its checks, and the
ConfigDict made from them that experiment files start from.

Experiment files (`experiments/*.py`) start from `default_config()` (or `paper_config(scale)`) and change
what they need; the trainer converts once, at the edge, with `TrainConfig.from_config`, so a key that an
experiment mistypes fails at `config_flags` (locked) and a value that does not fit fails here with one
clear line. Each section has one home: model `RNANConfig`, optim `step.OptimConfig`, data
`data.DataConfig`, execution `ExecutionConfig`, the top-level keys `TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import ml_collections

from rnan_jax import data
from rnan_jax.convs import DEPTHWISE_IMPLS
from rnan_jax.model import REMAT_POLICIES, RNANConfig
from rnan_jax.step import OptimConfig

SECTIONS = ("model", "optim", "data", "execution")
_TRISTATE = {"auto": None, "true": True, "false": False}  # a knob's text: None is the backend's default
# The string keys that hold comma-separated lists ("/a,/b", "Set5,Set14", "200000,400000").
LIST_KEYS = ("data.hr_dirs", "data.lr_dirs", "data.val_set", "optim.milestones")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the train step runs: the same function whatever the values, with another speed and memory."""

    scan_unroll: int = 0  # 0: the default (CPU: full up to 24 blocks, else rolled; GPU: 2; TPU: rolled); -1: full; n
    block_unroll: int = 0  # the RNA blocks' scan inside each GCRG alone: 0 as scan_unroll; -1: full; n
    depthwise: str = "auto"  # "auto" (backend default), "grouped" (feature_group_count) or "shifted"
    # 0: the default (a one-device CPU run: 2, or 4 without the native kernels, step.default_batch_chunks; else 1);
    # n: gradients of n parts of the batch, averaged
    batch_chunks: int = 0
    # "true": parameters cast to model.dtype once per step (model.cast_params) rather than per block inside the
    # scan; fewer kernels, bfloat16-rounded weight gradients; no effect in float32. "auto": true on GPUs (measured
    # faster there), false elsewhere.
    cast_params_once: str = "auto"
    # What the backward recomputes of each RNA block: "auto" (backend default), "none", "block" (all but its
    # input) or "convs" (all but its input and its 3x3 convs' outputs); fewer stacked activations, more compute.
    remat: str = "auto"
    # XLA:GPU's fusion autotuner when the train step compiles (it times Triton against XLA's emitter for each
    # reduction and transpose fusion: most of a cold compile): "auto" (on: XLA's default), "true" or "false".
    # No effect on other backends.
    fusion_autotuner: str = "auto"

    def __post_init__(self):
        if self.depthwise not in ("auto", *DEPTHWISE_IMPLS):
            raise ValueError(f"execution.depthwise must be auto, grouped or shifted, got {self.depthwise!r}")
        for name in ("cast_params_once", "fusion_autotuner"):
            if str(getattr(self, name)).lower() not in _TRISTATE:
                raise ValueError(f"execution.{name} must be auto, true or false, got {getattr(self, name)!r}")
        if self.remat not in ("auto", *REMAT_POLICIES):
            raise ValueError(f"execution.remat must be auto or one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.batch_chunks < 0:
            raise ValueError(f"execution.batch_chunks must be 0 (the default) or positive, got {self.batch_chunks}")

    @property
    def unroll(self) -> int | bool | None | tuple[int | bool | None, int | bool]:
        """scan_unroll as the model takes it: None (the backend's default), True (full) or a factor; with a
        block_unroll, the pair (GCRGs' scan, RNA blocks' scan)."""
        def value(n):
            return None if n == 0 else (True if n < 0 else n)
        return value(self.scan_unroll) if self.block_unroll == 0 else (value(self.scan_unroll),
                                                                        value(self.block_unroll))

    @property
    def depthwise_impl(self) -> str | None:
        """depthwise as the model takes it: None (the backend's default) or an implementation's name."""
        return None if self.depthwise == "auto" else self.depthwise

    @property
    def cast_once(self) -> bool | None:
        """cast_params_once as the step takes it: None (the backend's default), True or False."""
        return _TRISTATE[str(self.cast_params_once).lower()]

    @property
    def autotune_fusions(self) -> bool | None:
        """fusion_autotuner as the step takes it: None (the backend's default), True or False."""
        return _TRISTATE[str(self.fusion_autotuner).lower()]

    @property
    def remat_policy(self) -> str | None:
        """remat as the model takes it: None (the backend's default) or a `model.REMAT_POLICIES` name."""
        return None if self.remat == "auto" else self.remat


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run. The scalar fields are the config's top-level keys, with their defaults."""

    model: RNANConfig
    optim: OptimConfig
    data: data.DataConfig
    execution: ExecutionConfig
    seed: int = 0
    total_steps: int = 1_000_000
    batch_size: int = 16  # global: split over all devices of all hosts
    log_every: int = 100
    eval_every: int = 5000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3  # the latest few; the best by validation PSNR is kept apart (workdir/best)
    init_from: str = ""  # a checkpoint (workdir, step folder or zoo:NAME) to copy matching parameters from
    num_val_images_logged: int = 3  # LR/bicubic/SR/HR comparisons written to TensorBoard per validation

    def __post_init__(self):
        for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**63:  # what the data pipeline's SeedSequence and jax.random.key take
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        _check_optim(self.optim)

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> TrainConfig:
        check_keys(c)
        c = c.copy_and_resolve_references()
        check_nones(c)
        normalize_unset(c)
        normalize_lists(c)
        model = RNANConfig(**{**c.model.to_dict(), "rgb_mean": tuple(c.model.rgb_mean)})
        top = {f.name: c[f.name] for f in dataclasses.fields(cls) if f.name not in SECTIONS}
        return cls(model=model, optim=OptimConfig(**c.optim.to_dict(), total_steps=c.total_steps),
                   data=data.DataConfig.from_config(c.data, scale=model.scale),
                   execution=ExecutionConfig(**c.execution.to_dict()), **top)


def list_text(value: str) -> str:
    """A list key's value (`LIST_KEYS`) as the config reads it, comma-separated: Python's list syntax, which
    ml_collections keeps as literal text for a string key (`--config.data.hr_dirs=['/a','/b']`, or `[/a,/b]` once
    the shell has taken the quotes), is the same list, "/a,/b"; it was split at its commas into the folders
    "['/a'" and "'/b']" ("no such folder"), the sets "['Set5'" and "'Set14']". Any other text is returned as is."""
    text = value.strip()
    if len(text) < 2 or (text[0], text[-1]) not in (("[", "]"), ("(", ")")):
        return value
    items = [item.strip() for item in text[1:-1].split(",")]
    items = [item[1:-1].strip() if len(item) > 1 and item[0] == item[-1] and item[0] in "'\"" else item
             for item in items]
    return ",".join(item for item in items if item)


def normalize_lists(c: ml_collections.ConfigDict) -> None:
    """Rewrites, in place, each `LIST_KEYS` value given in Python's list syntax as the comma-separated text it
    means (`list_text`), so that the dry run, config.json and the run all read "/a,/b"."""
    for key in LIST_KEYS:
        section, name = key.split(".")
        if isinstance(c.get(section), ml_collections.ConfigDict) and isinstance(c[section].get(name), str):
            c[section][name] = list_text(c[section][name])


def normalize_unset(c: ml_collections.ConfigDict) -> None:
    """Sets, in place, each text key whose default is "" (unset: init_from, data.cache_dir, data.tfds_data_dir, ...)
    given as the text "None" to "", the None that `check_nones` reads as unset in a config file: on the command
    line (`--config.init_from=None`) ml_collections keeps it as the text 'None', and the run looked for the
    checkpoint ./None, wrote its data cache into a folder ./None, or refused data.tfds_data_dir as "set"."""
    for key, default in flatten_config(default_config()):
        section, _, name = key.rpartition(".")
        holder = c.get(section) if section else c
        if default == "" and isinstance(holder, ml_collections.ConfigDict) and isinstance(holder.get(name), str) \
                and holder[name].strip() == "None":
            holder[name] = ""


def flatten_config(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(KEY, value) for every leaf, KEY as --config.KEY= names it ("optim.lr")."""
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += flatten_config(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def check_keys(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) when an experiment file's config lacks keys of `default_config()` or has keys
    it does not know (a typo in the file itself, which the locked config cannot catch: it was made unlocked)."""
    if not isinstance(c, ml_collections.ConfigDict):
        raise ValueError(f"get_config() must return an ml_collections.ConfigDict, got {type(c).__name__}")
    known, given = [k for k, _ in flatten_config(default_config())], [k for k, _ in flatten_config(c)]
    sections = [s for s in SECTIONS if not isinstance(c.get(s), ml_collections.ConfigDict)]
    if sections:  # not an RNAN training config at all: the sections first, not a list of every key
        raise ValueError(f"the config has no {', '.join(sections)} section{'s' * (len(sections) > 1)}: start it from "
                         "rnan_jax.configs.default_config() (or paper_config(scale)), as experiments/*.py do")
    missing = [k for k in known if k not in given]
    unknown = [k for k in given if k not in known]
    if unknown:
        # a key of that name in another section first (patch_size: data.patch_size, which the spelling match took
        # for batch_size), then the nearest spelling
        leaf = unknown[0].split(".")[-1]
        near = [k for k in known if k.split(".")[-1] == leaf] or difflib.get_close_matches(unknown[0], known, n=1)
        what = "keys" if len(unknown) > 1 else "a key"
        raise ValueError(f"the config has {what} that nothing reads: {', '.join(unknown)}"
                         + (f' (did you mean "{near[0]}"?)' if near else "")
                         + "; python -m rnan_jax.train --config FILE --dry_run lists every key")
    if missing:
        raise ValueError(f"the config lacks {', '.join(missing)}: start it from rnan_jax.configs.default_config() "
                         "(or paper_config(scale)), as experiments/*.py do")


def check_nones(c: ml_collections.ConfigDict) -> None:
    """Sets, in place, each text key that an experiment file set to None (ml_collections takes None for any key) to
    "", the unset value that None means there (init_from, data.cache_dir, ...); raises ValueError (one line) for
    None in any other key. It failed in a comparison's TypeError traceback (seed, lr, ...), or was read as a value:
    data.augment = None turned the augmentation off."""
    wrong = []
    for key, default in flatten_config(default_config()):
        section, _, name = key.rpartition(".")
        holder = c[section] if section else c
        if holder.get(name, default) is not None or default is None:
            continue
        if default == "":
            holder[name] = ""
        else:
            wrong.append(f"{key} ({type(default).__name__}, default {default!r})")
    if wrong:
        raise ValueError(f"the config sets {', '.join(wrong)} to None: give {'each' if len(wrong) > 1 else 'it'} a "
                         "value of its type")


def _check_optim(o: OptimConfig) -> None:
    """Raises ValueError (one line) for optimizer values that would train silently wrong: a negative rate, a
    warmup that never ends inside the run, a step schedule that never decays, an EMA that never moves, a NaN or
    infinite value (`nan < 0` is False: --config.optim.lr=nan trained on NaN)."""
    if bad := [f"{f.name}={getattr(o, f.name)}" for f in dataclasses.fields(o)
               if isinstance(getattr(o, f.name), float) and not math.isfinite(getattr(o, f.name))]:
        raise ValueError(f"optim values must be finite numbers; got {', '.join(bad)}")
    if o.lr < 0 or o.grad_clip < 0 or o.skip_threshold < 0 or o.eps < 0:
        raise ValueError(f"optim.lr, grad_clip, skip_threshold and eps must be >= 0; got {o.lr}, {o.grad_clip}, "
                         f"{o.skip_threshold} and {o.eps}")
    if 0 < o.skip_threshold <= 1:  # a loss at or under the running mean half the time: most steps skipped, and
        raise ValueError(  # the mean, updated by kept steps only, falls to the lowest: training stops, unsaid
            f"optim.skip_threshold skips a step whose loss exceeds it times the running loss: 0 (off) or above 1 "
            f"(EDSR: a spike many times the mean); got {o.skip_threshold}")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1 and 0 <= o.ema_decay < 1):
        raise ValueError(f"optim.b1, b2 and ema_decay must be in [0, 1); got {o.b1}, {o.b2} and {o.ema_decay}")
    if not 0 <= o.warmup_steps < o.total_steps:
        raise ValueError(f"optim.warmup_steps must be in [0, total_steps {o.total_steps}), got {o.warmup_steps} (a "
                         "warmup as long as the run never reaches optim.lr)")
    if o.schedule == "step" and ((o.decay_every <= 0 and not o.milestone_steps) or o.decay_factor <= 0):
        raise ValueError(f"optim.schedule 'step' needs a positive decay_every and decay_factor; got "
                         f"{o.decay_every} and {o.decay_factor}")


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default, from the dataclasses above (optim's total_steps is the top-level one)."""
    c = ml_collections.ConfigDict(
        {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS})
    c.model = ml_collections.ConfigDict(dataclasses.asdict(RNANConfig()))
    c.execution = ml_collections.ConfigDict(dataclasses.asdict(ExecutionConfig()))
    c.optim = ml_collections.ConfigDict(
        {k: v for k, v in dataclasses.asdict(OptimConfig()).items() if k != "total_steps"})
    c.data = data.default_config()
    return c


def paper_config(scale: int) -> ml_collections.ConfigDict:
    """The paper's recipe (section 3.1 as ../shared/DESIGN.md reads it) at `scale`, on DIV2K through TFDS:
    batch 16 of 48x48 LR patches, L1, Adam(0.9, 0.999), lr 1e-4 halved every 200k steps, 1M steps; Set5
    validation. experiments/x2.py, x3.py and x4.py are this at their scale."""
    config = default_config()
    config.model.scale = scale
    config.data.source = "tfds"
    config.data.patch_size = 48
    config.data.num_workers = 8
    config.data.val_source = "benchmark"
    config.data.val_set = "Set5"
    return config
