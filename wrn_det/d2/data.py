"""The project's datasets in detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.

Every name of :mod:`wrn_det.data.catalog` that detectron2 does not already know
(``shapes_train``, ``shapes_val``, anything registered with the project's
``register_coco_instances``) is registered in detectron2's catalogs with a loader that
calls the project's: the same files, the same checks and one-line errors, the same
contiguous class ids. The metadata detectron2's evaluators need (``json_file``,
``thing_classes``, ``thing_dataset_id_to_contiguous_id`` for COCO; ``dirname``, ``split``, ``year``
for Pascal VOC) is copied over when the dataset is loaded. The COCO splits (``coco_2017_train``, ...) keep detectron2's own
registration, which uses the same names and the same ``DETECTRON2_DATASETS`` layout.
"""
from typing import Callable, List, Optional

from detectron2.data import DatasetCatalog as D2DatasetCatalog
from detectron2.data import MetadataCatalog as D2MetadataCatalog
from detectron2.structures import BoxMode

from wrn_det.data import catalog, coco

__all__ = ["register_datasets", "register_coco_instances", "sync_metadata"]

# the metadata detectron2's loaders, mappers and COCOEvaluator read
_METADATA_KEYS = ("thing_classes", "thing_dataset_id_to_contiguous_id", "json_file", "image_root", "evaluator_type",
                  "dirname", "split", "year")


def sync_metadata(name: str) -> None:
    """Copy the project's metadata of ``name`` into detectron2's ``MetadataCatalog``.

    detectron2's metadata refuses to change a value once set; when the project's value
    changed (another ``DETECTRON2_DATASETS`` root, say), the old detectron2 metadata is
    dropped and written anew.
    """
    src = catalog.MetadataCatalog.get(name)
    values = {k: src[k] for k in _METADATA_KEYS if k in src}
    dst = D2MetadataCatalog.get(name)
    if any(dst.get(k) is not None and dst.get(k) != v for k, v in values.items()):
        D2MetadataCatalog.remove(name)
        dst = D2MetadataCatalog.get(name)
    dst.set(**{k: v for k, v in values.items() if dst.get(k) is None})


def _loader(name: str) -> Callable[[], List[dict]]:
    def load() -> List[dict]:
        dicts = catalog.DatasetCatalog.get(name)
        sync_metadata(name)
        for record in dicts:
            for ann in record.get("annotations", []):
                ann["bbox_mode"] = BoxMode(ann["bbox_mode"])
        return dicts

    return load


def register_datasets() -> List[str]:
    """Register in detectron2 every project dataset it does not know yet; returns the names added."""
    added = []
    for name in catalog.DatasetCatalog.list():
        if name in D2DatasetCatalog.list():
            continue
        D2DatasetCatalog.register(name, _loader(name))
        # COCO files, or Pascal VOC folders (the project's VOC datasets: detectron2's own VOC names keep its loader)
        D2MetadataCatalog.get(name).set(evaluator_type=catalog.MetadataCatalog.get(name).get("evaluator_type", "coco"))
        added.append(name)
    return added


def register_coco_instances(name: str, metadata: Optional[dict], json_file: str, image_root: str) -> None:
    """Register a COCO-format dataset in the project's catalog and in detectron2's (detectron2's argument order).

    Loading it through either engine reads the same files with the project's checks.
    Returns None.
    """
    coco.register_coco_instances(name, json_file, image_root, metadata or {})
    register_datasets()
