"""Weights files in and out: the one reader of every format the project reads, and the safetensors writer.

:func:`read_weights_file` opens a weights file once -- ``MODEL.WEIGHTS`` of both trainers and
both detection engines, the predictor's weights, ``tools/convert_weights.py``'s input, a Hub
folder's ``model.safetensors`` -- and returns a :class:`WeightsFile`: the network's tensors
(and its EMA tensors when the file has them), what travels beside them (the training set's
class names, the run's config, the network's name) and what kind of file it is (a detector of
either engine, a backbone, a classifier; a training checkpoint or not). The format follows the
extension:

* ``.safetensors``: tensors and a header of strings, which holds no code by construction. The
  project's own files (:func:`save_safetensors`) keep in the header the class names
  (``metadata``, JSON), the run's config (``config``, YAML text) and the file's description
  (``wrn_det``, JSON), so :attr:`WeightsFile.contents` has the layout of a torch checkpoint;
* ``.pkl``: a detectron2 weights pickle, read through the restricted unpickler
  (:func:`wrn_det.engine.safe_pickle.safe_load_pickle`: numpy arrays and plain containers only);
* anything else: a ``torch.save`` file, read with ``torch.load(weights_only=True)``
  (:func:`wrn_det.engine.checkpoint.load_checkpoint`).

Every tensor is checked on the way in: numpy arrays of numbers become tensors, and a key that
is not a string, a value that is not a tensor or a non-finite value is a one-line
:class:`WrnDetError` naming the file and the key. What the tensors are then matched against
(a key plan, then the one matcher :func:`wrn_det.models.weights.match_state_dict`) is the
caller's business. This module knows file layouts, not networks.
"""
import json
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .errors import WrnDetError, a_type
from .fileio import atomic_write
from .safe_pickle import safe_load_pickle

__all__ = ["WeightsFile", "read_weights_file", "save_safetensors", "safetensors_writer", "weights_format", "strip_wrappers",
           "is_detectron2_state", "WRAPPER_PREFIXES", "TORCH", "DETECTRON2_PICKLE", "SAFETENSORS",
           "DETECTOR_PREFIXES"]

#: The formats :func:`read_weights_file` reads (``WeightsFile.format``).
TORCH, DETECTRON2_PICKLE, SAFETENSORS = "torch", "detectron2_pickle", "safetensors"

#: Prefixes wrappers add to every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

#: Top-level modules of a detector of either engine (a classification network has none of them).
DETECTOR_PREFIXES = ("backbone.", "proposal_generator.", "rpn.", "roi_heads.")

# safetensors refuses headers above 100 MB; a file announcing more is refused before it is opened
_MAX_HEADER = 100_000_000
# header fields of the project's safetensors files whose values are JSON text
_JSON_FIELDS = ("wrn_det", "metadata")


