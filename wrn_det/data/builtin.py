"""The project's dataset registrations: the COCO splits under detectron2's names, and shapes.

Run by ``import wrn_det.data`` (as detectron2 registers its builtin datasets on import).
The COCO splits use detectron2's names and paths, rooted at the ``DETECTRON2_DATASETS``
environment variable (default ``datasets``), read when a dataset is loaded, not when this
module is imported::

    coco_2017_train   coco/train2017  coco/annotations/instances_train2017.json
    coco_2014_minival coco/val2014    coco/annotations/instances_minival2014.json  (val5k)
    ...

plus ``shapes_train`` / ``shapes_val``, the synthetic dataset generated on first use.
"""
import os
from typing import Optional

from . import shapes
from .catalog import DatasetCatalog, MetadataCatalog, datasets_root
from .coco import load_coco_json

__all__ = ["BUILTIN_COCO", "SHAPES", "shapes_paths"]

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

# name -> split of the synthetic shapes dataset
SHAPES = {"shapes_train": "train", "shapes_val": "val"}


def shapes_paths(split: str, folder: Optional[str] = None):
    """Return ``(json_file, image_root)`` of a shapes split under ``folder`` (default: the current root)."""
    folder = folder or shapes.shapes_root()
    return os.path.join(folder, "annotations", f"instances_{split}.json"), os.path.join(folder, split)


def _register_builtin_coco(name: str, image_dir: str, json_rel: str) -> None:
    # the root is read at load time so DETECTRON2_DATASETS can be set after import
    def load():
        root = datasets_root()
        return load_coco_json(os.path.join(root, json_rel), os.path.join(root, image_dir), name,
                              missing_hint=f"(DETECTRON2_DATASETS={root}); see datasets/README.md for how to "
                                           "download and lay out COCO")

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).update(evaluator_type="coco",
                                     json_file_fn=lambda: os.path.join(datasets_root(), json_rel))


def _register_shapes(name: str, split: str) -> None:
    def load():
        return load_coco_json(*shapes_paths(split, shapes.ensure_shapes()), name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).update(evaluator_type="coco",
                                     json_file_fn=lambda: shapes_paths(split, shapes.ensure_shapes())[0])


for _name, (_img, _json) in BUILTIN_COCO.items():
    _register_builtin_coco(_name, _img, _json)
for _name, _split in SHAPES.items():
    _register_shapes(_name, _split)
