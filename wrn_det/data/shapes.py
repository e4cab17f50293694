"""A synthetic detection dataset in COCO format: squares, circles and triangles.

The project's embedded default, so that detection runs on a fresh machine with no
download and gives a real COCO mAP. Images are small (about 128 pixels a side) and
hold a few large shapes in random colours on a noisy background; every box is the
exact extent of the drawn shape, so a good detector can reach a high AP at all IoU
thresholds.

Files are written on first use under ``<DETECTRON2_DATASETS>/shapes``::

    shapes/train/000000.jpg ...   shapes/annotations/instances_train.json
    shapes/val/000000.jpg ...     shapes/annotations/instances_val.json

Generation is deterministic (a fixed seed per split), so every process of a
distributed job, and every machine, sees the same data.

The same images and boxes also come as a Pascal VOC tree (:func:`export_voc`), written on
first use of ``shapes_voc_train`` / ``shapes_voc_val`` under ``<DETECTRON2_DATASETS>/shapes_voc``::

    shapes_voc/Annotations/train_000000.xml ...  shapes_voc/JPEGImages/train_000000.jpg ...
    shapes_voc/ImageSets/Main/train.txt          shapes_voc/ImageSets/Main/val.txt
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from wrn_det.engine.fileio import atomic_write_dir

__all__ = ["CATEGORIES", "SPLITS", "shapes_root", "ensure_shapes", "generate_split", "draw_image", "export_voc",
           "shapes_voc_root", "ensure_shapes_voc", "SHAPES_CLASSES"]

# Bump when the drawing rules change, so stale folders are regenerated.
VERSION = 3

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]

#: The class names in category-id order (the VOC tree's names).
SHAPES_CLASSES = tuple(c["name"] for c in CATEGORIES)

# split -> (number of images, seed)
SPLITS: Dict[str, Tuple[int, int]] = {"train": (1000, 1), "val": (200, 2)}

# Image sides (pixels): a few sizes so that aspect-ratio grouping has work to do.
_SIDES = (112, 128, 144)


def shapes_root(root: Optional[str] = None) -> str:
    """Return the folder of the shapes dataset: ``<root or $DETECTRON2_DATASETS or datasets>/shapes``."""
    root = root if root is not None else os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.join(root, "shapes")


def _colour_far_from(rng: np.random.Generator, ref: np.ndarray, min_dist: float) -> np.ndarray:
    # High contrast keeps the task about localisation, not about finding faint shapes.
    for _ in range(100):
        c = rng.integers(0, 256, size=3)
        if np.linalg.norm(c.astype(float) - ref) >= min_dist:
            return c
    return 255 - ref.astype(np.int64)


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, size: float, rng: np.random.Generator) -> np.ndarray:
    """Return a uint8 mask (1 inside) of one shape of about ``size`` pixels across."""
    mask = np.zeros((h, w), np.uint8)
    r = size / 2
    if kind == "square":
        x0, y0 = int(round(cx - r)), int(round(cy - r))
        s = int(round(size))
        cv2.rectangle(mask, (x0, y0), (x0 + s - 1, y0 + s - 1), 1, thickness=-1)
    elif kind == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 1, thickness=-1)
    else:  # triangle: a random rotation of an equilateral triangle
        a0 = rng.uniform(0, 2 * np.pi)
        angles = a0 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def draw_image(rng: np.random.Generator, sides: Sequence[int] = _SIDES, min_size: float = 22.0,
               max_frac: float = 0.55, max_objects: int = 4) -> Tuple[np.ndarray, List[dict]]:
    """Draw one image with sides from ``sides`` and 1..``max_objects`` shapes of ``min_size`` pixels
    up to ``max_frac`` of the shorter side.

    Returns ``(image, objects)``: a BGR uint8 array of shape (H, W, 3) and a list of
    ``{"category_id", "bbox" [x, y, w, h], "area"}`` with boxes that enclose exactly the
    drawn pixels of each shape.
    """
    h, w = int(rng.choice(sides)), int(rng.choice(sides))
    # background: a smooth two-colour gradient plus noise
    c0, c1 = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    grad = (c0[None] * (1 - t[:, None]) + c1[None] * t[:, None])
    bg = np.broadcast_to(grad[None], (h, w, 3)) if len(t) == w else np.broadcast_to(grad[:, None], (h, w, 3))
    img = bg.astype(np.float32) + rng.normal(0, 8, size=(h, w, 3)).astype(np.float32)
    mean_bg = (c0 + c1) / 2

    objects: List[dict] = []
    boxes: List[Tuple[int, int, int, int]] = []
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(n):
        for _attempt in range(30):
            kind = ("square", "circle", "triangle")[int(rng.integers(0, 3))]
            size = float(rng.uniform(min_size, min(h, w) * max_frac))
            r = size / 2
            cx = float(rng.uniform(r + 1, w - r - 1))
            cy = float(rng.uniform(r + 1, h - r - 1))
            mask = _shape_mask(kind, h, w, cx, cy, size, rng)
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            # keep shapes apart (2-pixel gap) so no shape hides part of another
            if any(box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2 for b in boxes):
                continue
            colour = _colour_far_from(rng, mean_bg, 160.0).astype(np.float32)
            img[mask.astype(bool)] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3)).astype(np.float32)
            boxes.append(box)
            cat = {"square": 1, "circle": 2, "triangle": 3}[kind]
            objects.append({
                "category_id": cat,
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "area": float(mask.sum()),
            })
            break
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_split(folder: str, split: str, num_images: int, seed: int, **draw_kwargs) -> str:
    """Write ``num_images`` JPEG files under ``folder/split`` and ``folder/annotations/instances_<split>.json``.

    ``draw_kwargs`` go to :func:`draw_image` (image sides, shape sizes, shapes per image).
    Returns the path of the JSON file.
    """
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(folder, split)
    ann_dir = os.path.join(folder, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img, objs = draw_image(rng, **draw_kwargs)
        name = f"{i:06d}.jpg"
        cv2.imwrite(os.path.join(img_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
        for o in objs:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **o})
    data = {
        "info": {"description": "wrn-det synthetic shapes", "version": str(VERSION), "split": split},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = os.path.join(ann_dir, f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _is_current(folder: str) -> bool:
    for split in SPLITS:
        path = os.path.join(folder, "annotations", f"instances_{split}.json")
        try:
            with open(path) as f:
                info = json.load(f).get("info", {})
        except (OSError, ValueError):
            return False
        n = SPLITS[split][0]
        if info.get("version") != str(VERSION) or not os.path.isfile(os.path.join(folder, split, f"{n - 1:06d}.jpg")):
            return False
    return True


def ensure_shapes(root: Optional[str] = None) -> str:
    """Generate the shapes dataset under ``shapes_root(root)`` unless an up-to-date copy is there.

    Safe when several processes call it at once: each writes its own temporary folder and
    renames it into place (:func:`wrn_det.engine.fileio.atomic_write_dir`); the first rename
    wins. An older version's folder is replaced. Returns the dataset folder.
    """
    folder = shapes_root(root)
    if _is_current(folder):
        return folder

    def write(tmp):
        for split, (n, seed) in SPLITS.items():
            generate_split(tmp, split, n, seed)

    return atomic_write_dir(folder, write, is_complete=_is_current)


def shapes_voc_root(root: Optional[str] = None) -> str:
    """Return the folder of the shapes dataset's VOC tree: ``<root or $DETECTRON2_DATASETS or datasets>/shapes_voc``."""
    return os.path.join(os.path.dirname(shapes_root(root)), "shapes_voc")


