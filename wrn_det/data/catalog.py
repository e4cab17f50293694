"""Dataset catalog for detection, under detectron2's names.

A name maps to a function returning the dataset as a list of dicts (detectron2's
"standard dataset dicts") and to metadata (``json_file``, ``image_root``, class
names, the mapping between COCO category ids and contiguous labels). This module
holds only the catalogs and what reads them; the readers live in
:mod:`wrn_det.data.coco` (``register_coco_instances``) and the project's own
registrations (the COCO splits under detectron2's names, the shapes dataset) in
:mod:`wrn_det.data.builtin`, which ``import wrn_det.data`` runs.
"""
import os
from typing import Callable, Dict, List

from wrn_det.engine.errors import WrnDetError

from .proposals import load_proposals_into_dataset

__all__ = ["DatasetCatalog", "MetadataCatalog", "get_detection_dataset_dicts", "resolve_json_file", "datasets_root"]


def datasets_root() -> str:
    """Return the datasets root: ``$DETECTRON2_DATASETS``, or ``datasets`` when unset."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


class _Metadata(dict):
    """Metadata of one dataset: a dict whose keys also read as attributes (``meta.thing_classes``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _DatasetCatalog:
    """Name -> function returning the dataset dicts; ``get`` calls it."""

    def __init__(self):
        self._fns: Dict[str, Callable[[], List[dict]]] = {}

    def register(self, name: str, fn: Callable[[], List[dict]]) -> None:
        """Register ``fn`` under ``name``; a name can be registered once."""
        if name in self._fns:
            raise WrnDetError(f"dataset {name!r} is already registered")
        self._fns[name] = fn

    def get(self, name: str) -> List[dict]:
        """Return the dataset dicts of ``name`` (calls its loader)."""
        if name not in self._fns:
            raise WrnDetError(f"dataset {name!r} is not registered; known datasets: {', '.join(sorted(self._fns))} "
                              "(register your own with wrn_det.data.coco.register_coco_instances)")
        return self._fns[name]()

    def list(self) -> List[str]:
        """Return the registered names."""
        return sorted(self._fns)

    def remove(self, name: str) -> None:
        """Forget ``name`` (its metadata stays in MetadataCatalog)."""
        self._fns.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._fns


class _MetadataCatalog:
    """Name -> metadata, created empty on first access."""

    def __init__(self):
        self._meta: Dict[str, _Metadata] = {}

    def get(self, name: str) -> _Metadata:
        """Return the (mutable) metadata of ``name``."""
        return self._meta.setdefault(name, _Metadata(name=name))

    def remove(self, name: str) -> None:
        """Forget the metadata of ``name``."""
        self._meta.pop(name, None)


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()


def resolve_json_file(name: str) -> str:
    """Return the COCO JSON path behind dataset ``name``.

    Read from the metadata's ``json_file``, or from ``json_file_fn()`` for datasets whose
    path is decided when they are used (the builtin COCO splits read ``DETECTRON2_DATASETS``
    then, the shapes dataset is generated then). Raises :class:`WrnDetError` for a dataset
    without a COCO file.
    """
    meta = MetadataCatalog.get(name)
    if "json_file" in meta:
        return meta["json_file"]
    if "json_file_fn" in meta:
        return meta["json_file_fn"]()
    raise WrnDetError(f"dataset {name!r} has no COCO JSON file; COCO evaluation needs one "
                      "(register it with wrn_det.data.coco.register_coco_instances)")


def get_detection_dataset_dicts(names, filter_empty: bool = True, proposal_files=None,
                                proposal_key: str = "DATASETS.PROPOSAL_FILES_TRAIN") -> List[dict]:
    """Return the concatenated dataset dicts of ``names``.

    With ``proposal_files`` (one per name, as detectron2's ``DATASETS.PROPOSAL_FILES_*``),
    every image gets the precomputed proposals of its dataset's file (see
    :func:`wrn_det.data.proposals.load_proposals_into_dataset`); ``proposal_key`` names
    the config key in errors. With ``filter_empty``, images without any non-crowd box
    are dropped (detectron2's ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``). Raises
    :class:`WrnDetError` if nothing is left or the proposal files do not fit.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise WrnDetError("no dataset given (DATASETS.TRAIN / DATASETS.TEST is empty)")
    if proposal_files is not None and len(proposal_files) != len(names):
        raise WrnDetError(f"{proposal_key} has {len(proposal_files)} file(s) for {len(names)} dataset(s) "
                          f"({', '.join(names)}); expected one proposal file per dataset")
    dicts = []
    for i, n in enumerate(names):
        part = DatasetCatalog.get(n)
        if proposal_files is not None:
            try:
                part = load_proposals_into_dataset(part, proposal_files[i])
            except WrnDetError as e:
                raise WrnDetError(f"{proposal_key} (dataset {n}): {e}") from None
        dicts.extend(part)
    if filter_empty:
        dicts = [d for d in dicts if any(a.get("iscrowd", 0) == 0 for a in d.get("annotations", []))]
    if not dicts:
        raise WrnDetError(f"dataset(s) {', '.join(names)} hold no image with a usable box")
    return dicts


