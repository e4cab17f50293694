"""Pascal VOC folders: detectron2's names and conventions, hostile annotation files, the shapes set as a VOC
tree, and a 2-iteration training on it that evaluates with the VOC metric through tools/train_net.py."""
import json
import logging

import pytest
from helpers import DRAW_64, TINY_DET, load_tool

from wrn_det.data import catalog, shapes, voc
from wrn_det.engine.errors import WrnDetError

SIMPLE = ("<annotation><size><width>500</width><height>375</height><depth>3</depth></size>"
          "<object><name>dog</name><difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>{ymin}</ymin>"
          "<xmax>500</xmax><ymax>200</ymax></bndbox></object></annotation>")


def write_tree(folder, files, splits):
    """Write ``Annotations/<id>.xml`` (``files``: id -> text or bytes) and ``ImageSets/Main/<split>.txt``."""
    (folder / "Annotations").mkdir(parents=True, exist_ok=True)
    (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for fid, text in files.items():
        path = folder / "Annotations" / f"{fid}.xml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for split, ids in splits.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return folder


def test_builtin_names_read_detectron2s_layout_and_conventions(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    ok = {"2007_000027": SIMPLE.format(difficult=1, ymin=11), "2007_000032": SIMPLE.format(difficult=0, ymin=1)}
    write_tree(root / "VOC2007", ok, {s: list(ok) for s in ("trainval", "train", "val", "test")})
    write_tree(root / "VOC2012", ok, {s: list(ok) for s in ("trainval", "train", "val")})
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))  # read when a dataset is used, not at import
    for name in ("voc_2007_trainval", "voc_2007_train", "voc_2007_val", "voc_2007_test", "voc_2012_trainval",
                 "voc_2012_train", "voc_2012_val"):
        dicts = catalog.DatasetCatalog.get(name)
        meta = catalog.MetadataCatalog.get(name)
        year = 2007 if "2007" in name else 2012
        assert meta.year == year and meta.evaluator_type == "pascal_voc" and len(meta.thing_classes) == 20
        assert meta.dirname == str(root / f"VOC{year}") and meta.split == name.split("_")[-1]
        assert [d["image_id"] for d in dicts] == list(ok)
    first = catalog.DatasetCatalog.get("voc_2007_test")[0]
    assert first["image_id"] == "2007_000027" and (first["width"], first["height"]) == (500, 375)
    assert first["file_name"] == str(root / "VOC2007" / "JPEGImages" / "2007_000027.jpg")
    assert first["annotations"] == [{"category_id": voc.VOC_CLASSES.index("dog"), "bbox": [0.0, 10.0, 500.0, 200.0],
                                     "bbox_mode": 0, "difficult": 1}]


def test_loader_boxes_follow_the_box_mode():
    import torch

    from wrn_det.data.det_loader import annotation_boxes

    boxes = annotation_boxes([{"bbox": [1, 2, 3, 4], "bbox_mode": 1}, {"bbox": [1, 2, 3, 4], "bbox_mode": 0},
                              {"bbox": [5, 5, 1, 1]}])
    assert torch.equal(boxes, torch.tensor([[1.0, 2.0, 4.0, 6.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 6.0, 6.0]]))


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
          + ']><annotation><size><width>&lol9;</width><height>1</height></size></annotation>')


