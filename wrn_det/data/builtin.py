"""The project's dataset registrations: the COCO and Pascal VOC splits under detectron2's names, and shapes.

Run by ``import wrn_det.data`` (as detectron2 registers its builtin datasets on import).
The COCO splits use detectron2's names and paths, rooted at the ``DETECTRON2_DATASETS``
environment variable (default ``datasets``), read when a dataset is loaded, not when this
module is imported::

    coco_2017_train   coco/train2017  coco/annotations/instances_train2017.json
    coco_2014_minival coco/val2014    coco/annotations/instances_minival2014.json  (val5k)
    ...

The Pascal VOC splits likewise (detectron2's ``register_all_pascal_voc``), evaluated with the
VOC metric of their year (2007: 11-point AP, 2012: area AP)::

    voc_2007_trainval  VOC2007  ImageSets/Main/trainval.txt   (also train, val, test)
    voc_2012_trainval  VOC2012  ImageSets/Main/trainval.txt   (also train, val)

plus ``shapes_train`` / ``shapes_val``, the synthetic dataset generated on first use, and
``shapes_voc_train`` / ``shapes_voc_val``, the same images as a VOC tree (``shapes_voc/``,
written on first use; area AP).
"""
import os
from typing import Optional

from . import shapes
from .catalog import DatasetCatalog, MetadataCatalog, datasets_root
from .coco import load_coco_json
from .voc import register_voc_lazily

__all__ = ["BUILTIN_COCO", "BUILTIN_VOC", "SHAPES", "SHAPES_VOC", "shapes_paths"]

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

# name -> (folder under the datasets root, split): detectron2's names and layout
BUILTIN_VOC = {
    "voc_2007_trainval": ("VOC2007", "trainval"),
    "voc_2007_train": ("VOC2007", "train"),
    "voc_2007_val": ("VOC2007", "val"),
    "voc_2007_test": ("VOC2007", "test"),
    "voc_2012_trainval": ("VOC2012", "trainval"),
    "voc_2012_train": ("VOC2012", "train"),
    "voc_2012_val": ("VOC2012", "val"),
}

# name -> split of the synthetic shapes dataset (COCO form), and of its VOC tree
SHAPES = {"shapes_train": "train", "shapes_val": "val"}
SHAPES_VOC = {"shapes_voc_train": "train", "shapes_voc_val": "val"}


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
def _voc_folder(dirname: str):
    return lambda: os.path.join(datasets_root(), dirname)


for _name, _split in SHAPES.items():
    _register_shapes(_name, _split)
for _name, (_dir, _split) in BUILTIN_VOC.items():
    register_voc_lazily(_name, _voc_folder(_dir), _split, 2007 if "2007" in _name else 2012)
for _name, _split in SHAPES_VOC.items():
    register_voc_lazily(_name, shapes.ensure_shapes_voc, _split, 2012, shapes.SHAPES_CLASSES)
