"""The run's folder: what a run writes there first (config.json, git_revision.txt), what a resumed run
compares with it, and the one-line refusals of a workdir that cannot be one (a file in the way, no permission).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from rnan_jax import checkpoint, configs, paths, summary


def write_info(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    paths.makedirs(workdir)
    paths.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    paths.write_text(os.path.join(workdir, "git_revision.txt"), summary.git_revision(summary.package_dir()) + "\n")


def config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """`KEY OLD -> NEW` for every key whose value differs from the workdir's config.json (the config of the run
    that started it), e.g. a resumed run's new total_steps, which also stretches a cosine schedule. A key the
    package gained since (absent there) counts only when its value is not its default: the old run had the
    default's behaviour."""
    try:
        saved = json.loads(paths.read_text(os.path.join(workdir, "config.json")))
    except (OSError, ValueError):
        return []

    def flat(values: dict) -> dict[str, Any]:
        return dict(configs.flatten_config(ml_collections.ConfigDict(values)))

    old, new = flat(saved), flat(json.loads(config.to_json_best_effort()))
    defaults = flat(json.loads(configs.default_config().to_json_best_effort()))
    old.update({k: v for k, v in defaults.items() if k not in old and new.get(k) == v})
    return [f"{k} {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def problem(workdir: str) -> str | None:
    """One line when a file is where the workdir, or one of the folders the run writes in it, goes; else None."""
    if paths.exists(workdir) and not paths.isdir(workdir):
        return f"--workdir {workdir}: a file is in the way (the workdir is a folder)"
    for name in (checkpoint.CHECKPOINTS, checkpoint.BEST, "tensorboard", checkpoint.CHECKPOINTS + "_damaged"):
        path = os.path.join(workdir, name)
        if paths.exists(path) and not paths.isdir(path):
            return f"--workdir {workdir}: a file is in the way at {path} (the run writes a folder there)"
    return None


def prepare(workdir: str) -> None:
    """Refuses a file where the workdir or one of the folders the run writes goes (`problem`), and
    creates the workdir, before anything is read or trained: orbax otherwise failed at the first save, from its
    save thread, with a traceback."""
    if (line := problem(workdir)) is not None:
        raise ValueError(line)
    if jax.process_index() == 0:
        try:
            paths.makedirs(workdir)
        except OSError as e:
            raise ValueError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None
