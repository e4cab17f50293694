"""Precomputed proposal files in detectron2's format, read without running anything.

A proposal file is a pickle of a dict (as detectron2's ``COCOEvaluator`` writes
``box_proposals.pkl`` and ``load_proposals_into_dataset`` reads it)::

    {"ids": [image id, ...],                  # ints or strings, matched as strings
     "boxes": [np.ndarray (N_i, 4), ...],      # one array per image
     "objectness_logits": [np.ndarray (N_i,), ...],
     "bbox_mode": 0}                          # detectron2's BoxMode: 0 = XYXY_ABS, 1 = XYWH_ABS

Files of the original Detectron (``indexes`` / ``scores`` instead of ``ids`` /
``objectness_logits``, pickled by Python 2) load too, as in detectron2.

A pickle can name any importable function and have the loader call it, so opening
somebody else's ``.pkl`` with :func:`pickle.load` can run arbitrary code. Files are
therefore read by :class:`RestrictedUnpickler`, which resolves only the few globals
that numpy arrays need (array and dtype reconstruction) plus plain containers; any
other global stops the load before it is called, with a :class:`WrnDetError` naming
the file and the refused global. Arrays come only through numpy's own unpickling paths
and with plain dtypes (numbers, strings, objects), so the file's bytes can never be
read as object pointers.
"""
import _compat_pickle
import collections
import os
import pickle
from typing import Dict, List, Optional, Sequence

import numpy as np

from wrn_det.engine.checkpoint import atomic_write
from wrn_det.engine.errors import WrnDetError

__all__ = ["XYXY_ABS", "XYWH_ABS", "RestrictedUnpickler", "safe_load_pickle", "load_proposal_file",
           "save_proposal_file", "load_proposals_into_dataset"]

# detectron2's BoxMode values (detectron2.structures.BoxMode)
XYXY_ABS = 0
XYWH_ABS = 1
_BOX_MODE_NAMES = {0: "XYXY_ABS", 1: "XYWH_ABS", 2: "XYXY_REL", 3: "XYWH_REL", 4: "XYWHA_ABS"}


