"""Fixtures shared by the test files."""
import os
import time
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import torch

# shapes drawn natively at 64 pixels, like the demo's training size
SHAPES_DRAW = dict(sides=(64,), min_size=12.0, max_frac=0.6, max_objects=4)

# the learning test's detector: the demo's WRN-FPN narrowed to WRN-10-1, 1300 iterations of 2 images
# on coco_2017_train of det_coco_root (seed 1 from shapes_wrn_frcnn.yaml)
SHAPES_DETECTOR_CONFIG = "shapes_wrn_frcnn.yaml"
SHAPES_DETECTOR_OPTS = [
    "MODEL.WRN.NAME", "wrn_10_1", "DATASETS.TRAIN", "('coco_2017_train',)",
    "DATASETS.TEST", "('coco_2017_val',)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.02",
    "SOLVER.MAX_ITER", "1300", "SOLVER.STEPS", "(1050,)", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "0", "MODEL.DEVICE", "cpu",
]


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, restoring the previous count after it.

    The test machines are small and shared: one thread avoids OpenMP threads spinning
    against other jobs, which made training steps several times slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def det_coco_root(tmp_path_factory) -> str:
    """A fake COCO tree in detectron2's layout (train2017: 800 images, val2017: 100) of 64-pixel shapes.

    Returns the datasets root (what ``DETECTRON2_DATASETS`` points at).
    """
    from wrn_det.data import shapes

    root = tmp_path_factory.mktemp("d2root")
    shapes.generate_split(str(root / "coco"), "train2017", 800, seed=11, **SHAPES_DRAW)
    shapes.generate_split(str(root / "coco"), "val2017", 100, seed=12, **SHAPES_DRAW)
    return str(root)


class TrainedDetector(NamedTuple):
    """A shapes detector trained once per test session (see :func:`trained_shapes_detector`)."""

    dir: Path                       # the run folder: config.yaml, model_final.pth, metrics.json, inference/
    results: Dict[str, Dict[str, float]]  # what Trainer.train() returned (the final evaluation on coco_2017_val)
    datasets_root: str              # DETECTRON2_DATASETS of the run
    seconds: float                  # training and evaluation time
    opts: List[str]                 # the config overrides, over SHAPES_DETECTOR_CONFIG

    @property
    def weights(self) -> str:
        """Return the path of the final checkpoint."""
        return str(self.dir / "model_final.pth")


@pytest.fixture(scope="session")
def trained_shapes_detector(det_coco_root, tmp_path_factory) -> TrainedDetector:
    """Train the learning test's WRN-10-1-FPN detector once for the whole session; returns the run.

    About 3 minutes on the 2-core development machine. The run folder is laid out as
    tools/train_net.py leaves it (config.yaml included), so tools can be pointed at it.
    """
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config, save_config

    out = tmp_path_factory.mktemp("shapes_detector")
    opts = SHAPES_DETECTOR_OPTS + ["OUTPUT_DIR", str(out)]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", det_coco_root)
        torch.set_num_threads(1)
        try:
            cfg = load_config(get_det_cfg(), SHAPES_DETECTOR_CONFIG, opts)
            save_config(cfg, os.path.join(out, "config.yaml"))
            t0 = time.time()
            results = Trainer(cfg).train()
            seconds = time.time() - t0
        finally:
            torch.set_num_threads(threads)
    return TrainedDetector(out, results, det_coco_root, seconds, opts)
