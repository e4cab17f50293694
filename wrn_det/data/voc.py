"""Pascal VOC detection datasets: reading (every file checked), registering, and writing a VOC tree.

A VOC folder (``VOC2007/``, ``VOC2012/``, or any folder in the same layout) holds::

    Annotations/<file id>.xml        one per image: size, and each object's name, difficult, bndbox
    JPEGImages/<file id>.jpg
    ImageSets/Main/<split>.txt       the file ids of a split (train, val, trainval, test), one a line

Reading follows detectron2's ``load_voc_instances``: each image becomes ``{"file_name",
"image_id": file id (a string), "height", "width", "annotations"}`` and each object
``{"category_id": index in the class list, "bbox": [xmin - 1, ymin - 1, xmax, ymax],
"bbox_mode": 0 (XYXY_ABS), "difficult": 0 or 1}``: VOC's corners are 1-based pixel
indices, inclusive, so the box ``(1, 1, W, H)`` covers the whole image, which is
``(0, 0, W, H)`` in pixel coordinates. Difficult objects are kept (detectron2 trains on them);
the VOC evaluation ignores them (neither found nor missed).

Annotation files come from outside and are checked before anything is taken from them: a
file that is not well-formed XML, declares a DTD or entities (the "billion laughs"
expansion), is larger than :data:`MAX_ANNOTATION_BYTES`, lacks a tag, holds a coordinate
that is not a finite number, names a class outside the list, or places a box outside its
image is one line naming the file, the object and what was expected. One read and one parse
per file, nothing else (VOC07+12 trainval is about 16,500 files).
"""
import math
import os
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from wrn_det.engine.errors import ConfigError, WrnDetError

from .catalog import DatasetCatalog, MetadataCatalog
from .proposals import XYXY_ABS

__all__ = ["VOC_CLASSES", "VOC_YEARS", "MAX_ANNOTATION_BYTES", "load_voc_instances", "read_voc_annotation",
           "read_image_set", "register_pascal_voc", "register_voc_lazily", "write_voc_annotation", "write_voc_split"]

# detectron2's CLASS_NAMES of datasets/pascal_voc.py: the 20 VOC classes in the devkit's order
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: The years the evaluation knows: 2007 scores with the 11-point AP, 2012 with the area under the curve.
VOC_YEARS = (2007, 2012)

#: The largest annotation file read (8 MiB holds some 30,000 objects); a larger one is refused unparsed.
MAX_ANNOTATION_BYTES = 8 << 20

_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _text(parent, tag: str, where: str, expected: str) -> str:
    node = parent.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise WrnDetError(f"{where} has no <{tag}>; expected {expected}")
    return node.text.strip()


def _number(parent, tag: str, where: str) -> float:
    text = _text(parent, tag, where, "a number")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise WrnDetError(f"{where} has <{tag}> {text[:40]!r}; expected a finite number (pixels)")
    return value


class _DoctypeFound(Exception):
    pass


class _NoDoctype(ET.TreeBuilder):
    """A tree builder that stops the parse at a document type declaration, before any entity is declared."""

    def doctype(self, name, pubid, system):
        raise _DoctypeFound()


def _parse(path: str, data: bytes):
    # VOC files never declare a DTD; refusing one keeps entity expansion (the "billion laughs") and external
    # entities out of the parser, whatever the XML library's own limits: at once in the bytes, and in any other
    # encoding (UTF-16, say) when the parser meets the declaration
    refused = WrnDetError(f"VOC annotation {path} declares a DTD or entities; expected plain XML (refused unparsed: "
                          "entity expansion)")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise refused
    try:
        parser = ET.XMLParser(target=_NoDoctype())
        parser.feed(data)
        root = parser.close()
    except _DoctypeFound:
        raise refused from None
    except ET.ParseError as e:
        line, col = getattr(e, "position", (0, 0))
        raise WrnDetError(f"VOC annotation {path} is not well-formed XML (line {line}, column {col}); expected an "
                          "<annotation> document") from None
    if root.tag != "annotation":
        raise WrnDetError(f"VOC annotation {path} has the root element <{root.tag[:40]}>; expected <annotation>")
    return root


