"""Whether a weights file fits a network: the one matcher every loader uses.

:func:`match_state_dict` compares the tensors of a file with the tensors of a model:
wrapper prefixes (``module.`` of DataParallel / DDP, ``_orig_mod.`` of ``torch.compile``)
are removed, file keys are mapped to the model's keys (exactly, or by a unique dotted
suffix, as detectron2 matches its pickles), and the result says which tensors load,
which required ones are missing, which file keys match nothing, which have another shape,
and which network the file's layout looks like. The builtin detection engine, the
classification trainer, the weight converter and the detectron2 checkpointer all decide
with it and only format its :class:`MatchReport`.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.weights_file import WRAPPER_PREFIXES, strip_wrappers

from .wide_resnet import IMAGENET_DEPTHS

__all__ = ["ConversionError", "WRAPPER_PREFIXES", "MatchReport", "strip_wrappers", "match_state_dict", "guess_network", "is_counter",
           "short_list"]

class ConversionError(WrnDetError):
    """A weights file does not fit or cannot be converted: unreadable, wrong network, missing or unknown keys."""


def is_counter(key: str) -> bool:
    """Return True for BatchNorm's ``num_batches_tracked`` counters: no weights, absent from many published files."""
    return key.endswith("num_batches_tracked")


def short_list(keys: Iterable, n: int = 3, sort: bool = False) -> str:
    """Return up to ``n`` of ``keys`` (sorted first when ``sort``) joined by commas, and how many more there are."""
    keys = [str(k) for k in keys]
    if sort:
        keys.sort()
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


@dataclass
class MatchReport:
    """What :func:`match_state_dict` found; ``ok`` when nothing required is missing, unknown, misshapen or of
    another kind of number."""

    source: str
    total: int                                     # required tensors of the model
    matched: List[str] = field(default_factory=list)      # model keys that load from the file
    missing: List[str] = field(default_factory=list)      # required model keys the file lacks
    unexpected: List[str] = field(default_factory=list)   # file keys that match no model key
    wrong_shape: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # (model key, file, model shape)
    skipped: List[str] = field(default_factory=list)      # optional model keys of another shape in the file
    wrong_dtype: List[Tuple[str, str, str]] = field(default_factory=list)  # (model key, file dtype, model dtype)
    looks_like: Optional[str] = None               # the network the file's key layout shows

    @property
    def ok(self) -> bool:
        """Return True when every required tensor loads and the file has no unknown key."""
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def problems(self, n: int = 3) -> str:
        """Return the report's problems as one phrase ("missing 2: a, b; of another shape 1: c ...")."""
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} of {self.total}: {short_list(self.missing, n)}")
        if self.wrong_shape:
            shapes = [f"{k} {tuple(a)} (the model has {tuple(b)})" for k, a, b in self.wrong_shape]
            parts.append(f"of another shape {len(shapes)}: {short_list(shapes, n)}")
        if self.wrong_dtype:
            kinds = [f"{k} {a} (the model has {b})" for k, a, b in self.wrong_dtype]
            parts.append(f"of another dtype {len(kinds)}: {short_list(kinds, n)}")
        if self.unexpected:
            parts.append(f"unknown to the model {len(self.unexpected)}: {short_list(self.unexpected, n)}")
        return "; ".join(parts)

    def hint(self, name: Optional[str] = None) -> str:
        """Return " (its layout looks like 'x')" when the file looks like another network than ``name``."""
        if self.looks_like and self.looks_like != name:
            return f" (its layout looks like {self.looks_like!r})"
        return ""