def strip_wrappers(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Return ``state`` without the wrapper prefixes that every key carries (in any order and number).

    A prefix is removed only when every key has it, so a network with a real ``module``
    child keeps its keys.
    """
    state = OrderedDict(state)
    changed = True
    while changed and state:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in state):
                state = OrderedDict((k[len(p):], v) for k, v in state.items())
                changed = True
    return state


def is_detectron2_state(state: Iterable[str]) -> bool:
    """Return True when a detector state dict (or its keys) uses detectron2's module names (its RPN, box head or C4 head)."""
    return any(k.startswith(("proposal_generator.", "roi_heads.res5.")) or k.startswith("roi_heads.box_head.fc")
               or k.startswith("roi_heads.box_head.conv") for k in state)


def weights_format(path: str) -> str:
    """Return the format :func:`read_weights_file` reads ``path`` as: ``safetensors``, ``detectron2_pickle``
    (``.pkl``) or ``torch`` (anything else)."""
    ext = os.path.splitext(str(path))[1].lower()
    return SAFETENSORS if ext == ".safetensors" else DETECTRON2_PICKLE if ext == ".pkl" else TORCH


class WeightsFile:
    """What :func:`read_weights_file` found in one file.

    ``contents``: the object the file holds, in a torch checkpoint's layout (a safetensors
    file's is ``{"model": tensors, "metadata": ..., "config": ..., "wrn_det": ...}``);
    ``model`` / ``ema``: the network's tensors and its EMA tensors (``None`` when the file has
    none), checked when first asked for (a value that is not a tensor or not finite is a
    :class:`WrnDetError` then, so that a caller who knows a more particular layout can say what is
    wrong first), wrapper prefixes removed; ``kind``: ``detector``, ``backbone``
    (``tools/convert_weights.py`` output, or a detectron2 pickle of a backbone),
    ``classifier`` (a classification network's weights) or ``unknown`` (no state dict found,
    e.g. the authors' own layouts); ``engine``: for a detector, ``builtin`` or ``detectron2``;
    ``training``: whether it is a training checkpoint (it holds an optimizer state);
    ``metadata``: the class metadata as stored (``contents["metadata"]``, unchecked; ``{}`` when
    absent); ``config``: the run's config as YAML text, or None; ``model_name``: the network
    named in the file's description, or None.
    """

    def __init__(self, path: str, fmt: str, contents: Any, model: Optional[Mapping] = None,
                 ema: Optional[Mapping] = None):
        self.path, self.format, self.contents = path, fmt, contents
        self._raw = {"model": model, "ema": ema}
        self._checked: Dict[str, Optional["OrderedDict[str, torch.Tensor]"]] = {}
        self.kind, self.engine, self.training = "unknown", None, False
        self.metadata: Any = {}
        self.config: Optional[str] = None
        self.model_name: Optional[str] = None

    def _tensors(self, which: str) -> Optional["OrderedDict[str, torch.Tensor]"]:
        if which not in self._checked:
            raw = self._raw[which]
            self._checked[which] = None if raw is None else _checked(raw, self.path)
        return self._checked[which]

    @property
    def model(self) -> Optional["OrderedDict[str, torch.Tensor]"]:
        """Return the network's tensors (checked), or None when the file holds no state dict."""
        return self._tensors("model")

    @property
    def ema(self) -> Optional["OrderedDict[str, torch.Tensor]"]:
        """Return the network's EMA tensors (checked), or None when the file has none."""
        return self._tensors("ema")

    @property
    def keys(self) -> list:
        """Return the model's keys as stored (wrapper prefixes removed), without checking the tensors."""
        raw = self._raw["model"] or {}
        return list(strip_wrappers({k: None for k in raw if isinstance(k, str)}))

    @property
    def description(self) -> str:
        """Return what the file is, in a few words ("a detectron2-engine detector training checkpoint (torch)", ...)."""
        if self.kind == "detector":
            what = f"a {self.engine}-engine detector"
        else:
            what = {"backbone": "a backbone", "classifier": "a classifier"}.get(self.kind, "an unrecognised")
        return f"{what} {'training checkpoint' if self.training else 'weights file'} ({self.format})"

    def __repr__(self) -> str:
        return f"WeightsFile({self.path!r}: {self.description})"


# ------------------------------------------------------------------------------------------ reading


def _state_of(obj) -> Optional[dict]:
    """Return ``obj`` if it looks like a state dict (a non-empty dict with a tensor or array among its values)."""
    if isinstance(obj, dict) and obj and any(hasattr(v, "shape") for v in obj.values()):
        return obj
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """Return True when floating-point ``t`` holds no NaN or inf.

    Its sum first: one read of the tensor, where ``isfinite(t).all()`` writes and reads a mask of its
    size (about a tenth of the time on a detector's 100M weights). A NaN or inf makes the sum
    non-finite; so can an overflow of finite values, which the element-wise test then tells apart.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _checked(state: Mapping, path: str) -> "OrderedDict[str, torch.Tensor]":
    """Return ``state`` with every value a finite tensor (numpy arrays of numbers converted), prefixes removed.

    Raises :class:`WrnDetError` naming the file and the key for a key that is not a string, a
    value that is not a tensor, and a tensor holding NaN or inf.
    """
    out = OrderedDict()
    for key, value in state.items():
        if not isinstance(key, str):
            raise WrnDetError(f"checkpoint {path}: model key {key!r} is not a string")
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise WrnDetError(f"checkpoint {path}: {key} is {a_type(value)}, not a tensor")
        if value.is_floating_point() and not _all_finite(value):
            raise WrnDetError(f"checkpoint {path}: {key} holds non-finite values (NaN or inf); the file is corrupt "
                              "or training diverged")
        out[key] = value
    return strip_wrappers(out)


def _read_pickle(path: str) -> dict:
    obj = safe_load_pickle(path, "detectron2 weights file")
    if not isinstance(obj, dict):
        raise WrnDetError(f"{path}: expected a dict in the detectron2 weights pickle, got {type(obj).__name__}")
    return obj


def _read_safetensors(path: str) -> dict:
    """Return the safetensors file at ``path`` in a torch checkpoint's layout (see :class:`WeightsFile`)."""
    if not os.path.isfile(path):
        raise WrnDetError(f"weights file {path!r} does not exist")
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise WrnDetError(f"{path}: reading .safetensors files needs the safetensors package "
                          "(pip install safetensors, or the hub extra of wrn_det)") from None
    where = f"weights file {path}"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise WrnDetError(f"{where} is not a safetensors file: {size} bytes, fewer than its header's length field")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise WrnDetError(f"{where}: its header claims {n} bytes but {size - 8} follow; the file is truncated or "
                          "not a safetensors file")
    if n > _MAX_HEADER:
        raise WrnDetError(f"{where}: its header of {n} bytes is larger than a weights file needs (at most "
                          f"{_MAX_HEADER}); refused")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, OverflowError, MemoryError) as e:
        raise WrnDetError(f"{where} cannot be read as safetensors ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}); it may be truncated or corrupt") from None
    contents: Dict[str, Any] = {"model": tensors}
    for name, text in header.items():
        if name in _JSON_FIELDS:
            try:
                contents[name] = json.loads(text)
            except ValueError:
                raise WrnDetError(f"{where}: header field {name!r} is not JSON text") from None
        elif name == "config":
            contents[name] = text
    meta = contents.get("metadata")
    ids = meta.get("contiguous_id_to_thing_dataset_id") if isinstance(meta, dict) else None
    if isinstance(ids, dict) and all(isinstance(k, str) and k.isdigit() for k in ids):
        meta["contiguous_id_to_thing_dataset_id"] = {int(k): v for k, v in ids.items()}  # JSON keys are strings
    return contents


