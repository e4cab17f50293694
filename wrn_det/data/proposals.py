"""Precomputed proposal files in detectron2's format, read without running anything.

A proposal file is a pickle of a dict (as detectron2's ``COCOEvaluator`` writes
``box_proposals.pkl`` and ``load_proposals_into_dataset`` reads it)::

    {"ids": [image id, ...],                  # ints or strings, matched as strings
     "boxes": [np.ndarray (N_i, 4), ...],      # one array per image
     "objectness_logits": [np.ndarray (N_i,), ...],
     "bbox_mode": 0}                          # detectron2's BoxMode: 0 = XYXY_ABS, 1 = XYWH_ABS

Files of the original Detectron (``indexes`` / ``scores`` instead of ``ids`` /
``objectness_logits``, pickled by Python 2) load too, as in detectron2.

A pickle can run code when it is opened, so proposal files are read through the
project's restricted unpickler (:func:`wrn_det.engine.safe_pickle.safe_load_pickle`):
numpy arrays of plain dtypes and plain containers only; anything else is refused before
it runs, with one line naming the file and what was refused.
"""
import pickle
from typing import List, Sequence

import numpy as np

from wrn_det.engine.fileio import atomic_write
from wrn_det.engine.errors import WrnDetError, a_type
from wrn_det.engine.safe_pickle import safe_load_pickle

__all__ = ["XYXY_ABS", "XYWH_ABS", "load_proposal_file", "save_proposal_file", "load_proposals_into_dataset"]

# detectron2's BoxMode values (detectron2.structures.BoxMode)
XYXY_ABS = 0
XYWH_ABS = 1
_BOX_MODE_NAMES = {0: "XYXY_ABS", 1: "XYWH_ABS", 2: "XYXY_REL", 3: "XYWH_REL", 4: "XYWHA_ABS"}


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


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    # torch only here: the catalog imports this module, and importing the datasets stays free of torch
    import torch
    from torchvision.ops import box_convert

    return box_convert(torch.tensor(boxes), "xywh", "xyxy").numpy()


def load_proposal_file(path: str) -> dict:
    """Read a proposal file in detectron2's format (or the original Detectron's).

    Returns ``{"ids": list, "boxes": list of float32 (N, 4) arrays in XYXY_ABS,
    "objectness_logits": list of float32 (N,) arrays, "bbox_mode": 0}``; XYWH_ABS boxes
    are converted to XYXY_ABS. Raises :class:`WrnDetError` naming the file and the key
    for a refused global, a missing key, lists of different lengths or arrays of the
    wrong shape.
    """
    obj = safe_load_pickle(path, "proposal file")
    if not isinstance(obj, dict):
        raise WrnDetError(f"proposal file {path} holds {a_type(obj)}; expected a dict with keys "
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
            b = _xywh_to_xyxy(b)
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
