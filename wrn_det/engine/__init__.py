"""Pieces shared by the classification and detection engines.

Config loading and the run keys, checkpoints, distributed launch and communication,
logging and metrics, learning-rate schedules, seeding, user-facing errors and the
command-line shape. Nothing here knows about a particular network or task.

What the tools use is exported here::

    from wrn_det.engine import cli_main, default_argument_parser, launch, load_config

The command-line pieces and :func:`launch` are imported with the package (they are light:
torch comes with the first job launched); the rest on first use, so that importing an engine
module does not import torch.
"""
from .cli import cli_main, default_argument_parser, parse_args_with_overrides, split_overrides
from .errors import ConfigError, WrnDetError
from .launch import launch

# attribute -> module of this package that defines it, imported when the attribute is first read
_LAZY = {
    "CfgNode": "config", "load_config": "config", "save_config": "config", "add_run_config": "config",
    "setup_run": "run", "open_output_dir": "run",
    "atomic_write": "fileio", "write_json": "fileio",
    "read_metrics": "events",
}

__all__ = ["cli_main", "default_argument_parser", "parse_args_with_overrides", "split_overrides", "ConfigError",
           "WrnDetError", "launch", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
