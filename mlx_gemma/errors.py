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


class DistributedError(MlxGemmaError):
    """A multi-process run that cannot go on: a rank that died, hangs or holds another checkpoint."""


class ContextError(InputError):
    """A prompt (with what the cache already holds) that leaves no room in the context."""

    def __init__(self, message: str, needed: int, limit: int):
        super().__init__(message)
        self.needed, self.limit = needed, limit


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C so that every `finally` and cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, except where its help text already says what it is (or
    that the flag is required)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or "(required" in (action.help or ""):
            return action.help
        if action.required:
            return f"{action.help} (required)"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: argument --temp: ...`) and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        script = os.path.basename(sys.argv[0])
        if self.prog == f"python -m {script}":  # run as its console script, named as the module
            self.prog = script

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
        result = action()
        sys.stdout.flush()  # a reader gone by now is a BrokenPipeError here, not a traceback at exit
        return result
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
