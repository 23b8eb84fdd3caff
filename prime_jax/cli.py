"""What every `python -m prime_jax.*` command shares: a quiet start and one-line errors.

`run(main, config_help)` defines `--config` (a `configs/*.py` file with `--config.a.b=v` overrides), runs `main`
under absl, and turns the errors a user can fix (a missing config file, a bad key or value, a missing model or
tokenizer path) into one line on stderr and exit status 1, instead of a traceback.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags


def quiet_backends() -> None:
    """On a machine without TPU chips, keeps JAX from initialising the TPU runtime (libtpu, installed for ahead-of-
    time compiling, prints a page of errors when it finds no chips). A TPU VM, or an explicit JAX_PLATFORMS, is
    left alone. Call before JAX initialises its backends."""
    if "JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    cuda = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"


def config_flag(help_text: str = "path to a configs/*.py file") -> Any:
    """`--config`: a config file with `--config.a.b=value` overrides; the config is locked (keys cannot be added)."""
    return config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def load_config(flag: Any) -> Any:
    """The parsed config, or one line naming the file that could not be loaded."""
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(name):
        fail(f"--config: no such file {name!r} (the configs are in configs/, e.g. --config=configs/tiny.py)")
    try:
        value = flag.value
        value.to_dict()  # a file that failed to load gives a stand-in that raises on first use
        return value
    except Exception as e:  # noqa: BLE001 - any error in the user's config file is one line naming it
        fail(f"--config: cannot load {name!r}: {str(e).strip().splitlines()[-1].strip()}")


def fail(message: str) -> None:
    """Ends the program with one line on stderr."""
    sys.exit(f"error: {message}")


def run(main: Callable[[list[str]], None], *, needs_config: bool = True) -> None:
    """absl's `app.run(main)` with a quiet start: absl/orbax logging at WARNING unless `-v`, no TPU probing off
    TPU, and a user's mistakes (a ConfigError, or a ValueError naming a config key or flag) as one line."""
    quiet_backends()
    if needs_config:
        flags.mark_flag_as_required("config")

    started = False

    def wrapped(argv: list[str]) -> None:
        nonlocal started
        started = True
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if flags.FLAGS.verbosity <= 0:
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except ValueError as e:
            if not _users_mistake(e):
                raise
            fail(str(e).strip().splitlines()[0])

    try:
        app.run(wrapped)
    except Exception as e:  # noqa: BLE001
        if started:
            raise
        # Parsing the command line failed: the config file does not load, an unknown flag, or an override of a
        # key the config does not have (--config.no.such.key=1).
        if isinstance(e, (AttributeError, KeyError)):
            detail = f"no such config key {str(e).strip(chr(34) + chr(39))!r}"
        elif isinstance(e, SyntaxError):
            detail = f"{e.msg} in {e.filename}, line {e.lineno}"
        else:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"command line {' '.join(sys.argv[1:])!r}: {detail}")


def _users_mistake(e: ValueError) -> bool:
    """Errors whose message names what to fix: a ConfigError (`config.<key>: ...`) or a flag (`--name ...`)."""
    from prime_jax.settings import ConfigError

    return isinstance(e, ConfigError) or str(e).startswith(("config.", "--"))
