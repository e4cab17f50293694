"""Detection data: COCO JSON loading and its errors, the catalog, shapes generation, mapper, sampler."""
import json
import os

import pytest
import torch
from helpers import write_coco, write_coco_split

from wrn_det.data import catalog, coco, shapes
from wrn_det.data.det_loader import DetectionMapper, GroupedTrainingSampler, InferenceSampler, LoadError
from wrn_det.detection.config import get_det_cfg
from wrn_det.engine.errors import WrnDetError


CATS = [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}]


def ann(i, img, cat, bbox, crowd=0):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": bbox[2] * bbox[3]}


IMAGES = [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
          {"id": 2, "file_name": "b.jpg", "height": 50, "width": 30},
          {"id": 3, "file_name": "c.jpg", "height": 30, "width": 30}]


def test_coco_loading_maps_ids_and_filters(tmp_path):
    anns = [ann(1, 1, 9, [1, 2, 10, 20]), ann(2, 1, 5, [5, 5, 5, 5]),
            ann(3, 2, 5, [0, 0, 30, 50], crowd=1),  # image 2 has only a crowd box
            ann(4, 3, 9, [3, 3, 0, 4])]             # image 3 has only an empty box
    root = str(tmp_path)
    path = write_coco(tmp_path / "instances.json", IMAGES, anns, CATS, root)
    dicts = coco.load_coco_json(path, root, "t_ids")
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [1, 0]  # id 9 -> 1, id 5 -> 0
    meta = catalog.MetadataCatalog.get("t_ids")
    assert meta.thing_classes == ["cat", "dog"]
    assert meta.contiguous_id_to_thing_dataset_id == {0: 5, 1: 9}
    assert dicts[1]["annotations"][0]["iscrowd"] == 1 and dicts[2]["annotations"] == []

    coco.register_coco_instances("t_filter", path, root)
    try:
        kept = catalog.get_detection_dataset_dicts(["t_filter"], filter_empty=True)
        assert [d["image_id"] for d in kept] == [1]  # crowd-only and empty-box images are dropped
        assert len(catalog.get_detection_dataset_dicts(["t_filter"], filter_empty=False)) == 3
    finally:
        catalog.DatasetCatalog.remove("t_filter")


@pytest.mark.parametrize("bad, expected", [
    (ann(7, 1, 5, [1, 1, -3, 4]), "annotation id 7 (image id 1) has a box of negative width"),
    (ann(8, 1, 4, [1, 1, 3, 4]), "annotation id 8 (image id 1) has category id 4, which is not in"),
])
def test_coco_bad_annotation_is_one_line(tmp_path, bad, expected):
    root = str(tmp_path)
    path = write_coco(tmp_path / "instances.json", IMAGES, [ann(1, 1, 5, [1, 1, 2, 2]), bad], CATS, root)
    with pytest.raises(WrnDetError) as e:
        coco.load_coco_json(path, root)
    msg = str(e.value)
    assert expected in msg and path in msg and "\n" not in msg


def test_builtin_names_follow_detectron2_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(WrnDetError) as e:
        catalog.DatasetCatalog.get("coco_2014_minival")
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "coco/annotations/instances_minival2014.json") in msg
    assert "datasets/README.md" in msg
    for name in ("coco_2017_train", "coco_2017_val", "coco_2014_train", "coco_2014_val", "coco_2014_valminusminival"):
        assert name in catalog.DatasetCatalog
    # a COCO tree under the root is found by name
    write_coco_split(tmp_path, "val2017", IMAGES[:1], [ann(1, 1, 5, [1, 1, 2, 2])], CATS)
    d = catalog.DatasetCatalog.get("coco_2017_val")
    assert d[0]["file_name"] == os.path.join(str(tmp_path), "coco/val2017/a.jpg")


def test_register_coco_instances_accepts_detectron2_order(tmp_path):
    root = str(tmp_path)
    path = write_coco(tmp_path / "instances.json", IMAGES[:1], [ann(1, 1, 5, [1, 1, 2, 2])], CATS, root)
    coco.register_coco_instances("t_d2order", {"note": "x"}, path, root)
    try:
        assert len(catalog.DatasetCatalog.get("t_d2order")) == 1
        assert catalog.MetadataCatalog.get("t_d2order").note == "x"
    finally:
        catalog.DatasetCatalog.remove("t_d2order")


