"""Errors users can act on. CLIs print them as one line and exit non-zero."""


class MlxGemmaError(Exception):
    """Base class: the message names the file or value and what is wrong."""


class ConfigError(MlxGemmaError):
    pass


class CheckpointError(MlxGemmaError):
    pass


class InputError(MlxGemmaError):
    pass