def _numpy_global(qualname: str):
    """Return the numpy object at ``qualname`` (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    module, _, name = qualname.rpartition(".")
    for prefix in ("numpy._core", "numpy.core"):
        try:
            mod = __import__(f"{prefix}.{module}", fromlist=[name])
            return getattr(mod, name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(qualname)  # pragma: no cover - every supported numpy has these


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles ``bytes`` at protocol < 3 as _codecs.encode(str, "latin1"); only that use is admitted
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only 'latin1' is admitted)")
    return text.encode("latin1")


def _box_mode(value):
    # detectron2 writes ``BoxMode.XYXY_ABS.value``, but a pickled enum member is
    # BoxMode(value); read it as its int without importing detectron2
    if not isinstance(value, int) or value not in _BOX_MODE_NAMES:
        raise pickle.UnpicklingError(f"BoxMode({value!r}) is not a detectron2 box mode")
    return int(value)


# dtypes an array in a proposal file may have: numbers, strings and Python objects (an object
# array's items are unpickled one by one, through this unpickler)
_PLAIN_KINDS = "biufcSUO"


class _Refused(Exception):
    """Raised while unpickling; its message says what was refused ("global os.system", ...)."""


class _NdarrayToken:
    """What the global ``numpy.ndarray`` resolves to: a marker for :func:`_reconstruct`, not callable.

    Calling ``numpy.ndarray(shape, dtype, buffer)`` directly would build an array of any
    dtype over raw bytes from the file, including an object array whose items are raw
    pointers; numpy's own unpickling paths refuse that, so only they are admitted.
    """

    def __call__(self, *args, **kwargs):
        raise _Refused("a direct call of numpy.ndarray (arrays are admitted only through numpy's unpickling)")


_NDARRAY = _NdarrayToken()


def _is_plain_dtype(d) -> bool:
    """Return True if ``d`` is a dtype of one number, string or object: no fields, no subarray, honest flags."""
    return (isinstance(d, np.dtype) and d.fields is None and d.subdtype is None and d.kind in _PLAIN_KINDS
            and d.flags == np.dtype(d.str).flags)


def _plain_dtype(spec, align=False, copy=False):
    # numpy pickles a dtype as dtype(<type code>, align, copy) followed by its state
    if not isinstance(spec, str):
        raise _Refused(f"a dtype built from {type(spec).__name__} {spec!r:.40}")
    d = np.dtype(spec, bool(align), bool(copy))
    if not _is_plain_dtype(d):
        raise _Refused(f"dtype {spec!r} (only plain number, string and object dtypes are admitted)")
    return d


def _check_dtype_state(d: np.dtype, state) -> None:
    # dtype.__setstate__ trusts the flags it is given: a structured dtype whose object field
    # is not flagged would let an array's raw bytes be read as object pointers. Apply the
    # state to a copy first and admit it only if the result is a plain dtype of the same size.
    probe = np.dtype(d, copy=True)
    probe.__setstate__(state)
    if not (_is_plain_dtype(probe) and probe.kind == d.kind and probe.itemsize == d.itemsize):
        raise _Refused(f"a dtype state that turns {d} into {probe!r:.60} (only plain dtypes are admitted)")


def _allowed_globals() -> Dict[tuple, object]:
    """Return {(module, name): object} of every global a proposal file may name."""
    reconstruct = _numpy_global("multiarray._reconstruct")
    scalar = _numpy_global("multiarray.scalar")
    frombuffer = _numpy_global("numeric._frombuffer")

    def safe_reconstruct(subtype, shape, typecode):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by its state
        if subtype is not _NDARRAY:
            raise _Refused(f"_reconstruct of {type(subtype).__name__} (only numpy.ndarray is admitted)")
        return reconstruct(np.ndarray, shape, typecode)

    def safe_frombuffer(buf, dtype, shape, order):
        # protocol-5 pickles of contiguous arrays; numpy refuses object dtypes here itself
        if not _is_plain_dtype(dtype):
            raise _Refused(f"_frombuffer with dtype {dtype!r:.60}")
        return frombuffer(buf, dtype, shape, order)

    def safe_scalar(dtype, obj=None):
        # numpy scalars (an np.int64 image id, say)
        if not _is_plain_dtype(dtype):
            raise _Refused(f"a numpy scalar of dtype {dtype!r:.60}")
        return scalar(dtype) if obj is None else scalar(dtype, obj)

    allowed = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "bytes"): bytes,
        ("builtins", "complex"): complex,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("detectron2.structures.boxes", "BoxMode"): _box_mode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = safe_reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = safe_scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = safe_frombuffer
    return allowed


class RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler that resolves only numpy-array and plain-container globals.

    Strings, numbers, bytes, lists, tuples, dicts and sets need no global and load as
    usual; numpy arrays, dtypes and numpy scalars are rebuilt through numpy's own
    reconstruction functions, for plain dtypes only. Any other global (``os.system``,
    ``builtins.eval``, a class with a malicious ``__reduce__`` ...) raises before anything
    is called, and so does setting the state of anything but an array or a plain dtype.

    It extends Python's pure-Python unpickler (``pickle._Unpickler``): the C one offers no
    hook on the BUILD opcode, which is where a dtype's state would have to be checked.
    """

    _ALLOWED: Optional[Dict[tuple, object]] = None
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        """Return the admitted object for ``module.name``; anything else raises before it is imported."""
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        # Python 2 names (__builtin__, copy_reg ...), mapped as pickle.Unpickler.find_class maps
        # them; no Python 3 module has these names, so the mapping is safe at any protocol
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = RestrictedUnpickler._ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"global {module}.{name}")
        return obj

    def persistent_load(self, pid):
        """Refuse persistent ids (they would need an application-defined loader)."""
        raise _Refused(f"persistent id {pid!r:.40}")

    def load_build(self):
        """Set the state of the object under the top of the stack: an array, or a dtype whose new state is plain."""
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        elif type(inst) is not np.ndarray:
            raise _Refused(f"setting the state of a {type(inst).__name__} object")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def safe_load_pickle(path: str, what: str = "proposal file"):
    """Return the object pickled in ``path``, read through :class:`RestrictedUnpickler`.

    Python 2 pickles are read with ``encoding="latin1"``, as detectron2 does. Raises
    :class:`WrnDetError` (one line naming ``path``) if the file is missing, is not a
    pickle, or names a global other than numpy's array reconstruction.
    """
    if not os.path.isfile(path):
        raise WrnDetError(f"{what} {path} not found")
    try:
        with open(path, "rb") as f:  # read from the file: a COCO proposal file can be gigabytes
            return RestrictedUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise WrnDetError(f"{what} {path}: refused to load {e} (a proposal file may hold only numpy "
                          "arrays, lists, dicts, strings and numbers); nothing from it was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, MemoryError) as e:
        raise WrnDetError(f"{what} {path}: not a readable pickle ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise WrnDetError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def _as_array(path: str, key: str, i: int, value, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise WrnDetError(f"proposal file {path}: {key}[{i}] is {type(value).__name__}; expected an array of "
                          "numbers") from None
    if ndim == 2 and arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != ndim or (ndim == 2 and arr.shape[1] != 4):
        want = "(N, 4)" if ndim == 2 else "(N,)"
        raise WrnDetError(f"proposal file {path}: {key}[{i}] has shape {tuple(arr.shape)}; expected {want}")
    return arr


def load_proposal_file(path: str) -> dict:
    """Read a proposal file in detectron2's format (or the original Detectron's).

    Returns ``{"ids": list, "boxes": list of float32 (N, 4) arrays in XYXY_ABS,
    "objectness_logits": list of float32 (N,) arrays, "bbox_mode": 0}``; XYWH_ABS boxes
    are converted to XYXY_ABS. Raises :class:`WrnDetError` naming the file and the key
    for a refused global, a missing key, lists of different lengths or arrays of the
    wrong shape.
    """
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise WrnDetError(f"proposal file {path} holds a {type(obj).__name__}; expected a dict with keys "
                          "ids, boxes, objectness_logits (and bbox_mode)")
    obj = dict(obj)
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):  # the original Detectron's names
        if old in obj and new not in obj:
            obj[new] = obj.pop(old)
    for key in ("ids", "boxes", "objectness_logits"):
        if key not in obj:
            raise WrnDetError(f"proposal file {path} has no key {key!r}; expected keys ids, boxes, "
                              f"objectness_logits (and bbox_mode), found {sorted(map(str, obj))}")
    for key in ("ids", "boxes", "objectness_logits"):
        if not isinstance(obj[key], (list, tuple, np.ndarray)):
            raise WrnDetError(f"proposal file {path}: {key} is of type {type(obj[key]).__name__}; expected a list with "
                              "one entry per image")
    ids, boxes, logits = (list(obj[k]) for k in ("ids", "boxes", "objectness_logits"))
    if not len(ids) == len(boxes) == len(logits):
        raise WrnDetError(f"proposal file {path}: ids, boxes and objectness_logits have {len(ids)}, {len(boxes)} "
                          f"and {len(logits)} entries; expected one entry per image in each")
    mode = obj.get("bbox_mode", XYXY_ABS)
    mode = int(mode.value) if hasattr(mode, "value") else mode
    if mode not in (XYXY_ABS, XYWH_ABS):
        raise WrnDetError(f"proposal file {path}: bbox_mode {mode!r} ({_BOX_MODE_NAMES.get(mode, 'unknown')}) is not "
                          "supported; expected 0 (XYXY_ABS) or 1 (XYWH_ABS)")
    out_boxes, out_logits = [], []
    for i, (b, s) in enumerate(zip(boxes, logits)):
        b = _as_array(path, "boxes", i, b, 2)
        s = _as_array(path, "objectness_logits", i, s, 1)
        if len(b) != len(s):
            raise WrnDetError(f"proposal file {path}: image {ids[i]!r} has {len(b)} boxes but {len(s)} "
                              "objectness_logits; expected as many of each")
        if mode == XYWH_ABS:
            b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
        out_boxes.append(b)
        out_logits.append(s)
    return {"ids": [i.item() if isinstance(i, np.generic) else i for i in ids], "boxes": out_boxes,
            "objectness_logits": out_logits, "bbox_mode": XYXY_ABS}


