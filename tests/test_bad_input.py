"""Bad input, as a hostile but ordinary user gives it: one ``error:`` line naming the file, key or id, exit status 2,
no traceback, no side effect, and nothing written (no OUTPUT_DIR) when a run is refused.

Each test makes its own data in the real on-disk formats and runs the tools' entry points as
the command line does. The COCO loader is also fuzzed: a few hundred seeded mutations of a
valid file either load with every box valid or raise the project's error, never another exception.
"""
import copy
import json
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from helpers import TINY_DET, load_tool, run_tool, run_tool_in_process, write_coco_split

from wrn_det.data.cls_synthetic import synthetic_stripes, write_cifar, write_synthetic_cifar
from wrn_det.engine.cli import cli_main
from wrn_det.engine.errors import WrnDetError

pytestmark = pytest.mark.usefixtures("one_thread_module")

# batches that fit the 40-image synthetic CIFAR sets of these tests
CLS_BATCH = ["SOLVER.IMS_PER_BATCH", "20", "TEST.IMS_PER_BATCH", "20"]
CAT = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]


def _image(i, h=32, w=48):
    return {"id": i, "file_name": f"{i:06d}.jpg", "height": h, "width": w}


def _ann(i, img, bbox, cat=1, crowd=0):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": 1.0}


GOOD_IMAGES = [_image(1), _image(2), _image(3, 40, 40)]
GOOD_ANNS = [_ann(1, 1, [2, 2, 10, 10]), _ann(2, 2, [4, 4, 12, 8], 2), _ann(3, 3, [1, 1, 20, 20])]


@pytest.fixture
def root(tmp_path):
    """A valid little COCO tree (train2017 and val2017) under tmp_path/root; returns its path."""
    r = str(tmp_path / "root")
    write_coco_split(r, "train2017", GOOD_IMAGES, GOOD_ANNS, CAT)
    write_coco_split(r, "val2017", GOOD_IMAGES[:2], GOOD_ANNS[:2], CAT)
    return r


def det_argv(out, *extra):
    return ["--config-file", "shapes_wrn_frcnn.yaml", *TINY_DET, "MODEL.ROI_HEADS.NUM_CLASSES", "2",
            "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MIN_SIZE_TEST", "32", "SOLVER.MAX_ITER", "1",
            "OUTPUT_DIR", str(out), *extra]


def refused(status, err, *expected):
    """Assert one ``error:`` line holding every ``expected`` phrase, exit status 2; returns the line."""
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (status, err)
    for e in expected:
        assert str(e) in lines[0], (e, lines[0])
    return lines[0]


def _tool_status(name, argv):
    """Return the exit status of ``tools/<name>.py ARGV`` run in this process (its output stays in capsys)."""
    tool = load_tool(name)
    return cli_main(tool.main, tool.parse_args(argv))


