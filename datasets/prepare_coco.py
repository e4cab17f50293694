#!/usr/bin/env python
"""Check a COCO folder for the detection catalog and build the 2014 val5k split files.

    python datasets/prepare_coco.py                      # $DETECTRON2_DATASETS/coco (default datasets/coco)
    python datasets/prepare_coco.py --root /data/coco    # another COCO folder
    python datasets/prepare_coco.py --check-only         # report, write nothing
    python datasets/prepare_coco.py --datasets coco_2017_train coco_2017_val --check-images

It prints, for every COCO name of the catalog (``coco_2017_train``, ...,
``coco_2014_minival``), whether its annotation file and image folder are present,
and where a missing one comes from. It then builds, unless they exist
(``--force`` rebuilds):

- ``annotations/instances_minival2014.json``: the val2014 images whose ids are in
  ``instances_val2017.json`` (the 5,000-image "val5k" of the Fast/Faster R-CNN papers
  and detectron2's ``coco_2014_minival``) with their annotations;
- ``annotations/instances_valminusminival2014.json``: the rest of val2014 (the
  "valminusminival" that, added to train2014, gives trainval35k).

Both are written to temporary files and renamed only when both are complete. The
exit status is 0 when the datasets named by ``--datasets`` (default: the two val5k
names) are complete, otherwise 2, after one ``error:`` line naming every missing piece.
"""
import argparse
import json
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.data.builtin import BUILTIN_COCO  # noqa: E402
from wrn_det.data.catalog import datasets_root  # noqa: E402
from wrn_det.engine.cli import cli_main  # noqa: E402
from wrn_det.engine.errors import WrnDetError  # noqa: E402
from wrn_det.engine.fileio import atomic_write_all  # noqa: E402

VAL2014 = "annotations/instances_val2014.json"
VAL2017 = "annotations/instances_val2017.json"
MINIVAL = "annotations/instances_minival2014.json"
VALMINUS = "annotations/instances_valminusminival2014.json"
DEFAULT_DATASETS = ("coco_2014_minival", "coco_2014_valminusminival")

# where each file or folder comes from, for the "missing" messages
_SOURCES = {
    "annotations/instances_train2017.json": "annotations_trainval2017.zip",
    VAL2017: "annotations_trainval2017.zip",
    "annotations/instances_train2014.json": "annotations_trainval2014.zip",
    VAL2014: "annotations_trainval2014.zip",
    MINIVAL: f"built by this script from {VAL2014} and {VAL2017}",
    VALMINUS: f"built by this script from {VAL2014} and {VAL2017}",
    "annotations/instances_val2017_100.json": "https://dl.fbaipublicfiles.com/detectron2/annotations/coco/"
                                              "instances_val2017_100.json",
    "train2017": "train2017.zip", "val2017": "val2017.zip", "train2014": "train2014.zip", "val2014": "val2014.zip",
}


def catalog_layout():
    """Return {dataset name: (image folder, annotation file)}, relative to the COCO folder, as the catalog reads them."""
    def strip(p):
        return p[len("coco/"):] if p.startswith("coco/") else p

    return OrderedDict((name, (strip(img), strip(ann))) for name, (img, ann) in BUILTIN_COCO.items())


def _describe(rel: str) -> str:
    src = _SOURCES.get(rel)
    return f"{rel} ({'from ' + src if src and src.endswith('.zip') else src})" if src else rel


