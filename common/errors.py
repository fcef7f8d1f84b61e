"""The one user-error type of the project, in its lowest layer so that every layer can raise it.

`UserError` is bad input (a config key, a data file, a checkpoint, a cache, a command-line argument): the
entry points (`training.cli.run_main`) print its message as one line and exit with code 2. Every other
exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem the user can fix; the message names the key, file or argument at fault."""


class RuntimeConfigError(UserError):
    """The config asks for something this machine cannot do (CUDA absent, fp16 on a CPU, apex missing)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


class OutputError(UserError, OSError):
    """A file or folder that cannot be written (a full disk, a read-only file system, a path through a regular
    file): the message names it and what it needs (`common.files.writing`). Also an OSError, so that
    the writers of best-effort caches, which carry on without them, still catch it as one."""
