"""Errors users can act on. CLIs print them as one line and exit non-zero."""


class MlxGemmaError(Exception):
    """Base class: the message names the file or value and what is wrong."""


class ConfigError(MlxGemmaError):
    pass


class CheckpointError(MlxGemmaError):
    pass


class InputError(MlxGemmaError):
    pass


def run_cli(action, interrupted: str = ""):
    """Run a CLI's work: an MlxGemmaError becomes one `error: ...` line and exit code 1,
    Ctrl-C exit code 130; otherwise the work's result is returned."""
    import sys

    try:
        return action()
    except MlxGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