def train_net(argv, root, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    return run_tool_in_process("train_net", list(map(str, argv)), capsys)


# ------------------------------------------------------------------ 1. no code runs from a CIFAR batch


class _Shell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_cifar_batch_that_runs_a_command_is_refused_whatever_the_checksum_setting(tmp_path, capsys):
    data = write_synthetic_cifar(str(tmp_path / "data"), n_train=40, n_test=20)
    batch = os.path.join(data, "cifar-10-batches-py", "data_batch_2")
    entry = pickle.loads(open(batch, "rb").read(), encoding="latin1")
    entry["batch_label"] = _Shell(str(tmp_path / "pwned"))
    with open(batch, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    out = tmp_path / "out"
    status, err = run_tool_in_process("train_cls", ["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", data,
                                                    "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out)], capsys)
    refused(status, err, batch, "refused to load global posix.system", "nothing from it was run")
    assert not (tmp_path / "pwned").exists() and not out.exists()


# ------------------------------------------------------------------ 2. no hang


@pytest.mark.parametrize("batch", ["0", "-2"])
def test_non_positive_batch_is_an_error_not_a_hang(root, tmp_path, batch):
    out = tmp_path / "out"
    r = run_tool("train_net", *det_argv(out, "SOLVER.IMS_PER_BATCH", batch), datasets_root=root, timeout=120)
    refused(r.returncode, r.stderr, f"SOLVER.IMS_PER_BATCH ({batch}) must be a positive multiple")
    assert not out.exists()


# ------------------------------------------------------------------ 3. broken data is not trained on


@pytest.mark.parametrize("case, expected", [
    ("duplicate_image_id", "image id 2 is listed twice"),
    ("nan_box", "annotation id 2 (image id 2) has bbox [nan, 4, 12, 8]; expected finite numbers"),
    ("infinite_box", "annotation id 2 (image id 2) has bbox [4, 4, inf, 8]; expected finite numbers"),
    ("box_outside", "annotation id 3 (image id 3) has bbox [50, 50, 5, 5], entirely outside its 40x40 image"),
    ("unknown_image", "annotation id 3 has image_id 99, which names no image"),
    ("truncated_jpeg", "000002.jpg is truncated"),
    ("missing_image", "000003.jpg cannot be read: no such file (image id 3"),
    ("wrong_size", "000001.jpg is 48x32 but its annotation says 30x32"),
    ("nan_in_test_ground_truth", "val2017.json: annotation id 2 (image id 2) has bbox [nan,"),
    ("test_image_unreadable", "val2017/000002.jpg cannot be read: not a readable image"),
])
def test_broken_detection_data_is_found_before_training(root, tmp_path, monkeypatch, capsys, case, expected):
    anns, images, split = copy.deepcopy(GOOD_ANNS), copy.deepcopy(GOOD_IMAGES), "train2017"
    if case == "duplicate_image_id":
        images.append(dict(_image(2), file_name="other.jpg"))
    elif case in ("nan_box", "nan_in_test_ground_truth"):
        anns[1]["bbox"][0] = float("nan")
    elif case == "infinite_box":
        anns[1]["bbox"][2] = float("inf")
    elif case == "box_outside":
        anns[2]["bbox"] = [50, 50, 5, 5]
    elif case == "unknown_image":
        anns[2]["image_id"] = 99
    if case in ("nan_in_test_ground_truth", "test_image_unreadable"):
        split, images, anns = "val2017", images[:2], anns[:2]
    path = write_coco_split(root, split, images, anns, CAT)
    img_dir = os.path.join(root, "coco", split)
    if case == "truncated_jpeg":
        jpg = os.path.join(img_dir, "000002.jpg")
        data = open(jpg, "rb").read()
        open(jpg, "wb").write(data[: len(data) // 2])
    elif case == "missing_image":
        os.remove(os.path.join(img_dir, "000003.jpg"))
    elif case == "wrong_size":
        images[0]["width"] = 30
        write_coco_split(root, split, images, anns, CAT, write_images=False)
    elif case == "test_image_unreadable":
        open(os.path.join(img_dir, "000002.jpg"), "w").write("not an image")
    out = tmp_path / "out"
    status, err = train_net(det_argv(out), root, monkeypatch, capsys)
    line = refused(status, err, expected)
    if "annotation id" in expected or "image id 2 is" in expected:
        assert path in line
    assert not out.exists()  # found before the run wrote anything


@pytest.mark.parametrize("case, expected", [
    ("fewer_labels", "has 100 images but 97 labels"),
    ("float_data", "has 'data' of dtype float64; expected a uint8 array"),
    ("float_labels", "has 'labels' of dtype float64; expected a list of integer class ids"),
    ("label_out_of_range", "has labels in [0, 12]; expected class ids 0..9"),
])
def test_broken_cifar_batches_are_named(tmp_path, case, expected):
    from wrn_det.data.classification import read_cifar

    images, labels = synthetic_stripes(100)
    write_cifar(str(tmp_path), (images, labels), (images, labels))
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes(), encoding="latin1")
    if case == "fewer_labels":
        entry["labels"] = entry["labels"][:97]
    elif case == "float_data":
        entry["data"] = entry["data"].astype(np.float64) * 40.0
    elif case == "float_labels":
        entry["labels"] = [float(v) for v in entry["labels"]]
    else:
        entry["labels"][5] = 12
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(WrnDetError) as e:
        read_cifar(str(tmp_path), "cifar10", train=False, verify_checksums=False)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_crowd_and_empty_boxes_are_dropped_with_a_count(tmp_path, caplog):
    from wrn_det.data.coco import load_coco_json

    anns = GOOD_ANNS + [_ann(4, 1, [3, 3, 0, 5]), _ann(5, 2, [1, 1, 4, 4], crowd=1)]
    path = write_coco_split(str(tmp_path), "train2017", GOOD_IMAGES, anns, CAT)
    with caplog.at_level("INFO", logger="wrn_det"):
        dicts = load_coco_json(path, str(tmp_path))
    assert sum(len(d["annotations"]) for d in dicts) == 4  # the empty box is gone, the crowd box kept (masked later)
    assert "dropped 1 annotations with an empty box" in caplog.text


# ------------------------------------------------------------------ 4. strict weights


def _detector_checkpoint(tmp_path, root, monkeypatch, capsys, *extra):
    out = tmp_path / "ref"
    status, err = train_net(det_argv(out, *extra), root, monkeypatch, capsys)
    assert status == 0, err
    return out / "model_final.pth"


def test_detector_checkpoint_of_another_network_or_class_count_is_refused(root, tmp_path, monkeypatch, capsys):
    other = _detector_checkpoint(tmp_path, root, monkeypatch, capsys, "MODEL.WRN.NAME", "wrn_16_1",
                                 "DATASETS.TEST", "()")
    for opts, expected in ((["MODEL.WEIGHTS", other], "does not fit this GeneralizedRCNN"),
                           (["MODEL.WEIGHTS", other, "MODEL.WRN.NAME", "wrn_16_1", "MODEL.ROI_HEADS.NUM_CLASSES", "3"],
                            "roi_heads.box_predictor.cls_score.weight (3, 64) (the model has (4, 64))")):
        for eval_only in ([], ["--eval-only"]):
            out = tmp_path / "out"
            status, err = train_net(eval_only + det_argv(out, *opts), root, monkeypatch, capsys)
            refused(status, err, "MODEL.WEIGHTS", other, expected, "MODEL.WRN.STRICT_WEIGHTS False")
            assert not out.exists()


def test_classification_eval_only_with_missing_tensors_is_refused(tmp_path, capsys):
    from wrn_det.models import build_model

    data = write_synthetic_cifar(str(tmp_path / "data"), n_train=40, n_test=20)
    state = build_model("wrn_22_1").state_dict()
    dropped = [k for k in state if k.startswith("stage2.") and not k.endswith("num_batches_tracked")][:30]
    torch.save({"model": {k: v for k, v in state.items() if k not in dropped}}, tmp_path / "w.pth")
    out = tmp_path / "out"
    status, err = run_tool_in_process("train_cls", ["--eval-only", "MODEL.NAME", "wrn_22_1", "DATASETS.ROOT", data,
                                                    "DATASETS.VERIFY_CHECKSUMS", "False", "MODEL.WEIGHTS",
                                                    str(tmp_path / "w.pth"), "OUTPUT_DIR", str(out), *CLS_BATCH], capsys)
    assert len(dropped) == 30
    refused(status, err, tmp_path / "w.pth", "missing 30 of", dropped[0])
    assert not out.exists()


# ------------------------------------------------------------------ 5. one line, not a traceback


@pytest.mark.parametrize("case, expected", [
    ("base_cycle", "_BASE_ files form a cycle (a.yaml -> b.yaml -> a.yaml)"),
    ("yaml_list", "the top level is a list; expected a YAML mapping"),
    ("yaml_string", "the top level is a str; expected a YAML mapping"),
    ("yaml_empty", "the file is empty; expected a YAML mapping"),
])
def test_malformed_config_files_are_one_line(tmp_path, monkeypatch, capsys, case, expected):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text({"base_cycle": "_BASE_: b.yaml\n", "yaml_list": "- 1\n- 2\n", "yaml_string": "just words\n",
                  "yaml_empty": ""}[case])
    b.write_text("_BASE_: a.yaml\n")
    out = tmp_path / "out"
    for tool in ("train_net", "train_cls"):
        status, err = run_tool_in_process(tool, ["--config-file", str(a), "OUTPUT_DIR", str(out)], capsys)
        refused(status, err, expected, "a.yaml")
    assert not out.exists()


@pytest.mark.parametrize("case, expected", [
    ("string_in_bbox", "has bbox [2, '2', 10, 10]; expected [x, y, width, height], four numbers"),
    ("no_height", "image id 1 has height None; expected a positive integer"),
    ("no_categories", "has no 'categories' list"),
    ("no_images", "has no 'images' list"),
    ("not_json", "not valid JSON"),
    ("num_classes_too_small", "MODEL.ROI_HEADS.NUM_CLASSES is 1 but dataset coco_2017_train has 2 categories"),
])
def test_malformed_coco_files_are_one_line(root, tmp_path, monkeypatch, capsys, case, expected):
    images, anns = copy.deepcopy(GOOD_IMAGES), copy.deepcopy(GOOD_ANNS)
    extra = []
    if case == "string_in_bbox":
        anns[0]["bbox"][1] = "2"
    elif case == "no_height":
        del images[0]["height"]
    if case in ("no_categories", "no_images", "not_json"):
        data = {"images": images, "annotations": anns, "categories": CAT}
        del data[{"no_categories": "categories", "no_images": "images"}.get(case, "images")]
        write_coco_split(root, "train2017", images, anns, CAT, raw="{oops" if case == "not_json" else json.dumps(data))
    else:
        write_coco_split(root, "train2017", images, anns, CAT)
    if case == "num_classes_too_small":
        extra = ["MODEL.ROI_HEADS.NUM_CLASSES", "1"]
    out = tmp_path / "out"
    status, err = train_net(det_argv(out, *extra), root, monkeypatch, capsys)
    refused(status, err, expected)
    assert not out.exists()


def test_text_file_as_weights_is_one_line_in_every_tool(root, tmp_path, monkeypatch, capsys):
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n" * 20)
    data = write_synthetic_cifar(str(tmp_path / "data"), n_train=40, n_test=20)
    status, err = train_net(det_argv(tmp_path / "o1", "MODEL.WEIGHTS", text), root, monkeypatch, capsys)
    refused(status, err, text, "not a file written by torch.save")
    status, err = run_tool_in_process("train_cls", ["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", data,
                                                    "DATASETS.VERIFY_CHECKSUMS", "False", "MODEL.WEIGHTS", str(text),
                                                    "OUTPUT_DIR", str(tmp_path / "o2"), *CLS_BATCH], capsys)
    refused(status, err, text, "not a file written by torch.save")
    assert _tool_status("convert_weights", [str(text), str(tmp_path / "o3")]) == 2
    refused(2, capsys.readouterr().err, text, "not a file written by torch.save")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3.pth", "o3.pkl"))


def test_output_paths_in_the_way_of_a_file(root, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = write_synthetic_cifar(str(tmp_path / "data"), n_train=40, n_test=20)
    for out in (blocker, blocker / "run"):
        status, err = train_net(det_argv(out), root, monkeypatch, capsys)
        refused(status, err, f"OUTPUT_DIR '{out}'", "expected a folder")
        status, err = run_tool_in_process("train_cls", ["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", data,
                                                        "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out)],
                                          capsys)
        refused(status, err, f"OUTPUT_DIR '{out}'", "expected a folder")
    src = tmp_path / "r18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), src)
    assert _tool_status("convert_weights", [str(src), str(blocker / "w")]) == 2
    refused(2, capsys.readouterr().err, f"{blocker} is not a folder")
    rows = tmp_path / "metrics.json"
    rows.write_text(json.dumps({"epoch": 1, "train_top1_err": 50.0}) + "\n")
    assert _tool_status("plot_logs", [str(rows), "-o", str(blocker / "c.png")]) == 2
    refused(2, capsys.readouterr().err, f"{blocker} is not a folder")
    assert blocker.read_text() == "x"


def test_plot_logs_with_values_of_the_wrong_type(tmp_path, capsys):
    log = tmp_path / "metrics.json"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"epoch": 1, "train_top1_err": "lots", "test_top1_err": None, "train_loss": [1]},
        {"epoch": 2, "train_top1_err": 40.0, "test_top1_err": 45.0, "train_loss": 1.5, "test_acc": "x"}]) + "\n")
    assert _tool_status("plot_logs", [str(log), "-o", str(tmp_path / "ok.png")]) == 0
    capsys.readouterr()
    log.write_text(json.dumps({"epoch": "one", "train_loss": 1.0}) + "\n")
    assert _tool_status("plot_logs", [str(log), "-o", str(tmp_path / "bad.png")]) == 2
    refused(2, capsys.readouterr().err, log, "epoch is 'one'; expected a number")
    assert not (tmp_path / "bad.png").exists()
    from wrn_det.engine.curves import read_run

    det = tmp_path / "det"
    det.mkdir()
    (det / "metrics.json").write_text(json.dumps({"iteration": "x", "total_loss": "y"}) + "\n[1, 2]\n")
    with pytest.raises(WrnDetError, match=r"metrics.json, line 2: not a JSON object"):
        read_run(str(det))


# ------------------------------------------------------------------ 6. failures that used to come late


@pytest.mark.parametrize("opts, expected", [
    (["DATASETS.TEST", "('no_such_set',)"], "dataset 'no_such_set' is not registered"),
    (["TEST.COCO_EVAL_BACKEND", "fast"], "TEST.COCO_EVAL_BACKEND must be one of faster_coco_eval, pycocotools"),
    (["DATASETS.TEST", "('coco_2014_minival',)"], "instances_minival2014.json not found"),
    (["MODEL.PIXEL_STD", "[1.0, 0.0, 1.0]"], "MODEL.PIXEL_STD must be three positive numbers"),
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be positive"),
    (["MODEL.FPN.IN_FEATURES", "['stage2', 'stage9']"], "MODEL.FPN.IN_FEATURES: 'stage9' is not a stage of wrn_10_1"),
    (["LOG_PERIOD", "0"], "LOG_PERIOD must be a positive number"),
])
def test_config_problems_are_found_before_anything_is_written(root, tmp_path, monkeypatch, capsys, opts, expected):
    out = tmp_path / "out"
    status, err = train_net(det_argv(out, *opts), root, monkeypatch, capsys)
    refused(status, err, expected)
    assert not out.exists()


def test_bad_process_counts_are_refused(tmp_path):
    r = run_tool("train_net", "--num-gpus", "-1", "--config-file", "shapes_wrn_frcnn.yaml")
    assert r.returncode == 2 and "--num-gpus: expected an integer >= 1, got -1" in r.stderr
    r = run_tool("train_cls", "--num-machines", "2", "--machine-rank", "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --machine-rank 2 must be below --num-machines 2"], r.stderr


# ------------------------------------------------------------------ 7. nothing half-written or overwritten


def test_weight_conversion_writes_both_files_or_neither(tmp_path, capsys):
    import torchvision

    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    (tmp_path / "w.pkl").mkdir()  # the second output cannot be written
    assert _tool_status("convert_weights", [str(src), str(tmp_path / "w")]) == 2
    refused(2, capsys.readouterr().err, tmp_path / "w.pkl", "it is a folder")
    assert not (tmp_path / "w.pth").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_rejected_rerun_and_missing_last_checkpoint_leave_a_finished_run_as_it_was(root, tmp_path, monkeypatch,
                                                                                     capsys):
    out = tmp_path / "run"
    status, err = train_net(det_argv(out, "DATASETS.TEST", "()"), root, monkeypatch, capsys)
    assert status == 0, err
    before = {p: (out / p).read_bytes() for p in ("config.yaml", "model_final.pth", "metrics.json")}
    status, err = train_net(det_argv(out, "DATASETS.TEST", "()", "SOLVER.BASE_LR", "-1"), root, monkeypatch, capsys)
    assert status == 2 and "SOLVER" in err
    (out / "model_final.pth").rename(out / "moved.pth")  # last_checkpoint now names a file that is gone
    status, err = train_net(["--resume", *det_argv(out, "DATASETS.TEST", "()")], root, monkeypatch, capsys)
    refused(status, err, out / "last_checkpoint", "'model_final.pth', which is not in", "remove last_checkpoint")
    (out / "moved.pth").rename(out / "model_final.pth")
    assert {p: (out / p).read_bytes() for p in before} == before


# ------------------------------------------------------------------ 8. messages


def test_messages_name_the_key_and_the_global(root, tmp_path, monkeypatch, capsys):
    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, evil)
    status, err = train_net(det_argv(tmp_path / "o", "MODEL.WEIGHTS", evil), root, monkeypatch, capsys)
    line = refused(status, err, "refused to load global posix.system", evil)
    assert "weights_only" not in line  # torch's advice to load it unsafely is not passed on
    bad = tmp_path / "list.pkl"
    bad.write_bytes(pickle.dumps(3))
    from wrn_det.data.proposals import load_proposal_file

    with pytest.raises(WrnDetError, match="holds an int; expected a dict"):
        load_proposal_file(str(bad))
    # an unreadable image: the one line, no OpenCV warning around it
    open(os.path.join(root, "coco", "train2017", "000001.jpg"), "w").write("garbage")
    r = run_tool("train_net", *det_argv(tmp_path / "o2", "DATALOADER.CHECK_IMAGES", "False"), datasets_root=root,
                 timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "[ WARN" not in r.stderr, r.stderr


# ------------------------------------------------------------------ fuzzing the COCO loader


def _mutations(rng):
    """Yield ``(description, mutate(data))`` for a valid COCO dict."""
    values = [None, "x", -1, 0, 1e308, -1e308, float("nan"), float("inf"), [], {}, [1, 2], True, 10 ** 30, 3.5]
    while True:
        where = rng.choice(["images", "annotations", "categories", "top"])
        op = rng.choice(["delete", "set", "duplicate", "swap_type"])
        yield where, op, rng.random(), rng.choice(values)


def _apply(data, where, op, u, value):
    if where == "top":
        key = list(data)[int(u * len(data))]
        if op == "delete":
            del data[key]
        else:
            data[key] = value
        return
    items = data[where]
    item = items[int(u * len(items))]
    keys = list(item)
    key = keys[int(u * 997) % len(keys)]
    if op == "delete":
        del item[key]
    elif op == "duplicate":
        items.append(copy.deepcopy(item))
    elif op == "swap_type" and key == "bbox":
        item["bbox"][int(u * 4)] = value
    else:
        item[key] = value


def test_fuzzed_coco_files_load_cleanly_or_raise_one_line(tmp_path):
    from wrn_det.data.coco import load_coco_json

    rng = random.Random(1234)
    base = {"images": copy.deepcopy(GOOD_IMAGES), "annotations": copy.deepcopy(GOOD_ANNS), "categories": CAT}
    path = tmp_path / "fuzz.json"
    outcomes = {"ok": 0, "refused": 0}
    gen = _mutations(rng)
    for _ in range(300):
        data = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            try:
                _apply(data, *next(gen))
            except (KeyError, IndexError, TypeError, ZeroDivisionError):
                pass  # the mutation did not apply (a key already deleted): the file is whatever is left
        path.write_text(json.dumps(data))
        try:
            dicts = load_coco_json(str(path), str(tmp_path))
        except WrnDetError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        for d in dicts:
            assert isinstance(d["height"], int) and d["height"] > 0 and isinstance(d["width"], int) and d["width"] > 0
            for a in d["annotations"]:
                x, y, w, h = a["bbox"]
                assert all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
                assert x < d["width"] and y < d["height"] and x + w > 0 and y + h > 0
                assert a["category_id"] in (0, 1)
    # both sides were exercised (measured: 12 loaded, 288 refused)
    assert outcomes["ok"] >= 5 and outcomes["refused"] >= 100, outcomes


@pytest.mark.slow
def test_bad_input_in_a_two_process_run_is_still_one_line(tmp_path):
    out = tmp_path / "out"
    r = run_tool("train_net", "--num-gpus", "2", "--config-file", "shapes_wrn_frcnn.yaml", *TINY_DET[:-4],
                 "DATASETS.TRAIN", "('coco_2017_train',)", "OUTPUT_DIR", str(out), datasets_root=tmp_path / "none",
                 timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "instances_train2017.json not found" in lines[0], r.stderr  # no "Terminating process"
    assert not out.exists()