def _number_kind(value) -> Optional[str]:
    """Return "float", "complex", "bool" or "integer" for a tensor or numpy array, None for anything else."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            return "bool"
        return "float" if value.is_floating_point() else "complex" if value.is_complex() else "integer"
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy arrays of a pickle
    return {"f": "float", "c": "complex", "b": "bool", "i": "integer", "u": "integer"}.get(kind)


def _dtype_name(value) -> str:
    return str(value.dtype).replace("torch.", "")


def match_state_dict(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                     required: Optional[Iterable[str]] = None, source: str = "the file",
                     ignore: Optional[Callable[[str], bool]] = None, suffix: bool = False,
                     ) -> Tuple["OrderedDict[str, torch.Tensor]", MatchReport]:
    """Match the tensors of a file (``state``) to a model's (``target``: key -> tensor or shape holder).

    ``required``: the model keys that must load (default: every key of ``target`` but the
    BatchNorm counters); other keys of ``target`` are optional (a classifier, say): they load
    when their shape fits and are listed in ``skipped`` otherwise. ``ignore(key)``: file keys
    to leave out of the comparison (counters always are). ``suffix``: a file key may also
    name the one model key that ends with ``"." + key`` (detectron2's matching of its
    pickles). A file tensor of another kind of number than the model's (integers or booleans for
    floating-point weights: ``load_state_dict`` would cast them silently) does not load either.
    Returns ``(loadable, report)``: the tensors to load, keyed as the model, and the
    :class:`MatchReport`.
    """
    state = strip_wrappers(state)
    req = [k for k in target if not is_counter(k)] if required is None else list(required)
    req_set = set(req)
    by_suffix: Dict[str, List[str]] = {}
    if suffix:
        for t in target:
            parts = t.split(".")
            for i in range(1, len(parts)):
                by_suffix.setdefault(".".join(parts[i:]), []).append(t)
    loadable: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    report = MatchReport(source=source, total=len(req), looks_like=guess_network(state))
    for key, value in state.items():
        if is_counter(key) and key not in target or (ignore is not None and ignore(key)):
            continue
        name = key if key in target else None
        if name is None and suffix:
            cands = by_suffix.get(key, [])
            name = cands[0] if len(cands) == 1 else None
        if name is None:
            report.unexpected.append(key)
            continue
        want = tuple(target[name].shape)
        if not hasattr(value, "shape") or tuple(value.shape) != want:  # tensors, or numpy arrays of a pickle
            got = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            if name in req_set:
                report.wrong_shape.append((name, got, want))
            else:
                report.skipped.append(name)
            continue
        have, want_kind = _number_kind(value), _number_kind(target[name])
        if want_kind is not None and have != want_kind:
            if name in req_set:
                report.wrong_dtype.append((name, _dtype_name(value), _dtype_name(target[name])))
            else:
                report.skipped.append(name)
            continue
        loadable[name] = value
    report.matched = list(loadable)
    refused = {w[0] for w in report.wrong_shape} | {w[0] for w in report.wrong_dtype}
    report.missing = [k for k in req if k not in loadable and k not in refused]
    return loadable, report


def blocks_per_stage(keys: Iterable, pattern: str) -> Dict[int, List[int]]:
    """Return ``{stage: sorted block indices}`` (stages in order) of the keys that ``pattern`` matches at their start.

    The pattern's two groups are the stage and the block number, e.g. ``r"layer(\\d)\\.(\\d+)\\."``;
    keys that are not strings are passed over.
    """
    blocks: Dict[int, set] = {}
    for k in keys:
        m = re.match(pattern, k) if isinstance(k, str) else None
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {stage: sorted(b) for stage, b in sorted(blocks.items())}


def guess_network(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Return the ``wrn_det.models`` name that the key layout and shapes of ``state`` describe, or None.

    Recognises the ImageNet family (torchvision/timm keys: ``wide_resnet{depth}_{k}``) and
    the CIFAR-style WRNs (``wrn_{depth}_{k}``); other networks need an explicit name.
    """
    blocks = blocks_per_stage(state, r"layer([1-4])\.(\d+)\.")
    if sorted(blocks) == [1, 2, 3, 4] and "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        counts = tuple(len(blocks[i]) for i in range(1, 5))
        kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        for depth, (d_kind, d_counts) in IMAGENET_DEPTHS.items():
            if d_kind == kind and d_counts == counts:
                width = state["layer1.0.conv1.weight"].shape[0]
                if width % 64 == 0:
                    return f"wide_resnet{depth}_{width // 64}"
        return None
    stage_blocks = blocks_per_stage(state, r"stage([1-3])\.(\d+)\.")
    if sorted(stage_blocks) == [1, 2, 3] and "stem.weight" in state and "stage1.0.conv1.weight" in state:
        n = len(stage_blocks[1])
        if len(stage_blocks[2]) == n == len(stage_blocks[3]):
            width = state["stage1.0.conv1.weight"].shape[0]
            if width % 16 == 0:
                return f"wrn_{6 * n + 4}_{width // 16}"
    return None
