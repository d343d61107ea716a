"""Writes a trained workdir's parameters into the package's zoo as `rnan_jax/zoo/NAME.msgpack`.

    python tools/make_zoo.py --workdir runs/small291_x2 --name small_x2 [--which auto|latest|best|ema] [--out DIR]

The file holds the float32 parameters, the RNANConfig (compute dtype float32 whatever the run's: users pass a
config with dtype="bfloat16" for the faster) and a record of the run (its resolved config.json,
step, git revision; and, from train.log, the start of the run that saved that step: its command, its rnan_jax
revision and its config changes since config.json, which the start that began the run wrote), so
`rnan_jax.load("zoo:NAME")` needs nothing else; its SHA-256 goes into
rnan_jax/zoo/sha256.json, which every load of zoo:NAME checks (commit the two together). Score it afterwards with
`python -m rnan_jax.evaluate --checkpoint zoo:NAME` and copy those numbers into MODEL_ZOO.md. The line it prints
names the parameters taken as tools/export.py's does: `wrote FILE (SIZE) of --workdir RUN --which ema (step 8): x2,
...`. A zoo file given as --workdir is copied with its record of its run (its which and step).

It writes into the rnan_jax/zoo of the checkout this tool is in (where rnan_jax was installed with `pip install .`,
not `-e`, the zoo of the imported package was written, in site-packages, and the checkout was left without the
file to commit), or with `--out` into that folder (a zoo file loads by its path from anywhere).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import sys

from absl import flags
from etils import epath

from rnan_jax import checkpoint, cli, env, paths, zoo
from rnan_jax.api import count_params

_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.", required=True)
_NAME = flags.DEFINE_string("name", None, "The zoo name, e.g. small_x2.", required=True)
flags.register_validator("name", lambda name: name is None or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)),
                         "must be a plain file name such as small_x2 (letters, digits, _ . -), no folder")
_WHICH = flags.DEFINE_enum("which", "auto", list(checkpoint.CLI_WHICH),
                           checkpoint.WHICH_HELP.replace("--checkpoint", "the workdir"))
_OUT = flags.DEFINE_string("out", None, "The folder to write NAME.msgpack into, its SHA-256 recorded in the "
                           "sha256.json there (default: rnan_jax/zoo of the checkout this tool is in).")


def _default_out() -> str:
    """rnan_jax/zoo beside this tool's folder (the checkout's), else the imported package's zoo folder."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rnan_jax", "zoo")
    return checkout if os.path.isfile(os.path.join(checkout, "__init__.py")) else os.path.dirname(zoo.__file__)


_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  (.*)")  # a train.log line: its UTC time, its text
_CHANGED = "config changed since the run that made "  # a resumed start's line: "... (its config.json): CHANGES"


def _saved_at(step_dir: str) -> float | None:
    """When orbax committed the checkpoint at `step_dir` (seconds since 1970), or None where it does not say."""
    try:
        record = json.loads(paths.read_text(os.path.join(step_dir, "_CHECKPOINT_METADATA")))
        return int(record.get("commit_timestamp_nsecs") or record["init_timestamp_nsecs"]) / 1e9
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _starts(log: str) -> list[dict]:
    """The starts that train.log's text `log` records, in order: {"at": seconds since 1970, "started": the time
    and the line's text (the command, its rnan_jax revision, versions, host), "config_changes": the keys that a
    resumed start changed from config.json, or None}."""
    starts: list[dict] = []
    for line in log.splitlines():
        if (match := _STAMP.fullmatch(line)) is None:
            continue
        stamp, text = match.groups()
        if text.startswith("started: "):
            at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
            starts.append({"at": at.timestamp(), "started": f"{stamp} UTC: {text[len('started: '):]}",
                           "config_changes": None})
        elif text.startswith(_CHANGED) and starts and "(its config.json): " in text:
            starts[-1]["config_changes"] = text.split("(its config.json): ", 1)[1]
    return starts