@pytest.mark.parametrize("content, expected", [
    ("<annotation><size><width>10</width>", "is not well-formed XML (line 1, column"),
    (b"\xff\xfe<\x00a\x00", "is not well-formed XML"),
    ("<foo/>", "has the root element <foo>; expected <annotation>"),
    ("<annotation><object/></annotation>", "has no <size>; expected <size> with <width> and <height>"),
    ("<annotation><size><width>500</width></size></annotation>", "<size> has no <height>; expected a number"),
    ("<annotation><size><width>0</width><height>5</height></size></annotation>",
     "<size><width> 0; expected a positive whole number of pixels"),
    ("<annotation><size><width>12.5</width><height>5</height></size></annotation>",
     "<size><width> 12.5; expected a positive whole number"),
    (SIMPLE.replace("<name>dog</name>", ""), "object 0 has no <name>; expected the class name"),
    (SIMPLE.replace("dog", "unicorn"), "object 0 ('unicorn'): unknown class; expected one of the dataset's classes "
                                       "(aeroplane, bicycle"),
    (SIMPLE.format(difficult=0, ymin=1).replace("<bndbox>", "<box>").replace("</bndbox>", "</box>"),
     "has no <bndbox>; expected <bndbox> with <xmin>, <ymin>, <xmax>, <ymax>"),
    (SIMPLE.format(difficult=0, ymin=1).replace("<xmax>500</xmax>", ""), "has no <xmax>; expected a number"),
    (SIMPLE.format(difficult=0, ymin="ten"), "has <ymin> 'ten'; expected a finite number (pixels)"),
    (SIMPLE.format(difficult=0, ymin="nan"), "has <ymin> 'nan'; expected a finite number"),
    (SIMPLE.format(difficult=0, ymin="-inf"), "has <ymin> '-inf'; expected a finite number"),
    (SIMPLE.format(difficult=0, ymin=300), "has the box (1, 300, 500, 200); expected xmin <= xmax and ymin <= ymax"),
    (SIMPLE.format(difficult=0, ymin=1).replace("<xmin>1</xmin>", "<xmin>600</xmin>").replace("<xmax>500", "<xmax>700"),
     "entirely outside its 500x375 image; expected 1-based corners within 1..500 and 1..375"),
    (SIMPLE.format(difficult="maybe", ymin=1), "has <difficult> 'maybe'; expected 0 or 1"),
    (LAUGHS, "declares a DTD or entities; expected plain XML"),
    ('<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>', "declares a DTD"),
    (LAUGHS.replace('<?xml version="1.0"?>', "").encode("utf-16"), "declares a DTD or entities"),  # not in the bytes
])
def test_hostile_annotation_file_is_one_line_naming_it(tmp_path, content, expected):
    folder = write_tree(tmp_path / "VOCx", {"a": SIMPLE.format(difficult=0, ymin=1), "b": content},
                        {"test": ["a", "b"]})
    voc.register_pascal_voc("t_hostile", str(folder), "test", 2007)
    try:
        with pytest.raises(WrnDetError) as e:
            catalog.DatasetCatalog.get("t_hostile")
    finally:
        catalog.DatasetCatalog.remove("t_hostile")
        catalog.MetadataCatalog.remove("t_hostile")
    msg = str(e.value)
    assert "\n" not in msg and expected in msg, msg
    assert msg.startswith(f"dataset 't_hostile': VOC annotation {folder / 'Annotations' / 'b.xml'}")


def test_huge_annotation_file_is_refused_unparsed(tmp_path):
    huge = "<annotation>" + " " * (voc.MAX_ANNOTATION_BYTES + 1) + "</annotation>"
    folder = write_tree(tmp_path / "VOCx", {"big": huge}, {"test": ["big"]})
    with pytest.raises(WrnDetError, match=r"big.xml is larger than 8 MiB; expected a VOC annotation file"):
        voc.load_voc_instances(str(folder), "test")


@pytest.mark.parametrize("lines, expected", [
    (None, "VOC split file {split} not found; expected a VOC folder with Annotations/, JPEGImages/ and "
           "ImageSets/Main/<split>.txt"),
    ("a\nb extra\n", "{split}, line 2: 'b extra'; expected one file id a line"),
    ("../../etc/passwd\n", "{split}, line 1: '../../etc/passwd'; expected one file id a line"),
    ("a\n\na\n", "{split}, line 3: file id 'a' is listed twice"),
    ("\n\n", "{split} lists no image"),
    ("a\nmissing\n", "VOC annotation {ann} not found; expected one Annotations/<file id>.xml per id"),
])
def test_bad_split_files_are_one_line(tmp_path, lines, expected):
    folder = write_tree(tmp_path / "VOCx", {"a": SIMPLE.format(difficult=0, ymin=1)}, {})
    split = folder / "ImageSets" / "Main" / "test.txt"
    if lines is not None:
        split.write_text(lines)
    with pytest.raises(WrnDetError) as e:
        voc.load_voc_instances(str(folder), "test")
    assert expected.format(split=split, ann=folder / "Annotations" / "missing.xml") in str(e.value)


def test_bad_registration_is_refused():
    with pytest.raises(WrnDetError, match="year 2010; expected 2007"):
        voc.register_pascal_voc("t_bad_year", "/x", "test", 2010)
    with pytest.raises(WrnDetError, match="name a class twice"):
        voc.register_pascal_voc("t_bad_classes", "/x", "test", 2007, ("a", "a"))
    assert "t_bad_year" not in catalog.DatasetCatalog and "t_bad_classes" not in catalog.DatasetCatalog


