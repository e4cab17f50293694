"""Reading COCO instances JSON into detectron2-style dataset dicts, every entry checked.

Each image becomes ``{"file_name", "height", "width", "image_id", "annotations"}`` and
each annotation ``{"bbox": [x, y, w, h], "bbox_mode": 1 (XYWH_ABS), "category_id":
contiguous label, "iscrowd"}``. Category ids are mapped to contiguous labels
0..K-1 in the order of their ids; the mapping (and its inverse, for writing results)
is stored in the dataset's metadata. Malformed input is reported in one line naming
the file, the annotation and the value.
"""
import logging
import math
import os
from typing import Dict, List, Optional, Tuple

from wrn_det.engine.errors import WrnDetError, a_type
from wrn_det.engine.fileio import read_json

from .catalog import DatasetCatalog, MetadataCatalog

__all__ = ["load_coco_json", "read_coco_file", "register_coco_instances", "XYWH_ABS"]

logger = logging.getLogger("wrn_det")

XYWH_ABS = 1  # detectron2's BoxMode.XYWH_ABS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_coco_file(json_file: str, data=None) -> Tuple[Dict[int, dict], Dict[int, dict], List[dict], Dict[str, int]]:
    """Read and check a COCO instances file: the one reader of COCO JSON, for training and evaluation.

    Returns ``(images by id, categories by id, annotations, dropped counts)``. Every image
    needs an integer ``id`` (unique), a ``file_name`` and positive integer ``height`` and
    ``width``; every category an integer ``id`` (unique) and a ``name``; every annotation
    an ``image_id`` and ``category_id`` the file lists and a ``bbox`` of four finite numbers,
    width and height >= 0, overlapping its image. Any other content raises
    :class:`WrnDetError` naming the file, the image or annotation id and what was expected.
    Empty boxes (width or height 0) are dropped and counted, as detectron2 drops them.
    ``data``: the file's content when the caller has read it already (it is not changed).
    """
    if data is None:
        data = read_json(json_file)
    if not isinstance(data, dict):
        raise WrnDetError(f"{json_file}: holds {a_type(data)}; expected a COCO object with 'images', 'annotations' "
                          "and 'categories'")
    for key in ("images", "categories"):
        if key not in data:
            raise WrnDetError(f"{json_file}: has no {key!r} list; expected a COCO instances file with 'images', "
                              "'annotations' and 'categories'")
    anns = data.get("annotations", [])
    for key, value in (("images", data["images"]), ("categories", data["categories"]), ("annotations", anns)):
        if not isinstance(value, list):
            raise WrnDetError(f"{json_file}: {key!r} is {a_type(value)}; expected a list")
    images: Dict[int, dict] = {}
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise WrnDetError(f"{json_file}: images[{n}] is {a_type(img)}; expected an object")
        iid = img.get("id")
        if not _is_int(iid):
            raise WrnDetError(f"{json_file}: images[{n}] has id {iid!r}; expected an integer")
        where = f"{json_file}: image id {iid}"
        if iid in images:
            raise WrnDetError(f"{where} is listed twice (images[{n}]); expected unique image ids")
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise WrnDetError(f"{where} has file_name {name!r}; expected the image's path under the image folder")
        for key in ("height", "width"):
            v = img.get(key)
            if not _is_int(v) or v <= 0:
                raise WrnDetError(f"{where} has {key} {v!r}; expected a positive integer (pixels)")
        images[iid] = img
    categories: Dict[int, dict] = {}
    for n, cat in enumerate(data["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cid):
            raise WrnDetError(f"{json_file}: categories[{n}] has id {cid!r}; expected an object with an integer id")
        if cid in categories:
            raise WrnDetError(f"{json_file}: category id {cid} is listed twice; expected unique category ids")
        if not isinstance(cat.get("name"), str):
            raise WrnDetError(f"{json_file}: category id {cid} has name {cat.get('name')!r}; expected a string")
        categories[cid] = cat
    if not categories:
        raise WrnDetError(f"{json_file}: 'categories' is empty; expected the list of the object classes")
    kept, seen, dropped = [], set(), {"empty boxes": 0}
    for n, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise WrnDetError(f"{json_file}: annotations[{n}] is {a_type(ann)}; expected an object")
        aid = ann.get("id", f"at index {n}")
        where = f"{json_file}: annotation id {aid}"
        if _is_int(aid):
            if aid in seen:
                raise WrnDetError(f"{where} is listed twice; expected unique annotation ids")
            seen.add(aid)
        iid = ann.get("image_id")
        if iid not in images or not _is_int(iid):
            raise WrnDetError(f"{where} has image_id {iid!r}, which names no image of the file")
        where += f" (image id {iid})"
        cid = ann.get("category_id")
        if not _is_int(cid) or cid not in categories:
            raise WrnDetError(f"{where} has category id {cid!r}, which is not in the file's 'categories' "
                              f"(ids {sorted(categories)})")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise WrnDetError(f"{where} has bbox {bbox!r:.80}; expected [x, y, width, height], four numbers")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h)):
            raise WrnDetError(f"{where} has bbox {bbox}; expected finite numbers (no NaN or infinity)")
        if w < 0 or h < 0:
            raise WrnDetError(f"{where} has a box of negative {'width' if w < 0 else 'height'} "
                              f"(bbox {bbox}); expected [x, y, width, height] with width, height >= 0")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise WrnDetError(f"{where} has iscrowd {crowd!r}; expected 0 or 1")
        if w == 0 or h == 0:
            dropped["empty boxes"] += 1  # no signal for training or evaluation
            continue
        W, H = images[iid]["width"], images[iid]["height"]
        if x >= W or y >= H or x + w <= 0 or y + h <= 0:
            raise WrnDetError(f"{where} has bbox {bbox}, entirely outside its {W}x{H} image; expected a box that "
                              "overlaps the image")
        kept.append(ann)
    return images, categories, kept, dropped


def load_coco_json(json_file: str, image_root: str, dataset_name: Optional[str] = None,
                   missing_hint: str = "") -> List[dict]:
    """Return the dataset dicts of a COCO instances file, one per image, in image-id order.

    The file is read and checked by :func:`read_coco_file`. Sets ``thing_classes``,
    ``thing_dataset_id_to_contiguous_id`` and ``contiguous_id_to_thing_dataset_id``,
    ``json_file`` and ``image_root`` in the metadata of ``dataset_name``. Raises
    :class:`WrnDetError` (one line naming the file and the entry) for a missing file or
    malformed content.
    """
    if not os.path.isfile(json_file):
        name = f"dataset {dataset_name!r}: " if dataset_name else ""
        raise WrnDetError(f"{name}annotation file {json_file} not found {missing_hint}".strip())
    images, categories, anns, dropped = read_coco_file(json_file)
    cats = [categories[c] for c in sorted(categories)]
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
    by_image: Dict[int, List[dict]] = {}
    for ann in anns:
        x, y, w, h = (float(v) for v in ann["bbox"])
        by_image.setdefault(ann["image_id"], []).append(
            {"bbox": [x, y, w, h], "bbox_mode": XYWH_ABS, "category_id": id_map[ann["category_id"]],
             "iscrowd": int(ann.get("iscrowd", 0))})
    if dropped["empty boxes"]:
        logger.info("%s: dropped %d annotations with an empty box (width or height 0)", json_file,
                    dropped["empty boxes"])
    return [{"file_name": os.path.join(image_root, images[i]["file_name"]), "height": images[i]["height"],
             "width": images[i]["width"], "image_id": i, "annotations": by_image.get(i, [])} for i in sorted(images)]


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
