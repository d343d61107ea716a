"""What the command-line entry points share: absl's `app.run` with a misuse (`app.UsageError`) told in one line
instead of after the module's whole help text, and, for those that take an experiment config, a bad --config
(a mistyped key in an override, a file that cannot be read) turned into one line instead of a traceback.
Defines no flags."""
from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging

from rnan_jax import paths

# The flags that `define_local_output` defines are their caller's (evaluate's, upscale's --output): without this
# absl counted them as this module's, and `--help` of the command, which lists its own module's, left them out.
flags.disclaim_key_flags()


def config_error_line(error: Exception, argv: list[str]) -> str:
    """One line for an override of a key that the config does not have (ml_collections raises it while the
    flags are parsed, as a KeyError/AttributeError whose text carries its "Did you mean" suggestion), naming that
    override: the one with the key in its path that is not a key itself (`--config.model.scale=3
    --config.model.scal=4` is about the second). A key of that name in another section of the training config is
    suggested instead of ml_collections' spelling match: `--config.lr` is optim.lr, and `--config.patch_size`
    data.patch_size, not "batch_size"."""
    text = " ".join(str(error.args[0] if error.args else error).replace("\\n", "\n").split())
    text = text.strip("\"'").replace("\\'", "'")
    key = re.match(r"'?([^'\s]+)'?", text)
    overrides = [a.split("=")[0].removeprefix("--config.") for a in argv if a.startswith("--config.")]
    known = _training_keys() if key and overrides else []
    given = ([o for o in overrides if key.group(1) in o.split(".") and not _is_key(o, known)]
             or [o for o in overrides if key.group(1) in o]) if key else []
    suggestion = text[key.end():].strip() if key else ""
    where = f"--config.{given[0]}" if given else "a --config override"
    if given and (elsewhere := [k for k in known if k.split(".")[-1] == given[0].split(".")[-1] and k != given[0]]):
        suggestion = f"did you mean {' or '.join(f'--config.{k}' for k in elsewhere)}?"
    return (f"error: {where}: the config has no key {key.group(1) if key else text!r}"
            + (f"; {suggestion[0].lower()}{suggestion[1:]}" if suggestion else "")
            + " (python -m rnan_jax.train --config FILE --dry_run lists every key)")


def _training_keys() -> list[str]:
    """Every key of the training config (`configs.default_config()`, whose keys every --config file has)."""
    from rnan_jax.configs import default_config, flatten_config  # here: configs imports jax, which --help need not

    return [k for k, _ in flatten_config(default_config())]


def _is_key(path: str, known: list[str]) -> bool:
    return any(k == path or k.startswith(path + ".") for k in known)


def value_path_error_line(error: BaseException, argv: list[str]) -> str | None:
    """One line for an override whose path goes on past a key that holds a value (`--config.optim.lr.value=1`,
    `--config.model.rgb_mean[0]=0.5`, `--config.model.rgb_mean.0=0.5`), when ml_collections' error (raised while it
    resolved an override's path) is about one; else None. Its KeyError was told as "the config has no key
    'Attribute'", and its IndexError, TypeError and ValueError as a failure of the --config file's own code."""
    if not any(os.path.basename(f.filename) == "config_path.py" for f in traceback.extract_tb(error.__traceback__)):
        return None
    known = _training_keys()
    for override in (a.split("=")[0].removeprefix("--config.") for a in argv if a.startswith("--config.")):
        leaf = next((k for k in known if override.startswith(k) and override[len(k):len(k) + 1] in (".", "[")), None)
        if leaf is not None:
            return (f"error: --config.{override}: {leaf} is a value, not a section or a list to index: set it whole "
                    f"(--config.{leaf}=VALUE; python -m rnan_jax.train --config FILE --dry_run lists every key)")
    return None


def config_file_error_line(error: OSError, path: str | None = None) -> str:
    """One line for a --config file that could not be read (a wrong path, a folder): ml_collections' error lists
    the attempts over several lines, the last of which says why. A relative `path` (the --config value) that does
    not exist is named with the folder it was looked for in, the current one: run from another folder,
    "No such file or directory: 'experiments/x4.py'" did not say why."""
    reason = str(error).strip().splitlines()[-1].strip().split('earlier failure to load: ')[-1]
    if path and "[Errno 2]" in reason and not os.path.isabs(path) and not paths.is_url(path):
        reason += f" (a relative path: looked for in the current folder, {os.getcwd()})"
    return f"error: --config: {reason}"


def _config_path(argv: list[str]) -> str:
    """The --config file as given on the command line (without the ":ARGS" that config_flags may take)."""
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1].split(":")[0]
    return "?"