def read_weights_file(path: str) -> WeightsFile:
    """Read the weights file at ``path`` once; returns a :class:`WeightsFile` (see the module docstring).

    Raises :class:`WrnDetError` with one line naming the file when it is missing, unreadable,
    truncated, holds anything but tensors and plain data, or holds a tensor that is not finite.
    """
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    fmt = weights_format(path)
    if fmt == SAFETENSORS:
        contents = _read_safetensors(path)
    elif fmt == DETECTRON2_PICKLE:
        contents = _read_pickle(path)
    else:
        contents = load_checkpoint(path)
    model = ema = None
    if isinstance(contents, dict):
        for key, ema_key in (("model", "ema"), ("state_dict", "state_dict_ema")):  # ours and detectron2's; timm's
            if key in contents:
                model, ema = _state_of(contents[key]), _state_of(contents.get(ema_key))
                break
        else:
            model = _state_of(contents)
    wf = WeightsFile(str(path), fmt, contents, model, ema)
    if isinstance(contents, dict):
        wf.training = "optimizer" in contents
        wf.metadata = contents.get("metadata", {})
        wf.config = contents["config"] if isinstance(contents.get("config"), str) else None
        desc = contents.get("wrn_det")
        if isinstance(desc, dict) and isinstance(desc.get("model_name"), str):
            wf.model_name = desc["model_name"]
        keys = wf.keys
        if model is not None:
            if any(k.startswith(DETECTOR_PREFIXES) for k in keys):
                wf.kind = "detector"
                wf.engine = "detectron2" if is_detectron2_state(keys) else "builtin"
            elif (isinstance(desc, dict) and desc.get("format") == "backbone") or fmt == DETECTRON2_PICKLE:
                wf.kind = "backbone"
            else:
                wf.kind = "classifier"
    return wf


# ------------------------------------------------------------------------------------------ writing


def _storage_unique(tensors: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Return ``tensors`` on the CPU, contiguous, each tensor once: safetensors stores no two views of one storage.

    A tensor reachable under several keys (the C4 box head is the network's next stage) keeps
    its first key; a reader puts it back under the others (they are the same tensor in the model).
    """
    out, seen = OrderedDict(), {}
    for key, value in tensors.items():
        t = value.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = t.cpu().contiguous()
    ptrs: Dict[int, str] = {}
    for key, t in list(out.items()):  # distinct views of one storage (slices): give each its own copy
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:
            out[key] = t.clone()
        ptrs.setdefault(ptr, key)
    return out


def safetensors_writer(tensors: Mapping[str, torch.Tensor], **fields) -> Callable[[str], None]:
    """Return ``write(path)``, which writes ``tensors`` and the header ``fields`` to a safetensors file.

    ``fields`` go into the header: strings as they are (``config``: the run's YAML), anything
    else as JSON text (``metadata``: the class names and ids; ``wrn_det``: the file's
    description); ``format: pt`` is added, as the Hugging Face libraries expect. Fields whose
    value is None are left out. For :func:`~wrn_det.engine.fileio.atomic_write_all` (several
    files at once); :func:`save_safetensors` writes one. Raises :class:`WrnDetError` when
    safetensors is not installed.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise WrnDetError("writing .safetensors files needs the safetensors package "
                          "(pip install safetensors, or the hub extra of wrn_det)") from None
    header = {"format": "pt"}
    for name, value in fields.items():
        if value is not None:
            header[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    data = _storage_unique(tensors)
    return lambda path: save_file(data, path, metadata=header)


def save_safetensors(path: str, tensors: Mapping[str, torch.Tensor], **fields) -> str:
    """Write ``tensors`` and the header ``fields`` (see :func:`safetensors_writer`) to ``path`` atomically;
    returns ``path``."""
    return atomic_write(path, safetensors_writer(tensors, **fields), suffix=".safetensors")
