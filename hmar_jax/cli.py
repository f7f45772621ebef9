"""One error style for every command line: bad input ends in one line and exit status 2.

Every ``python -m hmar_jax.*`` command runs its ``main`` through :func:`run` (argparse
commands) or :func:`run_absl` (the config-file commands). A problem with the user's input
(a missing or malformed file, a bad flag value, a config key that does not exist, an output
location that cannot be written) is printed as ``error: <what is wrong and how to fix it>``
on stderr and the process exits with status 2, without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Callable, Sequence

from hmar_jax import atomic_io

# Exceptions that mean "the input is wrong", raised with a message written for the user.
# ``ValueError`` covers the library's own checks (and the converters' format errors, which
# subclass it); the ``OSError`` subclasses cover paths that are missing, taken or not ours
# to write; ``EOFError`` a truncated file.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, EOFError, FileNotFoundError, FileExistsError, NotADirectoryError,
    IsADirectoryError, PermissionError)

EXIT_USAGE = 2

# Counts and seeds are int32 inside the sampler. A JAX key keeps 32 bits of its seed, so
# seeds outside int32 would silently repeat others (2**32 draws what 0 draws).
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


class InputError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


def report(error: BaseException | str) -> int:
    """Prints ``error: ...`` (one line) on stderr and returns the exit status for bad input."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    return EXIT_USAGE


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Calls ``main(argv)`` and turns a :data:`USER_ERRORS` exception into one line, exit 2."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        return report(error)


def run_absl(main: Callable[[list[str], dict], object], define_flags: Callable[[], dict]) -> None:
    """``absl.app.run`` with the same error style, flag parsing included: an unknown
    ``--config.KEY`` or a value of the wrong type is one line and exit 2, not a traceback.

    ``define_flags()`` defines the command's absl flags and returns them by name; it runs
    here, when the command runs, never at import (absl refuses a flag defined twice in one
    process, and importing a module must not change global state). ``main(argv, flags)``
    gets what it returned."""
    from absl import app, flags

    defined = define_flags()

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            sys.exit(report(f"{_innermost_message(str(error))} Run with --help for the flags."))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            sys.exit(report(_override_problem(argv, error)))

    def guarded(argv: list[str]) -> object:
        try:
            return main(argv, defined)
        except USER_ERRORS as error:
            sys.exit(report(error))

    app.run(guarded, flags_parser=parse_flags)


def define_config_flags(config_help: str, workdir_help: str | None) -> dict:
    """The locked ``--config`` file flag (``--config.KEY=VALUE`` overrides; a mistyped key
    fails at launch) and, unless ``workdir_help`` is None, a required ``--workdir``: the
    flags of the config-file commands, for their ``define_flags``."""
    from absl import flags
    from ml_collections import config_flags

    defined = {"config": config_flags.DEFINE_config_file("config", None, config_help,
                                                         lock_config=True)}
    required = ["config"]
    if workdir_help is not None:
        defined["workdir"] = flags.DEFINE_string("workdir", None, workdir_help)
        required.append("workdir")
    flags.mark_flags_as_required(required)
    return defined


def _innermost_message(text: str) -> str:
    """A flag error whose text quotes a traceback (a config file's ``get_config`` raised) cut
    to the flag and the exception's own message."""
    if "Traceback (most recent call last)" not in text:
        return text.rstrip(".") + "."
    flag = text.split(": Error whilst parsing", 1)[0]
    messages = re.findall(r"\b\w*(?:Error|Exception): (.+?)(?=\s+File \"|$)", text, re.S)
    return f"{flag}: {messages[-1].strip()}" if messages else text


def _override_problem(argv: list[str], error: BaseException) -> str:
    """Names the ``--config.KEY=VALUE`` override that does not fit the loaded config."""
    overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    if isinstance(error, (AttributeError, KeyError)):  # the message is the missing key
        missing = str(error).strip("\"'")
        for override in overrides:
            if missing in override.split(".")[1:]:
                return (f"--{override}: the config has no key {missing!r}; check the spelling "
                        "against the config file.")
    return (f"a --config override does not fit the config ({error!s}); check the value types "
            "against the config file.")


def check_writable_output(path: str | os.PathLike, *, overwrite: bool,
                          flag: str = "--out") -> pathlib.Path:
    """Checks, before any work, that ``path`` can be created: its parent is (or can become) a
    directory we may write, and ``path`` is free unless ``overwrite``. Returns the path.

    Raises:
      FileExistsError, InputError: with a message naming ``flag`` and the fix.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another {flag} or pass --overwrite.")
    parent = path.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, not a directory; choose "
                         f"another {flag}.")
    try:  # a real write, so read-only file systems are caught as well as permissions
        probe, probe_name = tempfile.mkstemp(prefix=".write-check-", dir=existing)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot write in {existing} ({error.strerror}); "
                         f"choose another {flag}.") from None
    os.close(probe)
    os.remove(probe_name)
    return path


def check_int_range(flag: str, value: int, low: int, high: int = INT32_MAX) -> int:
    """Returns ``value`` if ``low <= value <= high``, else raises InputError naming the range."""
    if not low <= value <= high:
        raise InputError(f"{flag} {value} is out of range; give an integer in {low}..{high}.")
    return value


def write_output(path: str | os.PathLike, write: Callable, *, overwrite: bool) -> pathlib.Path:
    """Creates the parent folder, then writes ``path`` atomically with ``write(file)``.
    Without ``overwrite`` a file that another run created meanwhile is refused
    (FileExistsError), never silently replaced. Returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.atomic_write(path, write, overwrite=overwrite)
    return path