def test_shapes_generated_once_with_exact_boxes(tmp_path):
    folder = shapes.ensure_shapes(str(tmp_path))
    stamp = os.path.getmtime(os.path.join(folder, "annotations", "instances_val.json"))
    assert shapes.ensure_shapes(str(tmp_path)) == folder  # second call reuses the files
    assert os.path.getmtime(os.path.join(folder, "annotations", "instances_val.json")) == stamp
    data = json.load(open(os.path.join(folder, "annotations", "instances_val.json")))
    assert len(data["images"]) == shapes.SPLITS["val"][0]
    assert {c["name"] for c in data["categories"]} == {"square", "circle", "triangle"}
    # boxes lie inside their image, do not overlap, and hold the drawn area
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    by_image = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H and 0 < a["area"] <= w * h
        by_image.setdefault(a["image_id"], []).append((x, y, x + w, y + h))
    for boxes in by_image.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_shapes_of_an_older_version_are_replaced_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "SPLITS", {"train": (3, 1), "val": (2, 2)})  # small: only the folder's fate counts
    folder = shapes.ensure_shapes(str(tmp_path))
    path = os.path.join(folder, "annotations", "instances_val.json")
    data = json.load(open(path))
    data["info"]["version"] = "0"
    with open(path, "w") as f:
        json.dump(data, f)
    open(os.path.join(folder, "left_over.txt"), "w").write("from the old version")
    assert shapes.ensure_shapes(str(tmp_path)) == folder
    assert json.load(open(path))["info"]["version"] == str(shapes.VERSION)
    assert not os.path.exists(os.path.join(folder, "left_over.txt"))
    assert os.listdir(tmp_path) == ["shapes"]  # no temporary or old folder left beside it


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    from wrn_det.engine.fileio import atomic_write_dir

    target = tmp_path / "data" / "shapes"

    def write(name):
        return lambda tmp: open(os.path.join(tmp, name), "w").write(name)

    def half(tmp):
        write("a.jpg")(tmp)
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        atomic_write_dir(str(target), half)
    assert os.listdir(tmp_path / "data") == []
    assert atomic_write_dir(str(target), write("new.txt")) == str(target)
    mask = os.umask(0)
    os.umask(mask)
    assert os.listdir(target) == ["new.txt"] and os.stat(target).st_mode & 0o777 == 0o777 & ~mask  # as mkdir makes it
    # a finished copy already there (another process's) is kept; one that is not is replaced
    atomic_write_dir(str(target), write("other.txt"), is_complete=lambda p: True)
    assert os.listdir(target) == ["new.txt"]
    atomic_write_dir(str(target), write("other.txt"), is_complete=lambda p: False)
    assert os.listdir(target) == ["other.txt"] and os.listdir(tmp_path / "data") == ["shapes"]
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(WrnDetError, match=f"cannot write {tmp_path / 'file'}"):
        atomic_write_dir(str(tmp_path / "file"), write("x"))
    assert (tmp_path / "file").read_text() == "in the way"


def test_mapper_resizes_and_flips_boxes(tmp_path):
    root = str(tmp_path)
    anns = [ann(1, 1, 5, [10, 4, 20, 8]), ann(2, 1, 9, [0, 0, 60, 40], 1)]
    path = write_coco(tmp_path / "instances.json", IMAGES[:1], anns, CATS, root)
    d = coco.load_coco_json(path, root)[0]
    cfg = get_det_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (20,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    mapper = DetectionMapper(cfg, is_train=True)
    flips = set()
    for seed in range(8):
        out = mapper(d, seed)
        assert tuple(out["image"].shape) == (3, 20, 30) and out["image"].dtype == torch.uint8
        assert out["classes"].tolist() == [0]  # the crowd box is dropped
        b = out["boxes"][0].tolist()
        flipped = b[0] > 10
        flips.add(flipped)
        expected = [15 - 0, 2, 30 - 5, 6] if flipped else [5, 2, 15, 6]
        assert b == pytest.approx(expected, abs=1e-4)
        assert torch.equal(mapper(d, seed)["image"], out["image"])  # the seed alone decides
    assert flips == {True, False}
    test = DetectionMapper(cfg, is_train=False)
    cfg.INPUT.MIN_SIZE_TEST = 20
    assert "boxes" not in test(d)


def test_mapper_reports_missing_image(tmp_path):
    images = [dict(IMAGES[0], write=False)]
    root = str(tmp_path)
    path = write_coco(tmp_path / "instances.json", images, [ann(1, 1, 5, [1, 1, 2, 2])], CATS, root)
    d = coco.load_coco_json(path, root)[0]
    out = DetectionMapper(get_det_cfg(), is_train=True)(d, 0)
    assert isinstance(out, LoadError) and os.path.join(root, "a.jpg") in out["message"]


def test_sampler_groups_aspect_and_resumes_at_any_iteration():
    groups = [0, 1] * 10 + [0] * 5
    full = GroupedTrainingSampler(groups, 3, seed=7)
    it = iter(full)
    batches = [next(it) for _ in range(30)]
    for b in batches:
        assert len({groups[i] for i, _ in b}) == 1
    late = iter(GroupedTrainingSampler(groups, 3, seed=7, start_iter=17))
    assert [next(late) for _ in range(13)] == batches[17:]
    # two ranks split one stream: disjoint at first, different seeds per rank
    r0, r1 = iter(GroupedTrainingSampler(groups, 3, 7, 0, 2)), iter(GroupedTrainingSampler(groups, 3, 7, 1, 2))
    assert next(r0) != next(r1)
    shards = [InferenceSampler(10, r, 3).indices for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_inference_batches_hold_one_image_size_and_every_image_once():
    """TEST.IMS_PER_BATCH > 1: batches of one original size (padding then changes no image), each image once."""
    sizes = [(64, 80), (80, 64), (64, 80), (64, 80), (80, 64), (64, 80), (48, 48), (64, 80)]
    for world in (1, 2):
        seen = []
        for rank in range(world):
            sampler = InferenceSampler(len(sizes), rank, world, batch_size=3, sizes=sizes)
            batches = [[i for i, _ in b] for b in sampler]
            assert len(batches) == len(sampler) and sum(map(len, batches)) == sampler.num_images
            assert all(len(b) <= 3 and len({sizes[i] for i in b}) == 1 for b in batches)
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(len(sizes)))
    assert [[i for i, _ in b] for b in InferenceSampler(len(sizes), batch_size=3, sizes=sizes)] == \
        [[0, 2, 3], [5, 7], [1, 4], [6]]
    # one at a time (the default): dataset order
    assert [b for b in InferenceSampler(4)] == [[(0, 0)], [(1, 0)], [(2, 0)], [(3, 0)]]


def test_inference_batch_size_below_one_is_a_config_error():
    from wrn_det.data.det_loader import build_detection_test_loader
    from wrn_det.engine.config import load_config
    from wrn_det.engine.errors import ConfigError

    cfg = load_config(get_det_cfg(), None, ["TEST.IMS_PER_BATCH", "0"])
    with pytest.raises(ConfigError, match="TEST.IMS_PER_BATCH must be a positive number of images, got 0"):
        build_detection_test_loader(cfg, [])
