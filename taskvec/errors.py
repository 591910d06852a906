"""Error types. Every message names the file, key or parameter at fault."""


class TaskVecError(Exception):
    """Base class for taskvec errors."""


class CheckpointError(TaskVecError, ValueError):
    """A checkpoint can't be read: missing, truncated, corrupt, unsafe pickle."""


class KeyMismatchError(TaskVecError, KeyError):
    """Two checkpoints disagree on which tensors they hold."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(TaskVecError, ValueError):
    """Same tensor name, different shape or dtype."""


class ParameterError(TaskVecError, ValueError):
    """A method or config parameter is out of range or of the wrong form."""


class OutputError(TaskVecError, ValueError):
    """The output location is unsafe: exists, equals an input, or can't be written."""
