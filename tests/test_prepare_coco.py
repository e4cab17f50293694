"""datasets/prepare_coco.py on small fake COCO trees."""
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, tool_env

SCRIPT = os.path.join(REPO, "datasets", "prepare_coco.py")
CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _coco(image_ids, prefix):
    images = [{"id": i, "file_name": f"{prefix}_{i:012d}.jpg", "height": 10, "width": 10} for i in image_ids]
    anns, k = [], 1
    for i in image_ids:
        for j in range(i % 3 + 1):  # 1 to 3 boxes per image
            anns.append({"id": k, "image_id": i, "category_id": CATS[j % 2]["id"], "bbox": [0, 0, 5, 5],
                         "area": 25, "iscrowd": 0})
            k += 1
    return {"info": {"year": 2014}, "licenses": [], "categories": CATS, "images": images, "annotations": anns}


def make_tree(root, with_val2017=True, with_val2014_images=True):
    """Write a fake COCO folder: val2014 with 12 images, val2017 holding 5 of them plus one from train2014."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    val2014_ids = list(range(100, 112))
    (ann / "instances_val2014.json").write_text(json.dumps(_coco(val2014_ids, "COCO_val2014")))
    if with_val2017:
        # val2017 = 5 val2014 images + one image that val2014 lacks (a train2014 one)
        (ann / "instances_val2017.json").write_text(json.dumps(_coco([101, 103, 104, 108, 111, 7], "x")))
    if with_val2014_images:
        (root / "val2014").mkdir()
        for i in val2014_ids:
            (root / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"jpeg")
    return val2014_ids


def run(*args, env_root=None):
    env = tool_env(env_root)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_builds_disjoint_minival_and_valminusminival(tmp_path):
    coco = tmp_path / "coco"
    val2014_ids = make_tree(coco)
    r = run(env_root=tmp_path)  # default folder: $DETECTRON2_DATASETS/coco
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready: coco_2014_minival, coco_2014_valminusminival" in r.stdout
    assert "1 of the 6 val2017 image ids are not in" in r.stdout  # the train2014 image is reported
    minival = json.loads((coco / "annotations" / "instances_minival2014.json").read_text())
    rest = json.loads((coco / "annotations" / "instances_valminusminival2014.json").read_text())
    val2014 = json.loads((coco / "annotations" / "instances_val2014.json").read_text())
    a = [im["id"] for im in minival["images"]]
    b = [im["id"] for im in rest["images"]]
    assert a == [101, 103, 104, 108, 111]
    assert not set(a) & set(b) and sorted(a + b) == val2014_ids
    # annotations follow their images, none lost, none duplicated
    assert {x["image_id"] for x in minival["annotations"]} == set(a)
    assert {x["image_id"] for x in rest["annotations"]} == set(b)
    ids = sorted(x["id"] for x in minival["annotations"] + rest["annotations"])
    assert ids == sorted(x["id"] for x in val2014["annotations"])
    assert minival["categories"] == rest["categories"] == CATS
    # readable like any file the user writes (not mkstemp's owner-only mode)
    mask = os.umask(0)
    os.umask(mask)
    assert (coco / "annotations" / "instances_minival2014.json").stat().st_mode & 0o777 == 0o666 & ~mask
    # the catalog reads them under detectron2's names
    env = tool_env(tmp_path)
    code = ("from wrn_det.data.catalog import DatasetCatalog as D; "
            "print(len(D.get('coco_2014_minival')), len(D.get('coco_2014_valminusminival')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.stdout.split() == ["5", "7"], out.stderr
    # a second run keeps the files; --force rebuilds them
    assert "kept" in run("--root", str(coco)).stdout
    assert "wrote" in run("--root", str(coco), "--force").stdout


def test_missing_val2017_json_is_named_and_nothing_written(tmp_path):
    coco = tmp_path / "coco"
    make_tree(coco, with_val2017=False)
    r = run("--root", str(coco))
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "annotations/instances_val2017.json" in err[0] and "coco_2014_minival" in err[0]
    assert sorted(os.listdir(coco / "annotations")) == ["instances_val2014.json"]


def test_missing_image_folder_is_named(tmp_path):
    coco = tmp_path / "coco"
    make_tree(coco, with_val2014_images=False)
    r = run("--root", str(coco))
    assert r.returncode != 0
    assert "image folder val2014" in r.stderr and "val2014.zip" in r.stderr
    # the split files are built all the same: only the images are missing
    assert (coco / "annotations" / "instances_minival2014.json").is_file()


def test_check_only_reports_every_catalog_name(tmp_path):
    coco = tmp_path / "coco"
    make_tree(coco)
    r = run("--root", str(coco), "--check-only", "--datasets", "coco_2017_val")
    assert r.returncode != 0
    assert "coco_2017_val needs annotations/instances_val2017.json" not in r.stderr  # it exists
    assert "coco_2017_val needs image folder val2017 (from val2017.zip)" in r.stderr
    for name in ("coco_2017_train", "coco_2014_train", "coco_2014_minival"):
        assert name in r.stdout
    assert not (coco / "annotations" / "instances_minival2014.json").exists()


def test_missing_image_files_with_check_images(tmp_path):
    coco = tmp_path / "coco"
    make_tree(coco)
    (coco / "val2014" / "COCO_val2014_000000000103.jpg").unlink()
    r = run("--root", str(coco), "--check-images")
    assert r.returncode != 0
    assert "1 image files of annotations/instances_minival2014.json in val2014" in r.stderr


@pytest.mark.parametrize("content,msg", [("{not json", "not valid JSON"), ('{"images": 3}', "not a COCO instances")])
def test_malformed_val2014_json(tmp_path, content, msg):
    coco = tmp_path / "coco"
    make_tree(coco)
    (coco / "annotations" / "instances_val2014.json").write_text(content)
    r = run("--root", str(coco))
    assert r.returncode != 0 and msg in r.stderr and "instances_val2014.json" in r.stderr
    assert not (coco / "annotations" / "instances_minival2014.json").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "datasets"))
    import prepare_coco
    from wrn_det.engine.errors import WrnDetError

    coco = tmp_path / "coco"
    make_tree(coco)
    real_dump = json.dump
    calls = []

    def failing_dump(obj, f, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second file fails half-way
            f.write('{"images": [')
            raise OSError(28, "No space left on device")
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(prepare_coco.json, "dump", failing_dump)
    with pytest.raises(WrnDetError, match="No space left"):
        prepare_coco.build_minival(str(coco), log=lambda *a: None)
    assert sorted(os.listdir(coco / "annotations")) == ["instances_val2014.json", "instances_val2017.json"]


def test_missing_coco_folder(tmp_path):
    r = run(env_root=tmp_path / "nowhere")
    assert r.returncode != 0 and "COCO folder" in r.stderr and "DETECTRON2_DATASETS" in r.stderr
