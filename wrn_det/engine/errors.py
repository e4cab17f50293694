"""User-facing errors and the command-line wrapper that turns them into one line."""
import os
import sys


class WrnDetError(Exception):
    """An error caused by the user's input (a file, a key, a value).

    Its message is one line that names what is wrong and what was expected; the
    command-line tools print it without a traceback and exit non-zero.
    """


#: Exit status of a run stopped by a preemption signal after writing its checkpoint.
PREEMPTED_EXIT_CODE = 3


class Preempted(Exception):
    """The run stopped on a preemption signal; ``iteration`` and ``checkpoint`` say where to continue.

    Not an error: :func:`cli_main` returns :data:`PREEMPTED_EXIT_CODE` for it (the trainer
    has logged where it stopped).
    """

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, iteration: int, checkpoint):
        self.iteration, self.checkpoint = iteration, checkpoint
        super().__init__(f"preempted at iteration {iteration}; checkpoint {checkpoint}; continue with --resume")


class ConfigError(WrnDetError):
    """A config file, key or value is not what the project expects."""


def cli_main(fn, *args, **kwargs) -> int:
    """Run ``fn(*args, **kwargs)`` as a command-line entry point.

    Returns the exit status: 0 on success (or what ``fn`` returned if it is an int),
    2 after printing ``error: <message>`` to stderr for a :class:`WrnDetError`,
    :data:`PREEMPTED_EXIT_CODE` for a run stopped by a preemption signal.
    """
    try:
        ret = fn(*args, **kwargs)
    except WrnDetError as e:
        msg = " ".join(str(e).split("\n")).strip()
        # every process of a torchrun job meets the same bad input: rank 0 says it once
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    except Preempted as e:
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return ret if isinstance(ret, int) else 0


class NonFiniteLossError(WrnDetError):
    """The training loss became NaN or infinite; the run stopped without saving the bad weights."""


def a_type(value) -> str:
    """Return "a dict", "an int", ...: the type of ``value`` with its article, for messages about bad input."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"
