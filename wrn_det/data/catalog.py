"""Dataset catalog for detection, under detectron2's names.

A name maps to a function returning the dataset as a list of dicts (detectron2's
"standard dataset dicts") and to metadata (``json_file``, ``image_root``, class
names, the mapping between COCO category ids and contiguous labels). The COCO
splits are registered under detectron2's names and paths, rooted at the
``DETECTRON2_DATASETS`` environment variable (default ``datasets``), read when a
dataset is loaded, not when this module is imported::

    coco_2017_train   coco/train2017  coco/annotations/instances_train2017.json
    coco_2014_minival coco/val2014    coco/annotations/instances_minival2014.json  (val5k)
    ...

plus ``shapes_train`` / ``shapes_val``, the synthetic dataset generated on first use.
"""
import os
from typing import Callable, Dict, List, Optional

from wrn_det.engine.errors import WrnDetError

__all__ = ["DatasetCatalog", "MetadataCatalog", "register_coco_instances", "get_detection_dataset_dicts",
           "datasets_root", "BUILTIN_COCO"]

# name -> (image folder, annotation file), relative to the datasets root (detectron2's layout)
BUILTIN_COCO = {
    "coco_2014_train": ("coco/train2014", "coco/annotations/instances_train2014.json"),
    "coco_2014_val": ("coco/val2014", "coco/annotations/instances_val2014.json"),
    "coco_2014_minival": ("coco/val2014", "coco/annotations/instances_minival2014.json"),
    "coco_2014_valminusminival": ("coco/val2014", "coco/annotations/instances_valminusminival2014.json"),
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "coco_2017_val_100": ("coco/val2017", "coco/annotations/instances_val2017_100.json"),
}


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
                              "(register your own with wrn_det.data.catalog.register_coco_instances)")
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


def register_coco_instances(name: str, json_file, image_root, metadata: Optional[dict] = None) -> None:
    """Register a COCO-format detection dataset as ``name``.

    ``json_file``: the COCO instances JSON; ``image_root``: the folder its ``file_name``
    entries are relative to. detectron2's argument order ``(name, metadata, json_file,
    image_root)`` is accepted too. Paths are stored as given (a relative path is read
    relative to the working directory at load time). Returns None.
    """
    if isinstance(json_file, dict):  # detectron2's order: (name, metadata, json_file, image_root)
        metadata, json_file, image_root = json_file, image_root, metadata
    from .coco import load_coco_json

    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).update(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                     **(metadata or {}))


def _register_builtin_coco(name: str, image_dir: str, json_rel: str) -> None:
    # the root is read at load time so DETECTRON2_DATASETS can be set after import
    def load():
        from .coco import load_coco_json

        root = datasets_root()
        return load_coco_json(os.path.join(root, json_rel), os.path.join(root, image_dir), name,
                              missing_hint=f"(DETECTRON2_DATASETS={root}); see datasets/README.md for how to "
                                           "download and lay out COCO")

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name)
    meta.update(evaluator_type="coco", json_rel=json_rel, image_dir=image_dir)


def _register_shapes(name: str, split: str) -> None:
    def load():
        from .coco import load_coco_json
        from .shapes import ensure_shapes

        folder = ensure_shapes()
        return load_coco_json(*shapes_paths(split, folder), name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).update(evaluator_type="coco", shapes_split=split)


def shapes_paths(split: str, folder: Optional[str] = None):
    """Return ``(json_file, image_root)`` of a shapes split under ``folder`` (default: the current root)."""
    from .shapes import shapes_root

    folder = folder or shapes_root()
    return os.path.join(folder, "annotations", f"instances_{split}.json"), os.path.join(folder, split)


def resolve_json_file(name: str) -> str:
    """Return the COCO JSON path behind dataset ``name`` (generating the shapes data if needed)."""
    meta = MetadataCatalog.get(name)
    if "json_file" in meta:
        return meta["json_file"]
    if "json_rel" in meta:
        return os.path.join(datasets_root(), meta["json_rel"])
    if "shapes_split" in meta:
        from .shapes import ensure_shapes

        return shapes_paths(meta["shapes_split"], ensure_shapes())[0]
    raise WrnDetError(f"dataset {name!r} has no COCO JSON file; COCO evaluation needs one "
                      "(register it with register_coco_instances)")


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
            from .proposals import load_proposals_into_dataset

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


for _name, (_img, _json) in BUILTIN_COCO.items():
    _register_builtin_coco(_name, _img, _json)
_register_shapes("shapes_train", "train")
_register_shapes("shapes_val", "val")