def _config_values(argv: list[str]) -> list[str]:
    """Every --config value on the command line (FILE or FILE:ARG), in order, up to a `--`."""
    values = []
    for i, a in enumerate(argv[1:], 1):
        if a == "--":
            break
        if a in ("--config", "-config") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif a.startswith(("--config=", "-config=")):
            values.append(a.split("=", 1)[1])
    return values


def repeated_config_line(argv: list[str]) -> str | None:
    """One line when --config names two different files (or FILE:ARGs): absl kept the last one without a word
    (`--config experiments/demo.py --config experiments/x4.py` trained x4.py), whichever the user meant."""
    values = list(dict.fromkeys(_config_values(argv)))
    if len(values) < 2:
        return None
    return (f"error: --config names {len(values)} configs ({' and '.join(values)}), of which only the last would be "
            "read: give one, and change its keys with --config.KEY=VALUE")


def _config_file_lines(error: BaseException, path: str) -> list[int]:
    """The lines of the --config file `path` that `error`'s traceback passed through (none: raised elsewhere)."""
    return [f.lineno for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]


def config_code_error_line(error: BaseException, argv: list[str]) -> str:
    """One line for a --config file whose own code fails (a syntax error, an exception in get_config): the
    error and the file's line, where a traceback ran through 30 frames of absl and ml_collections."""
    path = _config_path(argv)
    if isinstance(error, SyntaxError):
        where = f"line {error.lineno}" if error.lineno else ""
        message = error.msg
    else:
        lines = _config_file_lines(error, path)
        where = f"line {lines[-1]}" if lines else ""
        message = str(error)
        if not lines and isinstance(error, TypeError) and message.startswith("get_config()"):  # FILE:ARG's ARG
            message += " (--config FILE:ARG passes ARG to get_config; FILE alone passes nothing)"
    return f"error: --config {path}" + (f", {where}" if where else "") + f": {type(error).__name__}: {message}"


def _config_code_error(error: flags.Error) -> BaseException | None:
    """The exception a --config file's code raised, when `error` is absl's wrapping of it: ml_collections re-raises
    a TypeError or ValueError of get_config (a value of the wrong type, FILE:ARG's argument missing or extra) as
    "Error whilst parsing config file:" and its whole traceback, which absl put into the flag's error text."""
    wrapper = error.__context__
    if isinstance(wrapper, (TypeError, ValueError)) and str(wrapper).startswith("Error whilst parsing config file"):
        return wrapper.__context__
    return None


def program_name() -> str:
    """The running entry point's name as its messages start ("train" for `python -m rnan_jax.train`)."""
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "rnan_jax"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a malformed value or an unknown flag told in one line, exit status 1 ("train:
    error: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc' (see --helpshort)";
    absl's `parse_flags_with_usage` prints it after "FATAL Flags parsing error:" and adds a second line).
    `--help` exits with status 0 (absl's 1 made `tool --help && ...` fail); `-h` is `--help` (absl knows only
    `-?`, and told "Unknown command line flag 'h'")."""
    argv = _h_is_help(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if (code_error := _config_code_error(e)) is not None:
            sys.exit(config_code_error_line(code_error, argv))
        text = " ".join(str(e).split())
        # absl's and ml_collections' boolean parsers raise ValueError(message, value), shown as a tuple
        text = re.sub(r"\('Non-boolean argument to boolean flag', '(.*)'\)$",
                      r"'\1' is not a boolean (true, false, 1 or 0)", text)
        required = r"flag --(\w+)=None: Flag --\w+ must have a value other than None\."
        if re.fullmatch(rf"{required}( {required})*", text):  # "--config and --workdir are required"
            names = re.findall(required, text)
            if "config" in names and _config_path(argv) != "?":  # given: a None is what its get_config returned
                sys.exit(f"error: --config {_config_path(argv)}: get_config() returned None (no return statement?)")
            names = [f"--{name}" for name in names]
            text = (f"{', '.join(names[:-1])} and {names[-1]} are required" if len(names) > 1
                    else f"{names[0]} is required")
        sys.exit(f"{program_name()}: error: {text} (see --helpshort)")
    except BrokenPipeError:  # `--help | head`: the reader took what it wanted (was a traceback, or for train
        # "error: --config: [Errno 32] Broken pipe"); stdout to /dev/null, so that the exit's flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except SystemExit as e:  # absl's --help exits with status 1 after its text: asked for, it is a success
        if e.code == 1 and any(a in ("-h", "-?") or a.startswith("--help") for a in argv[1:]):
            sys.exit(0)
        raise


def _h_is_help(argv: list[str]) -> list[str]:
    """argv with a `-h` before any `--` read as `--help`, as argparse and most tools read it (unless a command
    defines a flag h of its own, or the -h is the value of the flag before it: `--output -h`)."""
    if "h" in flags.FLAGS:
        return argv
    out = list(argv)
    for i in range(1, len(out)):
        if out[i] == "--":
            break
        prev = out[i - 1].lstrip("-")
        takes_value = (out[i - 1].startswith("-") and "=" not in prev and prev in flags.FLAGS
                       and not flags.FLAGS[prev].boolean)
        if out[i] == "-h" and not takes_value:
            out[i] = "--help"
    return out


def require_ints(name: str, minimum: int = 1) -> None:
    """Checks list flag `name` while the flags are parsed: every value an integer of at least `minimum`, else
    one line (`parse_flags`) before any work, where `int()` in the middle of a tool raised a traceback."""

    def check(values: list[str]) -> bool:
        try:
            return all(int(v) >= minimum for v in values)
        except ValueError:
            return False

    flags.register_validator(name, check, f"each value must be an integer of at least {minimum}")


def define_config_file(program: str, module: str) -> Any:
    """The --config flag of `program`'s experiment file (ml_collections' `DEFINE_config_file`, locked), defined in
    its main module `module` (`__name__`). Defining it reads the --flagfile files of sys.argv: one that cannot be
    read (a typo) was a 20-line traceback; run as a program, it is one line and exit status 1."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    except flags.Error as e:
        if module != "__main__":
            raise
        sys.exit(f"{program}: error: {' '.join(str(e).split())} (see --helpshort)")


