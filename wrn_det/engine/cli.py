"""The command-line shape every tool shares: the argument parsers and the wrapper that runs ``main``.

Each script in ``tools/`` is::

    def parse_args(argv=None) -> argparse.Namespace: ...
    def main(args) -> int: ...
    if __name__ == "__main__":
        sys.exit(cli_main(main, parse_args()))

:func:`default_argument_parser` gives detectron2's training flags (``tools/train_net.py``,
``tools/train_cls.py``); :func:`parse_args_with_overrides` lets ``KEY VALUE`` config
overrides stand anywhere on a line (the tools that take ``--input a.jpg b.jpg``);
:func:`cli_main` turns the project's errors into one ``error:`` line and an exit status.
"""
import argparse
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

from .errors import Preempted, WrnDetError

__all__ = ["cli_main", "default_argument_parser", "split_overrides", "parse_args_with_overrides"]

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")  # a config key such as MODEL.WEIGHTS


def cli_main(fn, *args, **kwargs) -> int:
    """Run ``fn(*args, **kwargs)`` as a command-line entry point.

    Returns the exit status: 0 on success (or what ``fn`` returned if it is an int),
    2 after printing ``error: <message>`` to stderr for a :class:`WrnDetError`,
    :data:`~wrn_det.engine.errors.PREEMPTED_EXIT_CODE` for a run stopped by a preemption
    signal, 130 on Ctrl-C.
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


def _count(minimum: int):
    """Return an argparse type: an integer of at least ``minimum`` (argparse prints one line otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def default_argument_parser(description: str = "wrn-det") -> argparse.ArgumentParser:
    """Return an argument parser with detectron2's training flags.

    ``--config-file`` (also ``--config``), ``--resume``, ``--eval-only``, ``--num-gpus``,
    ``--num-machines``, ``--machine-rank``, ``--dist-url`` and trailing ``KEY VALUE`` overrides
    (``args.opts``).
    """
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: trailing KEY VALUE pairs, e.g. SOLVER.BASE_LR 0.01 OUTPUT_DIR out/run1",
    )
    p.add_argument("--config-file", "--config", default="", metavar="FILE", help="config path or a file name under configs/")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint if it exists")
    p.add_argument("--eval-only", action="store_true", help="only evaluate: MODEL.WEIGHTS, or with --resume the newest checkpoint in OUTPUT_DIR")
    p.add_argument("--num-gpus", type=_count(1), default=1,
                   help="processes per machine (GPUs; on a CPU-only machine, CPU processes with gloo)")
    p.add_argument("--num-machines", type=_count(1), default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=_count(0), default=0, help="the rank of this machine (unique per machine)")
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 for several machines; 'auto' picks a free local port")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Return ``(other arguments, KEY VALUE overrides)`` of a command line.

    Every config key (upper case, dotted: ``MODEL.WEIGHTS``) takes the token after it as its
    value, wherever the pair stands, so overrides may follow a flag that takes several
    values (``--input a.jpg b.jpg MODEL.WEIGHTS w.pth``).
    """
    rest, opts, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        if _KEY.match(argv[i]) and i + 1 < len(argv):
            opts += argv[i:i + 2]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, opts


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Return ``parser``'s parse of ``argv`` (default: ``sys.argv[1:]``) with the ``KEY VALUE`` pairs in ``args.opts``.

    The pairs are taken out first (:func:`split_overrides`), wherever they stand.
    """
    rest, opts = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    args.opts = opts
    return args