def test_broken_voc_file_stops_a_tool_with_one_line(tmp_path, monkeypatch, capsys):
    from wrn_det.engine import cli_main

    root = tmp_path / "datasets"
    write_tree(root / "VOC2007", {"x": LAUGHS}, {"test": ["x"]})
    (tmp_path / "r.json").write_text("[]")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    tool = load_tool("evaluate")
    try:
        status = cli_main(tool.main, tool.parse_args(["--results", str(tmp_path / "r.json"), "--dataset",
                                                      "voc_2007_test"]))
    finally:
        logging.getLogger("wrn_det").handlers.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "x.xml declares a DTD or entities" in lines[0], lines


def test_shapes_export_as_voc_reads_back_the_same_boxes(tmp_path):
    from wrn_det.data.coco import load_coco_json

    coco = tmp_path / "coco"
    shapes.generate_split(str(coco), "val", 6, seed=4, **DRAW_64)
    out = shapes.export_voc(str(tmp_path / "voc"), str(coco), splits=("val",))
    voc.register_pascal_voc("t_shapes_voc", out, "val", 2012, shapes.SHAPES_CLASSES)
    try:
        got = catalog.DatasetCatalog.get("t_shapes_voc")
    finally:
        catalog.DatasetCatalog.remove("t_shapes_voc")
        catalog.MetadataCatalog.remove("t_shapes_voc")
    want = load_coco_json(str(coco / "annotations" / "instances_val.json"), str(coco / "val"))
    assert [d["image_id"] for d in got] == [f"val_{i:06d}" for i in range(6)]
    for g, w in zip(got, want):
        assert (g["height"], g["width"]) == (w["height"], w["width"])
        assert open(g["file_name"], "rb").read() == open(w["file_name"], "rb").read()
        assert [(a["category_id"], a["bbox"]) for a in g["annotations"]] == [
            (a["category_id"], [x, y, x + bw, y + bh]) for a in w["annotations"] for x, y, bw, bh in [a["bbox"]]]


def test_two_iterations_on_a_voc_folder_train_and_evaluate(tmp_path, monkeypatch, capsys, one_thread):
    """The shapes set as a VOC tree (shapes_voc_train / shapes_voc_val, written on first use) through train_net."""
    from wrn_det.engine import cli_main

    monkeypatch.setattr(shapes, "SPLITS", {"train": (12, 1), "val": (6, 2)})  # a small shapes set, quickly drawn
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "run"
    argv = ["--config-file", "shapes_wrn_frcnn.yaml", *TINY_DET, "DATASETS.TRAIN", "('shapes_voc_train',)",
            "DATASETS.TEST", "('shapes_voc_val',)", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
            "OUTPUT_DIR", str(out)]
    tool = load_tool("train_net")
    try:
        status = cli_main(tool.main, tool.parse_args(argv))
    finally:
        logging.getLogger("wrn_det").handlers.clear()
    err = capsys.readouterr().err
    assert status == 0, err
    assert (tmp_path / "datasets" / "shapes_voc" / "ImageSets" / "Main" / "val.txt").read_text().split() == [
        f"val_{i:06d}" for i in range(6)]
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    final = rows[-1]
    assert final["iteration"] == 1 and {"bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AP50-square",
                                        "bbox/AP50-circle", "bbox/AP50-triangle"} <= set(final)
    assert "shapes_voc_val with the VOC2012 metric (area AP)" in (out / "log.txt").read_text()
    results = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert all(isinstance(r["image_id"], str) and r["image_id"].startswith("val_") for r in results)

    # the results file, scored again without the model, gives the training's numbers
    tool = load_tool("evaluate")
    try:
        status = cli_main(tool.main, tool.parse_args(["--results", str(out / "inference" / "coco_instances_results.json"),
                                                      "--dataset", "shapes_voc_val", "--output", str(out / "m.json")]))
    finally:
        logging.getLogger("wrn_det").handlers.clear()
    assert status == 0, capsys.readouterr().err
    again = json.loads((out / "m.json").read_text())["bbox"]
    for key in ("AP", "AP50", "AP75", "AP50-square"):
        assert again[key] == pytest.approx(final[f"bbox/{key}"], abs=0.01), key
