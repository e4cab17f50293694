"""The shapes demo config on an 80-class COCO-layout set trains on both engines to the same box AP.

The command users run, ``tools/train_net.py [--engine detectron2] --config-file shapes_wrn_frcnn.yaml
DATASETS.TRAIN ("coco_2017_train",) MODEL.ROI_HEADS.NUM_CLASSES 80``, on a COCO tree this test writes:
shapes images with COCO's 80 categories (the shapes are three of them). Shortened to stay affordable
(400 iterations of 4 images, both engines at once on one thread each, about three minutes on the 2-core
development machine), it must reach box APs within 5 points of each other on coco_2017_val. Runs in the
detectron2 venv only.
"""
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, tool_env, write_fake_coco

pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source, see the README); "
                                         "the two-engine learning test is skipped")

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES  # noqa: E402

SHORT = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(320,)", "SOLVER.WARMUP_ITERS", "50",
         "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0"]


def write_80_class_coco(root) -> str:
    """Write shapes images as coco_2017_train (500) and coco_2017_val (100) with COCO's 80 categories; returns root."""
    write_fake_coco(root, {"train2017": (500, 21), "val2017": (100, 22)}, sides=(64,), min_size=14.0, max_frac=0.6,
                    max_objects=3)
    # detectron2's table has no supercategory; COCO's files name one
    cats = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    assert len(cats) == 80
    for split in ("train2017", "val2017"):
        path = os.path.join(str(root), "coco", "annotations", f"instances_{split}.json")
        with open(path) as f:
            data = json.load(f)
        data["categories"] = cats  # the shapes keep ids 1, 2, 3: person, bicycle, car
        with open(path, "w") as f:
            json.dump(data, f)
    return str(root)


def test_demo_config_on_80_classes_reaches_the_same_ap_on_both_engines(tmp_path):
    root = write_80_class_coco(tmp_path / "data")
    runs = {}
    for engine in ("builtin", "detectron2"):
        out = tmp_path / engine
        cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--engine", engine, "--config-file",
               "shapes_wrn_frcnn.yaml", "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)",
               "MODEL.ROI_HEADS.NUM_CLASSES", "80", *SHORT, "OUTPUT_DIR", str(out)]
        runs[engine] = (out, subprocess.Popen(cmd, cwd=str(tmp_path), env=tool_env(root), stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True))
    ap = {}
    for engine, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (engine, err[-3000:])
        rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
        ap[engine] = [r["bbox/AP"] for r in rows if "bbox/AP" in r][-1]
    print(f"80 classes: box AP builtin {ap['builtin']:.1f}, detectron2 {ap['detectron2']:.1f}")
    # both learned the shapes: measured (SEED 1) box AP 35.9 builtin, 37.4 detectron2; 200 iterations gave 13.1 and
    # 15.2, an untrained detector 0
    assert ap["builtin"] > 25 and ap["detectron2"] > 25, ap
    assert abs(ap["builtin"] - ap["detectron2"]) <= 5.0, ap