def save_proposal_file(path: str, ids: Sequence, boxes: Sequence, objectness_logits: Sequence) -> str:
    """Write proposals to ``path`` in detectron2's format, atomically (temporary file, then rename).

    ``boxes``: one (N, 4) array or tensor per image, XYXY in original-image pixels;
    ``objectness_logits``: one (N,) array or tensor per image. The file uses pickle
    protocol 4 (numpy arrays through ``_reconstruct``), readable by detectron2's
    ``load_proposals_into_dataset`` and by :func:`load_proposal_file`. Returns ``path``.
    """
    if not len(ids) == len(boxes) == len(objectness_logits):
        raise ValueError(f"{len(ids)} ids, {len(boxes)} boxes and {len(objectness_logits)} logit arrays")

    def to_np(x, shape_tail):
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        return np.ascontiguousarray(x, dtype=np.float32).reshape((-1,) + shape_tail)

    data = {
        "ids": [int(i) if isinstance(i, (int, np.integer)) else i for i in ids],
        "boxes": [to_np(b, (4,)) for b in boxes],
        "objectness_logits": [to_np(s, ()) for s in objectness_logits],
        "bbox_mode": XYXY_ABS,
    }

    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)

    atomic_write(path, write, suffix=".tmp")
    return path


def load_proposals_into_dataset(dataset_dicts: List[dict], proposal_file: str) -> List[dict]:
    """Attach the proposals of ``proposal_file`` to every dataset dict (in place, as detectron2).

    Each dict gains ``proposal_boxes`` (float32 (N, 4), XYXY_ABS, original image),
    ``proposal_objectness_logits`` (float32 (N,)), both sorted by decreasing logit, and
    ``proposal_bbox_mode`` (0). Image ids are matched as strings, as detectron2 does.
    Returns ``dataset_dicts``. Raises :class:`WrnDetError` naming the file and the first
    image id that has no entry in it.
    """
    props = load_proposal_file(proposal_file)
    index = {str(i): k for k, i in enumerate(props["ids"])}
    missing = [d["image_id"] for d in dataset_dicts if str(d["image_id"]) not in index]
    if missing:
        raise WrnDetError(f"proposal file {proposal_file} has no proposals for image id {missing[0]!r} "
                          f"({len(missing)} of {len(dataset_dicts)} images missing); expected one entry per image "
                          "of the dataset (was it written for another dataset?)")
    for d in dataset_dicts:
        k = index[str(d["image_id"])]
        logits = props["objectness_logits"][k]
        order = np.argsort(-logits, kind="stable")
        d["proposal_boxes"] = props["boxes"][k][order]
        d["proposal_objectness_logits"] = logits[order]
        d["proposal_bbox_mode"] = XYXY_ABS
    return dataset_dicts