def read_voc_annotation(path: str, class_index: Dict[str, int]) -> Tuple[int, int, List[dict]]:
    """Return ``(width, height, objects)`` of one VOC annotation file, checked.

    ``class_index``: class name -> contiguous id. Each object is ``{"category_id", "bbox":
    [xmin - 1, ymin - 1, xmax, ymax], "bbox_mode": 0, "difficult": 0 or 1}``. Raises
    :class:`WrnDetError` naming the file (and the object) for anything else than a VOC
    annotation: see the module's docstring.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            # the size first: a huge file is refused unread (a pipe or device, of size 0, gives one byte)
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ANNOTATION_BYTES:
                raise WrnDetError(f"VOC annotation {path} is larger than {MAX_ANNOTATION_BYTES >> 20} MiB; expected a "
                                  "VOC annotation file (a size and a list of objects)")
            data = f.read(size + 1)
    except FileNotFoundError:
        raise WrnDetError(f"VOC annotation {path} not found; expected one Annotations/<file id>.xml per id of the "
                          "split") from None
    except OSError as e:
        raise WrnDetError(f"VOC annotation {path} cannot be read: {e.strerror or e}") from None
    root = _parse(path, data)
    where = f"VOC annotation {path}"
    size = root.find("size")
    if size is None:
        raise WrnDetError(f"{where} has no <size>; expected <size> with <width> and <height> in pixels")
    sides = []
    for tag in ("width", "height"):
        v = _number(size, tag, f"{where} <size>")
        if v <= 0 or v != int(v):
            raise WrnDetError(f"{where} has <size><{tag}> {v:g}; expected a positive whole number of pixels")
        sides.append(int(v))
    W, H = sides
    objects = []
    for n, obj in enumerate(root.findall("object")):
        at = f"{where}, object {n}"
        name = _text(obj, "name", at, "the class name")
        at = f"{at} ({name[:40]!r})"
        if name not in class_index:
            known = ", ".join(list(class_index)[:25]) + (", ..." if len(class_index) > 25 else "")
            raise WrnDetError(f"{at}: unknown class; expected one of the dataset's classes ({known})")
        difficult = 0
        node = obj.find("difficult")
        if node is not None and node.text is not None and node.text.strip():
            if node.text.strip() not in ("0", "1"):
                raise WrnDetError(f"{at} has <difficult> {node.text.strip()[:20]!r}; expected 0 or 1")
            difficult = int(node.text.strip())
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise WrnDetError(f"{at} has no <bndbox>; expected <bndbox> with <xmin>, <ymin>, <xmax>, <ymax>")
        xmin, ymin, xmax, ymax = (_number(bndbox, t, at) for t in _CORNERS)
        if xmin > xmax or ymin > ymax:
            raise WrnDetError(f"{at} has the box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}); expected xmin <= xmax "
                              "and ymin <= ymax")
        box = [xmin - 1.0, ymin - 1.0, xmax, ymax]  # 1-based inclusive corners -> pixel coordinates
        if box[0] >= W or box[1] >= H or box[2] <= 0 or box[3] <= 0:
            raise WrnDetError(f"{at} has the box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}), entirely outside its "
                              f"{W}x{H} image; expected 1-based corners within 1..{W} and 1..{H}")
        objects.append({"category_id": class_index[name], "bbox": box, "bbox_mode": XYXY_ABS, "difficult": difficult})
    return W, H, objects


def read_image_set(dirname: str, split: str) -> List[str]:
    """Return the file ids of ``<dirname>/ImageSets/Main/<split>.txt``, in the file's order.

    Raises :class:`WrnDetError` for a missing file, a line that is not one file id (a name
    without a folder), or an id listed twice.
    """
    path = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise WrnDetError(f"VOC split file {path} not found; expected a VOC folder with Annotations/, JPEGImages/ "
                          "and ImageSets/Main/<split>.txt (see docs/datasets.md)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WrnDetError(f"VOC split file {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    ids, seen = [], set()
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        fid = parts[0]
        if len(parts) != 1 or "/" in fid or "\\" in fid or fid in (".", ".."):
            raise WrnDetError(f"VOC split file {path}, line {n}: {line.strip()[:60]!r}; expected one file id a line "
                              "(a name without a folder, such as 2007_000027)")
        if fid in seen:
            raise WrnDetError(f"VOC split file {path}, line {n}: file id {fid!r} is listed twice; expected each "
                              "image once")
        seen.add(fid)
        ids.append(fid)
    if not ids:
        raise WrnDetError(f"VOC split file {path} lists no image; expected one file id a line")
    return ids


def load_voc_instances(dirname: str, split: str, class_names: Sequence[str] = VOC_CLASSES) -> List[dict]:
    """Return the dataset dicts of split ``split`` of the VOC folder ``dirname``, one per image of the split file.

    See the module's docstring for the dicts and the checks.
    """
    class_index = {c: i for i, c in enumerate(class_names)}
    ann_dir, img_dir = os.path.join(dirname, "Annotations"), os.path.join(dirname, "JPEGImages")
    dicts = []
    for fid in read_image_set(dirname, split):
        w, h, objects = read_voc_annotation(os.path.join(ann_dir, fid + ".xml"), class_index)
        dicts.append({"file_name": os.path.join(img_dir, fid + ".jpg"), "image_id": fid, "height": h, "width": w,
                      "annotations": objects})
    return dicts


def _check_classes(class_names) -> List[str]:
    names = list(class_names) if not isinstance(class_names, str) else []
    if not names or not all(isinstance(c, str) and c.strip() == c and c for c in names):
        raise ConfigError(f"VOC class names {class_names!r:.80}: expected a non-empty list of class names")
    if len(set(names)) != len(names):
        raise ConfigError(f"VOC class names {names!r:.80} name a class twice; expected distinct names")
    return names


def register_voc_lazily(name: str, dirname_fn: Callable[[], str], split: str, year: int,
                        class_names: Sequence[str] = VOC_CLASSES) -> None:
    """:func:`register_pascal_voc` with the folder decided when the dataset is loaded (``dirname_fn()``); returns None.

    The builtin names use it, so that ``DETECTRON2_DATASETS`` is read when a dataset is used.
    """
    if year not in VOC_YEARS:
        raise ConfigError(f"VOC dataset {name!r}: year {year!r}; expected 2007 (11-point AP) or 2012 (area AP)")
    names = _check_classes(class_names)

    def load():
        dirname = dirname_fn()
        MetadataCatalog.get(name).update(dirname=dirname)
        try:
            return load_voc_instances(dirname, split, names)
        except WrnDetError as e:
            raise WrnDetError(f"dataset {name!r}: {e}") from None

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).update(thing_classes=names, split=split, year=year, evaluator_type="pascal_voc")


def register_pascal_voc(name: str, dirname: str, split: str, year: int,
                        class_names: Sequence[str] = VOC_CLASSES) -> None:
    """Register split ``split`` of the VOC folder ``dirname`` as ``name`` (detectron2's function of the same name).

    ``year`` chooses the evaluation's AP: 2007, the 11-point AP of the VOC2007 devkit;
    2012, the area under the precision envelope. The metadata holds ``thing_classes``,
    ``dirname``, ``split``, ``year`` and ``evaluator_type`` ``"pascal_voc"``, which makes
    training and ``tools/evaluate.py`` score the dataset with the VOC evaluator. Returns None.
    """
    register_voc_lazily(name, lambda: dirname, split, year, class_names)
    MetadataCatalog.get(name).update(dirname=dirname)


def _coordinate(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_voc_annotation(path: str, width: int, height: int, objects: Sequence[dict],
                         filename: Optional[str] = None) -> str:
    """Write one VOC annotation file; returns ``path``.

    ``objects``: ``{"name", "bbox": [x0, y0, x1, y1] in pixel coordinates (the dataset
    dicts' convention), "difficult": 0 or 1 (optional)}``; the file holds VOC's 1-based
    corners (``xmin = x0 + 1``), whole numbers where the coordinates are, and the
    ``pose`` and ``truncated`` tags the devkit's readers expect. The file is written in
    place: write a tree into a temporary folder
    (:func:`wrn_det.engine.fileio.atomic_write_dir`) so it appears whole.
    """
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = filename or os.path.splitext(os.path.basename(path))[0] + ".jpg"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = str(o["name"])
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(o.get("difficult", 0)))
        box = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = (float(v) for v in o["bbox"])
        for tag, v in zip(_CORNERS, (x0 + 1, y0 + 1, x1, y1)):
            ET.SubElement(box, tag).text = _coordinate(v)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)
    return path


def write_voc_split(voc_dir: str, split: str, images: Sequence[dict], class_names: Sequence[str],
                    link: bool = True) -> List[str]:
    """Add one split to the VOC tree ``voc_dir``: annotations, images and ``ImageSets/Main/<split>.txt``.

    ``images``: dataset dicts (``file_name``, ``height``, ``width``, ``annotations`` with
    contiguous ``category_id``, a box of ``bbox_mode`` 0 (XYXY) or 1 (XYWH, as the COCO
    reader gives), optional ``difficult``) plus ``"file_id"``, the name the image takes in
    the tree. The image file is hard-linked when ``link`` and the file system allows it,
    copied otherwise. Returns the file ids written.
    """
    import shutil

    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc_dir, sub), exist_ok=True)
    ids = []
    for d in images:
        fid = d["file_id"]
        objects = []
        for a in d.get("annotations", []):
            x, y, u, v = (float(t) for t in a["bbox"])
            box = [x, y, u, v] if a.get("bbox_mode", XYXY_ABS) == XYXY_ABS else [x, y, x + u, y + v]
            objects.append({"name": class_names[a["category_id"]], "bbox": box, "difficult": a.get("difficult", 0)})
        write_voc_annotation(os.path.join(voc_dir, "Annotations", fid + ".xml"), d["width"], d["height"], objects)
        target = os.path.join(voc_dir, "JPEGImages", fid + ".jpg")
        try:
            if not link:
                raise OSError
            os.link(d["file_name"], target)
        except OSError:
            shutil.copyfile(d["file_name"], target)
        ids.append(fid)
    with open(os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    return ids