def _start_record(workdir: str, step_dir: str, step: int) -> dict:
    """Which start of the run saved checkpoint `step` (at `step_dir`), for the record: config.json and
    git_revision.txt are the workdir's, written by the start that began the run; a resumed start (with other
    settings, or after an upgrade) writes neither, and train.log has each start's command, revision and config
    changes. {"record": a line that says which start they describe and which saved the step, "start": that
    start's train.log account (where train.log says)}."""
    first = "config.json and git_revision.txt are the workdir's, written by the start that began the run"
    try:  # a byte that is not UTF-8 (RunLog writes a Latin-1 file name's as it is): read as text, a
        # UnicodeDecodeError said that train.log "is missing or holds no start"
        starts = _starts(epath.Path(workdir, "train.log").read_bytes().decode("utf-8", "replace"))
    except OSError:
        starts = []
    saved_at = _saved_at(step_dir)
    before = [s for s in starts if saved_at is not None and s["at"] <= saved_at]  # the last of them saved it
    if not before:  # no train.log (not copied with the run), or a step copied from another run
        why = "holds no start before the step was saved" if starts else "is missing or holds no start"
        return {"record": f"{first}; which start saved step {step} is not known (train.log {why})"}
    return {"record": f"{first}; step {step} was saved by start {len(before)} of the {len(starts)} in train.log "
                      "(\"start\": its command, rnan_jax revision and config changes since config.json)",
            "start": {"started": before[-1]["started"], "config_changes": before[-1]["config_changes"] or "none"}}


def main(argv):
    del argv
    if not _WORKDIR.value.strip():  # `--workdir "$RUN"` with RUN unset read the current folder (load refuses "")
        sys.exit("make_zoo: --workdir is empty (an unset variable?): name the training workdir")
    if _OUT.value is not None and not _OUT.value.strip():  # `--out "$DIR"` with DIR unset wrote into the checkout
        sys.exit("make_zoo: --out is empty (an unset variable?): name the folder to write into, or leave --out out "
                 "for the checkout's rnan_jax/zoo")
    out_dir = os.path.expanduser(_OUT.value) if _OUT.value else _default_out()
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # was "[Errno 17] File exists: 'FILE'", after loading
        sys.exit(f"make_zoo: --out {_OUT.value}: is a file, not a folder (--out names the folder to write "
                 f"{_NAME.value}.msgpack into)")
    env.prepare_process()
    try:
        which = checkpoint.resolve_which(_WORKDIR.value, _WHICH.value)  # auto: what validation scored
        directory, step = (None, None) if zoo.is_zoo(_WORKDIR.value) else checkpoint._locate(_WORKDIR.value, which)
        # that step's folder, so that the step recorded is the one read (a run saving meanwhile moves the newest)
        where = _WORKDIR.value if directory is None else os.path.join(directory, str(step))
        params, config, named = checkpoint.load_named(where, which=which)
        # a zoo file's own record of its run (its which and step, not the "latest" of its one set of parameters)
        meta = zoo.read(zoo.path_of(where))[2] if directory is None else {}
    except (checkpoint.CheckpointError, zoo.ZooError) as e:
        sys.exit(f"make_zoo: {e}")
    meta = {**meta, "which": meta.get("which", which), "parameters": count_params(params)}
    if directory is not None:  # the workdir's checkpoints/ or best/ (a step's folder given: the one above it)
        meta["step"] = step
        for name in ("config.json", "git_revision.txt"):
            path = os.path.join(os.path.dirname(directory), name)
            if paths.isfile(path):
                text = paths.read_text(path)
                try:
                    meta[name] = json.loads(text) if name.endswith(".json") else text.strip()
                except ValueError as e:  # cut short (a full disk as the run began): a traceback, no zoo file
                    print(f"make_zoo: note: {path} is not valid JSON ({e}); the file records the run without it",
                          file=sys.stderr)
        meta.update(_start_record(os.path.dirname(directory), os.path.join(directory, str(step)), step))
    out = os.path.join(out_dir, f"{_NAME.value}.msgpack")
    try:
        size = zoo.write(out, params, config, meta)
    except OSError as e:  # e.g. an installed package's read-only folder
        sys.exit(f"make_zoo: cannot write {out}: {e}")
    try:
        source = zoo.record_sha256(_NAME.value, out)
    except (OSError, ValueError) as e:
        sys.exit(f"make_zoo: wrote {out} but could not record its SHA-256 beside it in sha256.json ({e}): add "
                 f"\"{_NAME.value}\": \"<sha256sum of the file>\" there by hand (a stale one refuses the file)")
    of = checkpoint.named_source(_WORKDIR.value, which, flag="--workdir")  # as export's line
    print(f"wrote {out} ({size / 2**20:.2f} MiB) of {of} ({named.text}): "
          f"x{config.scale}, {meta['parameters']:,} parameters; its SHA-256 recorded in {source}")


if __name__ == "__main__":
    cli.run(main)