def _voc_version_file(voc_dir: str) -> str:
    return os.path.join(voc_dir, "shapes_version.txt")


def _voc_is_current(voc_dir: str) -> bool:
    try:
        with open(_voc_version_file(voc_dir)) as f:
            if f.read().strip() != str(VERSION):
                return False
        for split in SPLITS:
            with open(os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")) as f:
                if sum(1 for line in f if line.strip()) != SPLITS[split][0]:
                    return False
    except OSError:
        return False
    return True


def _write_voc_tree(voc_dir: str, coco_folder: str, splits: Sequence[str]) -> None:
    from .coco import load_coco_json
    from .voc import write_voc_split

    for split in splits:
        dicts = load_coco_json(os.path.join(coco_folder, "annotations", f"instances_{split}.json"),
                               os.path.join(coco_folder, split))
        for d in dicts:
            d["file_id"] = f"{split}_{os.path.splitext(os.path.basename(d['file_name']))[0]}"
        write_voc_split(voc_dir, split, dicts, SHAPES_CLASSES)
    with open(_voc_version_file(voc_dir), "w") as f:
        f.write(f"{VERSION}\n")


def export_voc(voc_dir: str, coco_folder: Optional[str] = None, splits: Sequence[str] = ("train", "val")) -> str:
    """Write the shapes dataset as a Pascal VOC tree at ``voc_dir``; returns ``voc_dir``.

    ``coco_folder``: a shapes folder in COCO form (``<split>/``, ``annotations/instances_<split>.json``,
    as :func:`generate_split` writes it; default: :func:`ensure_shapes`). Every image of a
    split becomes ``JPEGImages/<split>_<name>.jpg`` (hard-linked where the file system allows)
    with ``Annotations/<split>_<name>.xml``, listed in ``ImageSets/Main/<split>.txt``; the class
    names are the shapes' (square, circle, triangle). The tree appears whole or not at all
    (:func:`wrn_det.engine.fileio.atomic_write_dir`). Read it with
    :func:`wrn_det.data.voc.register_pascal_voc` and ``class_names=SHAPES_CLASSES``.
    """
    coco_folder = coco_folder or ensure_shapes()
    return atomic_write_dir(voc_dir, lambda tmp: _write_voc_tree(tmp, coco_folder, splits))


def ensure_shapes_voc(root: Optional[str] = None) -> str:
    """Write the shapes dataset's VOC tree under ``shapes_voc_root(root)`` unless an up-to-date copy is there.

    The shapes dataset itself is generated first when needed (:func:`ensure_shapes`). Safe
    when several processes call it at once, as :func:`ensure_shapes`. Returns the VOC folder.
    """
    voc_dir = shapes_voc_root(root)
    if _voc_is_current(voc_dir):
        return voc_dir
    coco_folder = ensure_shapes(root)
    return atomic_write_dir(voc_dir, lambda tmp: _write_voc_tree(tmp, coco_folder, tuple(SPLITS)),
                            is_complete=_voc_is_current)
