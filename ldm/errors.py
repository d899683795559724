"""User-facing errors: one line, no traceback, non-zero exit from the CLI."""


class LdmError(Exception):
    """An error caused by the user's input (a file, a flag, a config value).

    The message is one line that names what is wrong and where; the CLI prints it as
    ``ldm: error: <message>`` and exits with status 2.
    """


class CheckpointError(LdmError):
    """A checkpoint file is missing, malformed, or unsafe to load."""


class ConfigError(LdmError):
    """A config file or override is invalid (unknown key, wrong type, unsupported field)."""
