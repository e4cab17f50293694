"""User-facing errors: the exceptions a tool turns into one ``error:`` line (:func:`wrn_det.engine.cli.cli_main`)."""


class WrnDetError(Exception):
    """An error caused by the user's input (a file, a key, a value).

    Its message is one line that names what is wrong and what was expected; the
    command-line tools print it without a traceback and exit non-zero.
    """


#: Exit status of a run stopped by a preemption signal after writing its checkpoint.
PREEMPTED_EXIT_CODE = 3


class Preempted(Exception):
    """The run stopped on a preemption signal; ``iteration`` and ``checkpoint`` say where to continue.

    Not an error: :func:`~wrn_det.engine.cli.cli_main` returns :data:`PREEMPTED_EXIT_CODE` for it (the trainer
    has logged where it stopped).
    """

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, iteration: int, checkpoint):
        self.iteration, self.checkpoint = iteration, checkpoint
        super().__init__(f"preempted at iteration {iteration}; checkpoint {checkpoint}; continue with --resume")


class ConfigError(WrnDetError):
    """A config file, key or value is not what the project expects."""


class NonFiniteLossError(WrnDetError):
    """The training loss became NaN or infinite; the run stopped without saving the bad weights."""


def a_type(value) -> str:
    """Return "a dict", "an int", ...: the type of ``value`` with its article, for messages about bad input."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"
