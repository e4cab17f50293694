"""Reading COCO instances JSON (with pycocotools) into detectron2-style dataset dicts.

Each image becomes ``{"file_name", "height", "width", "image_id", "annotations"}`` and
each annotation ``{"bbox": [x, y, w, h], "bbox_mode": 1 (XYWH_ABS), "category_id":
contiguous label, "iscrowd"}``. Category ids are mapped to contiguous labels
0..K-1 in the order of their ids; the mapping (and its inverse, for writing results)
is stored in the dataset's metadata. Malformed input is reported in one line naming
the file, the annotation and the value.
"""
import contextlib
import io
import json
import os
from typing import List, Optional

from wrn_det.engine.errors import WrnDetError

from .catalog import DatasetCatalog, MetadataCatalog

__all__ = ["load_coco_json", "register_coco_instances", "XYWH_ABS"]

XYWH_ABS = 1  # detectron2's BoxMode.XYWH_ABS


def _load_coco_api(json_file: str):
    from pycocotools.coco import COCO

    # pycocotools prints progress to stdout; keep the log readable
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(json_file)
        except json.JSONDecodeError as e:
            raise WrnDetError(f"{json_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except (KeyError, TypeError, AssertionError) as e:
            raise WrnDetError(f"{json_file}: not a COCO instances file ({type(e).__name__}: {e})") from None


def load_coco_json(json_file: str, image_root: str, dataset_name: Optional[str] = None,
                   missing_hint: str = "") -> List[dict]:
    """Return the dataset dicts of a COCO instances file, one per image, in image-id order.

    Sets ``thing_classes``, ``thing_dataset_id_to_contiguous_id`` and
    ``contiguous_id_to_thing_dataset_id``, ``json_file`` and ``image_root`` in the metadata
    of ``dataset_name``. Raises :class:`WrnDetError` for a missing file, a box with a
    negative width or height, or a category id not listed under ``categories``.
    """
    if not os.path.isfile(json_file):
        name = f"dataset {dataset_name!r}: " if dataset_name else ""
        raise WrnDetError(f"{name}annotation file {json_file} not found {missing_hint}".strip())
    coco = _load_coco_api(json_file)
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).update(
            thing_classes=[c["name"] for c in cats],
            thing_dataset_id_to_contiguous_id=id_map,
            contiguous_id_to_thing_dataset_id={v: k for k, v in id_map.items()},
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
    dicts = []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": img_id,
        }
        objs = []
        for ann in coco.imgToAnns.get(img_id, []):
            where = f"{json_file}: annotation id {ann.get('id')} (image id {img_id})"
            bbox = ann.get("bbox")
            if bbox is None or len(bbox) != 4:
                raise WrnDetError(f"{where} has bbox {bbox!r}; expected [x, y, width, height]")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise WrnDetError(f"{where} has a box of negative {'width' if w < 0 else 'height'} "
                                  f"(bbox {bbox}); expected [x, y, width, height] with width, height >= 0")
            cid = ann.get("category_id")
            if cid not in id_map:
                raise WrnDetError(f"{where} has category id {cid!r}, which is not in the file's 'categories' "
                                  f"(ids {sorted(id_map)})")
            if w == 0 or h == 0:
                continue  # an empty box carries no signal for training or evaluation
            objs.append({"bbox": [x, y, w, h], "bbox_mode": XYWH_ABS, "category_id": id_map[cid],
                         "iscrowd": int(ann.get("iscrowd", 0))})
        record["annotations"] = objs
        dicts.append(record)
    return dicts


def register_coco_instances(name: str, json_file, image_root, metadata: Optional[dict] = None) -> None:
    """Register a COCO-format detection dataset as ``name`` (detectron2's function of the same name).

    ``json_file``: the COCO instances JSON; ``image_root``: the folder its ``file_name``
    entries are relative to. detectron2's argument order ``(name, metadata, json_file,
    image_root)`` is accepted too. Paths are stored as given (a relative path is read
    relative to the working directory at load time). Returns None.
    """
    if isinstance(json_file, dict):  # detectron2's order: (name, metadata, json_file, image_root)
        metadata, json_file, image_root = json_file, image_root, metadata
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).update(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                     **(metadata or {}))
