"""Fixtures shared by the test files: one intra-op thread, the fake COCO tree, the trained shapes detector.

The helpers that are not fixtures (the repository root, running the tools, writing COCO
trees) are in ``helpers.py`` beside this file.
"""
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import pytest
import torch
from helpers import DRAW_64, SHAPES_DETECTOR_CONFIG, SHAPES_DETECTOR_OPTS, write_fake_coco


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Tuple[Path, object]:
    """Return ``(folder, value)``: the folder ``name`` that ``build(folder)`` filled and the JSON value it returned,
    built once for the whole test run.

    Under pytest-xdist each worker has a base temporary folder of its own inside the run's:
    the folder lives in the run's, and the first worker that asks builds it under a file
    lock while the others wait, then read what it left. The value, kept in ``<name>.json``
    beside the folder, is written last: a build that failed (or whose worker died) leaves
    none, and the next worker to ask builds the folder again.
    """
    from filelock import FileLock

    from wrn_det.engine.fileio import write_json

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, done = base / name, base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            write_json(str(done), {"value": build(folder)})
        return folder, json.loads(done.read_text())["value"]


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


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for every test of a module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def det_coco_root(tmp_path_factory) -> str:
    """A fake COCO tree in detectron2's layout (train2017: 800 images, val2017: 100) of 64-pixel shapes.

    Written once for the whole test run (every xdist worker reads the same tree); returns the
    datasets root (what ``DETECTRON2_DATASETS`` points at).
    """
    def build(folder):
        write_fake_coco(folder, {"train2017": (800, 11), "val2017": (100, 12)}, **DRAW_64)

    return str(_built_once(tmp_path_factory, "d2root", build)[0])


class TrainedDetector(NamedTuple):
    """A shapes detector trained once per test run (see :func:`trained_shapes_detector`)."""

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
    """Train the learning test's WRN-10-1-FPN detector once for the whole test run; returns the run.

    About 1.5 minutes on the 2-core development machine, spent by the first xdist worker that
    needs it while the others wait (see :func:`_built_once`). The run folder is laid out as
    tools/train_net.py leaves it (config.yaml included), so tools can be pointed at it; tests
    only read it.
    """
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config, save_config

    def train(out):
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
                return {"results": results, "seconds": time.time() - t0, "opts": opts}
            finally:
                torch.set_num_threads(threads)

    out, run = _built_once(tmp_path_factory, "shapes_detector", train)
    return TrainedDetector(out, run["results"], det_coco_root, run["seconds"], run["opts"])