def _read_coco(path: str) -> dict:
    """Return the parsed COCO instances JSON at ``path``; raises WrnDetError naming the file if it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WrnDetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise WrnDetError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise WrnDetError(f"{path}: not a COCO instances file (expected a JSON object with lists 'images' and "
                          "'annotations')")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise WrnDetError(f"{path}: images[{i}] has no 'id'; expected COCO image entries")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise WrnDetError(f"{path}: annotations[{i}] has no 'image_id'; expected COCO annotations")
    return data


def split_val2014(val2014: dict, val2017_ids) -> tuple:
    """Split val2014 by image id into (minival, valminusminival), two COCO dicts.

    minival holds the val2014 images whose id is in ``val2017_ids`` and their
    annotations; valminusminival holds the others. Both keep val2014's image order and
    its ``info``, ``licenses`` and ``categories``. Returns the two dicts.
    """
    val2017_ids = set(val2017_ids)
    common = {k: v for k, v in val2014.items() if k not in ("images", "annotations")}
    parts = []
    for inside in (True, False):
        images = [im for im in val2014["images"] if (im["id"] in val2017_ids) == inside]
        ids = {im["id"] for im in images}
        anns = [a for a in val2014["annotations"] if a["image_id"] in ids]
        parts.append({**common, "images": images, "annotations": anns})
    return tuple(parts)


def _write_json_files_atomically(items) -> None:
    """Write every ``(path, data)`` through the project's atomic writer, all or none; returns None.

    On any error no target is touched, so a failed run never leaves a half-written split behind.
    """
    def writer(data):
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(data, f, separators=(",", ":"))

        return write

    atomic_write_all([(path, writer(data)) for path, data in items])


def build_minival(root: str, force: bool = False, log=print) -> bool:
    """Build the minival2014 / valminusminival2014 files under ``root`` from val2014 and val2017's image ids.

    Returns True if the files were written, False if they existed already (and not
    ``force``). Raises :class:`WrnDetError` naming a missing or malformed input file.
    """
    out_min, out_rest = os.path.join(root, MINIVAL), os.path.join(root, VALMINUS)
    if not force and os.path.isfile(out_min) and os.path.isfile(out_rest):
        log(f"{MINIVAL} and {VALMINUS} exist; kept (--force rebuilds them)")
        return False
    missing = [_describe(p) for p in (VAL2014, VAL2017) if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise WrnDetError(f"cannot build {MINIVAL} and {VALMINUS}: missing {' and '.join(missing)} in {root}")
    val2014 = _read_coco(os.path.join(root, VAL2014))
    val2017_ids = {im["id"] for im in _read_coco(os.path.join(root, VAL2017))["images"]}
    minival, rest = split_val2014(val2014, val2017_ids)
    if not minival["images"]:
        raise WrnDetError(f"{os.path.join(root, VAL2017)}: none of its {len(val2017_ids)} image ids is in "
                          f"{os.path.join(root, VAL2014)}; expected val2017's images to be a subset of val2014's")
    outside = len(val2017_ids) - len(minival["images"])
    if outside:
        log(f"warning: {outside} of the {len(val2017_ids)} val2017 image ids are not in {VAL2014}; "
            "minival holds the others")
    _write_json_files_atomically([(out_min, minival), (out_rest, rest)])
    log(f"wrote {MINIVAL}: {len(minival['images'])} images, {len(minival['annotations'])} annotations")
    log(f"wrote {VALMINUS}: {len(rest['images'])} images, {len(rest['annotations'])} annotations")
    return True


def _image_files_missing(root: str, ann_rel: str, img_rel: str) -> int:
    """Return how many images listed in ``ann_rel`` are absent from ``img_rel`` (-1 if the JSON is absent)."""
    path = os.path.join(root, ann_rel)
    if not os.path.isfile(path):
        return -1
    present = set(os.listdir(os.path.join(root, img_rel)))
    return sum(1 for im in _read_coco(path)["images"] if im.get("file_name") not in present)


def check(root: str, check_images=()) -> "OrderedDict[str, list]":
    """Return {dataset name: list of missing pieces (empty when complete)} for every COCO name of the catalog.

    A piece is an annotation file, an image folder (absent or empty) or, for the names in
    ``check_images``, image files listed in the annotation file but absent from the folder.
    """
    status = OrderedDict()
    for name, (img_rel, ann_rel) in catalog_layout().items():
        miss = []
        if not os.path.isfile(os.path.join(root, ann_rel)):
            if ann_rel in (MINIVAL, VALMINUS):
                inputs = [_describe(p) for p in (VAL2014, VAL2017) if not os.path.isfile(os.path.join(root, p))]
                miss.append(f"{ann_rel}, built from {VAL2014} and {VAL2017}: missing {' and '.join(inputs)}"
                            if inputs else f"{ann_rel} (run without --check-only to build it)")
            else:
                miss.append(_describe(ann_rel))
        img_dir = os.path.join(root, img_rel)
        if not os.path.isdir(img_dir):
            miss.append(f"image folder {_describe(img_rel)}")
        elif not os.listdir(img_dir):
            miss.append(f"the images in {_describe(img_rel)} (the folder is empty)")
        elif name in check_images:
            n = _image_files_missing(root, ann_rel, img_rel)
            if n > 0:
                miss.append(f"{n} image files of {ann_rel} in {img_rel}")
        status[name] = miss
    return status


def main(argv=None) -> int:
    """Check the COCO folder, build the val5k split files, report; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="the COCO folder (default: $DETECTRON2_DATASETS/coco, i.e. datasets/coco)")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), metavar="NAME",
                        help=f"catalog names that must be complete for exit status 0 (default: {' '.join(DEFAULT_DATASETS)})")
    parser.add_argument("--check-only", action="store_true", help="report only; write nothing")
    parser.add_argument("--force", action="store_true", help="rebuild the minival files even if they exist")
    parser.add_argument("--check-images", action="store_true",
                        help="also check that every image file listed in the annotations of --datasets is present")
    args = parser.parse_args(argv)
    layout = catalog_layout()
    unknown = [n for n in args.datasets if n not in layout]
    if unknown:
        raise WrnDetError(f"--datasets: {', '.join(unknown)} not a COCO name of the catalog; expected any of "
                          f"{', '.join(layout)}")
    root = args.root or os.path.join(datasets_root(), "coco")
    if not os.path.isdir(root):
        where = "" if args.root else f" (DETECTRON2_DATASETS={datasets_root()})"
        raise WrnDetError(f"COCO folder {root} does not exist{where}; expected annotations/ and the image folders "
                          "there (see datasets/README.md)")
    print(f"COCO folder: {os.path.abspath(root)}")
    build_error = None
    if not args.check_only:
        try:
            build_minival(root, force=args.force)
        except WrnDetError as e:
            build_error = str(e)  # missing inputs show in the table and the final line
    status = check(root, set(args.datasets) if args.check_images else ())
    width = max(len(n) for n in status)
    for name, miss in status.items():
        print(f"  {name.ljust(width)}  {'ok' if not miss else 'missing ' + '; '.join(miss)}")
    incomplete = [(n, status[n]) for n in args.datasets if status[n]]
    if not incomplete:
        print(f"ready: {', '.join(args.datasets)}")
        return 0
    if build_error and "cannot build" not in build_error:
        raise WrnDetError(build_error)  # a malformed input file: its own message says more than "missing"
    pieces = "; ".join(f"{n} needs {', '.join(m)}" for n, m in incomplete)
    raise WrnDetError(f"{root}: {pieces} (see datasets/README.md)")


if __name__ == "__main__":
    sys.exit(cli_main(main))