def config_flags_parser(config_flag: Any) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run`: absl's parsing, then the config that `config_flag` (what
    `config_flags.DEFINE_config_file` returned) holds is touched, so that a mistyped key or an unreadable file
    ends the process with one line (exit status 1) before `main` runs or writes anything."""

    def parse(argv: list[str]) -> list[str]:
        argv = _expand_config_path(_expand_flagfiles(argv))
        if (line := repeated_config_line(argv)) is not None:
            sys.exit(line)
        logger = absl_logging.get_absl_logger()
        logger.addFilter(_no_none_warning)  # a get_config() that returned None is told in parse_flags' one line
        try:
            remaining = parse_flags(argv)
            # ml_collections defers a config file's failure to load to the config's first use (an override meets
            # it while parsing): raised here, not in the middle of main
            getattr(config_flag.value, "model", None)
        except (AttributeError, KeyError) as e:
            if "has no attribute 'get_config'" in str(e):
                sys.exit(f"error: --config {_config_path(argv)}: the file defines no get_config()")
            if _config_file_lines(e, _config_path(argv)):
                sys.exit(config_code_error_line(e, argv))
            sys.exit(value_path_error_line(e, argv) or config_error_line(e, argv))
        except OSError as e:
            sys.exit(config_file_error_line(e, _config_path(argv)))
        except Exception as e:  # the config file's own code failed: SyntaxError, NameError, ImportError, ...
            if not _config_file_lines(e, _config_path(argv)) and (line := value_path_error_line(e, argv)):
                sys.exit(line)  # ... or an override's path went on past a value
            sys.exit(config_code_error_line(e, argv))
        finally:
            logger.removeFilter(_no_none_warning)
        return remaining

    return parse


def _expand_flagfiles(argv: list[str]) -> list[str]:
    """argv with each --flagfile replaced by the flags its file holds, as absl reads them: a --config (or an override)
    given there was not seen by the checks above, so that two configs (one in the file, one on the command line)
    trained the last without a word, and a config's errors said "--config ?" and "a --config override". argv as
    given when a flagfile cannot be read: absl's parsing then says why."""
    try:
        return [*argv[:1], *flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)]
    except (flags.Error, OSError):
        return argv


def _expand_config_path(argv: list[str]) -> list[str]:
    """argv with the ~ of `--config=~/exp.py` expanded, as --workdir's is: no shell expands one after "=", and
    ml_collections looked for a folder named "~" ("No such file or directory: '~/exp.py'")."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith(("--config=~", "-config=~")):
            flag, value = a.split("=", 1)
            out[i] = f"{flag}={os.path.expanduser(value)}"
    return out


def _no_none_warning(record: Any) -> bool:
    return "get_config() returned None" not in record.getMessage()


def usage_error_line(error: app.UsageError, program: str) -> str:
    return f"{program}: error: {error} (see --helpshort)"


class StopNow(KeyboardInterrupt):
    """A Ctrl-C after which the process must not wait for work it abandoned (the trainer's checkpoint saves in
    flight at a second Ctrl-C): `run` ends it at once, as the interpreter's exit joins such threads (orbax's
    save threads: a run that printed its last line was once seen waiting there until killed)."""


def run(main: Callable[[list[str]], Any], flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
    """`absl.app.run(main)`, but an `app.UsageError` that `main` raises (a flag combination that cannot work)
    ends the process with one line on stderr and exit status 1: absl prints the module's docstring and every
    flag first, which buries the reason. absl's own flag errors (a malformed value, an unknown flag) are told
    in one line by `parse_flags`.
    Ctrl-C ends it with "<program>: interrupted" and status 130 (the trainer saves a checkpoint first), also one
    that landed where Python cannot raise (`_SignalAgain`)."""
    program = program_name()
    again = _SignalAgain(sys.unraisablehook)

    def one_line(argv: list[str]) -> Any:
        try:
            return main(argv)
        except app.UsageError as e:
            sys.exit(usage_error_line(e, program))
        except KeyboardInterrupt as e:  # Ctrl-C: what was written stays; no traceback of wherever it landed
            again.close()
            print(f"\n{program}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
            if isinstance(e, StopNow):  # not waiting for what it left running: out at once
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            sys.exit(130)

    previous_hook, sys.unraisablehook = sys.unraisablehook, again
    try:
        app.run(one_line, flags_parser=flags_parser or parse_flags)
    finally:
        again.close()
        sys.unraisablehook = previous_hook


class _SignalAgain:
    """An `sys.unraisablehook` for the interruption a signal handler raised where Python cannot raise (a garbage-
    collection callback of JAX's, a __del__: "Exception ignored in: <function _xla_gc_callback>" and its traceback,
    and the Ctrl-C lost): the signal is delivered again to the main thread, whose handler raises it where it can
    (`KeyboardInterrupt` is SIGINT's; an exception with a `signum` is that signal's). Any other is `hook`'s.
    Delivered from another thread a moment later (delivered in the hook, the handler ran at once, inside it), and
    not once `close()` was called: the process is stopping already (a redelivery then killed it during its exit)."""

    def __init__(self, hook: Callable[[Any], Any]):
        self.hook, self.closed, self._timers = hook, False, []

    def __call__(self, unraisable: Any) -> None:
        import threading

        error = unraisable.exc_value
        signum = getattr(error, "signum", None)
        if isinstance(error, KeyboardInterrupt) and signum is None:
            signum = signal.SIGINT
        if not (isinstance(error, BaseException) and not isinstance(error, Exception) and isinstance(signum, int)):
            self.hook(unraisable)
        elif not self.closed:
            timer = threading.Timer(0.01, self._deliver, (signum,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def _deliver(self, signum: int) -> None:
        import _thread

        if not self.closed:
            _thread.interrupt_main(signum)

    def close(self) -> None:
        self.closed = True
        for timer in self._timers:
            timer.cancel()


def local_path(value: str) -> str:
    """An output path as a flag gives it, `~` expanded (no shell expands the one in "--output=~/sr"). Raises
    ValueError for a URL: the CLIs that take this write local files only, and os.makedirs("gs://b/x") would make
    a folder "gs:" in the current one and report the work written to the bucket. Raises ValueError for an empty
    value too (`--output=$OUT` with OUT unset): evaluate took it for no --output and wrote no report, without a
    word, after the scoring; figures failed at the end, naming a partial file."""
    if not value.strip():
        raise ValueError("empty (an unset variable?): name where to write (. is the current folder)")
    if paths.is_url(value):
        raise ValueError("a URL, but this command writes local files only (write them here, then copy them, e.g. "
                         "gcloud storage cp -r)")
    return os.path.expanduser(value)


class _LocalPathParser(flags.ArgumentParser):
    def parse(self, argument: str) -> str:
        return local_path(argument)

    def flag_type(self) -> str:
        return "string"


def define_local_output(name: str, default: str | None, help: str, **kwargs: Any) -> flags.FlagHolder:
    """A string flag for a local output path: `~` expanded, a URL refused in one line while parsing."""
    return flags.DEFINE(_LocalPathParser(), name, default, help, serializer=flags.ArgumentSerializer(), **kwargs)


def output_folder_error(path: str, flag: str = "--output") -> str | None:
    """None when `path` is a folder this process can write into (created if need be), else one line saying
    why not: checked before any work, so that a typo or a file in the way costs nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path}: is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        return f"{flag} {path}: cannot create or write that folder ({e.strerror or e})"
    return None
