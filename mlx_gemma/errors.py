"""Errors users can act on, and how a CLI reports them: one line on stderr, exit non-zero.

Imports nothing heavy: every CLI answers `--help` and argument errors without loading MLX.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


class MlxGemmaError(Exception):
    """Base class: the message names the file or value and what is wrong."""


class ConfigError(MlxGemmaError):
    pass


class CheckpointError(MlxGemmaError):
    pass


class InputError(MlxGemmaError):
    pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C so that every `finally` and cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: argument --temp: ...`) and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _terminate(signum, frame):
    raise Terminated(signum)


def run_cli(action, interrupted: str = "interrupted"):
    """Run a CLI's work: an MlxGemmaError becomes one `error: ...` line and exit code 1;
    Ctrl-C, SIGTERM and SIGHUP unwind (cleanups run) and exit 128 + the signal; a closed
    stdout (`| head`) ends quietly. Otherwise the work's result is returned."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        return action()
    except MlxGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated as e:
        print(f"{interrupted} ({signal.Signals(e.signum).name})", file=sys.stderr)
        sys.exit(128 + e.signum)
    except BrokenPipeError:
        # The reader went away: nothing more can be said on stdout, and Python's own flush at
        # exit would print a traceback, so point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
