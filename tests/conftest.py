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


def _run_base(tmp_path_factory) -> Path:
    """Return the folder shared by the whole test run: the run's base temporary folder (every xdist worker's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _built_once(base: Path, name: str, build: Callable[[Path], object]) -> Tuple[Path, object]:
    """Return ``(folder, value)``: the folder ``name`` under ``base`` that ``build(folder)`` filled and the JSON value
    it returned, built once for the whole test run.

    Under pytest-xdist each worker has a base temporary folder of its own inside the run's:
    the folder lives in the run's, and the first process that asks builds it under a file
    lock while the others wait, then read what it left. The value, kept in ``<name>.json``
    beside the folder, is written last: a build that failed (or whose process died) leaves
    none, and the next process to ask builds the folder again.
    """
    from filelock import FileLock

    from wrn_det.engine.fileio import write_json

    folder, done = base / name, base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            write_json(str(done), {"value": build(folder)})
        return folder, json.loads(done.read_text())["value"]


def build_det_coco_root(base: Path) -> str:
    """Write (once per run, under ``base``) the fake COCO tree of :func:`det_coco_root`; returns the datasets root."""
    def build(folder):
        write_fake_coco(folder, {"train2017": (800, 11), "val2017": (100, 12)}, **DRAW_64)

    return str(_built_once(base, "d2root", build)[0])


def build_shapes_detector(base: Path) -> Tuple[Path, dict]:
    """Train (once per run, under ``base``) the detector of :func:`trained_shapes_detector`; returns ``(folder, run)``."""
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config, save_config

    root = build_det_coco_root(base)

    def train(out):
        opts = SHAPES_DETECTOR_OPTS + ["OUTPUT_DIR", str(out)]
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DETECTRON2_DATASETS", root)
            torch.set_num_threads(1)
            try:
                cfg = load_config(get_det_cfg(), SHAPES_DETECTOR_CONFIG, opts)
                save_config(cfg, os.path.join(out, "config.yaml"))
                t0 = time.time()
                results = Trainer(cfg).train()
                return {"results": results, "seconds": time.time() - t0, "opts": opts, "root": root}
            finally:
                torch.set_num_threads(threads)

    return _built_once(base, "shapes_detector", train)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Register the ``slow`` marker (see :func:`pytest_collection_modifyitems`); under pytest-xdist, start training
    the shared shapes detector at once, in a child of the controller.

    Several test files need it; without this, the first worker to ask trains it (about 1.5
    minutes) while a second one asking waits idle. The child takes the same file lock as the
    workers (:func:`_built_once`): whoever comes first builds, the others read, and a child that
    fails leaves the build to the first worker that asks. Its output goes to
    ``<run folder>/shapes_detector_prebuild.log``.
    """
    import subprocess
    import sys

    config.addinivalue_line("markers", "slow: a test of 15 s or more on a 2-core machine (its file is run first)")
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return  # a worker, or a run without xdist: the fixture builds it when first asked
    base = config._tmp_path_factory.getbasetemp()
    log = open(base / "shapes_detector_prebuild.log", "w")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); from pathlib import Path; import conftest; " \
           f"conftest.build_shapes_detector(Path({str(base)!r}))"
    config._shapes_prebuild = subprocess.Popen([sys.executable, "-c", code], cwd=here, stdout=log,
                                               stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def pytest_collection_modifyitems(config, items):
    """Order the test files for pytest-xdist's workers (``--dist loadfile`` hands files out in this order).

    Files with a ``slow`` test come first, so that no worker starts a long test near the end
    while the other has nothing left; files that use the trained shapes detector come last,
    so that the workers do other work while :func:`pytest_configure`'s child trains it
    (about 2 minutes) instead of waiting for it. Within a file the order is unchanged.
    """
    files: Dict[Path, List] = {}
    for i, item in enumerate(items):
        key = files.setdefault(item.path, [False, True, i])  # uses the detector, has no slow test, first position
        key[0] |= "trained_shapes_detector" in item.fixturenames
        key[1] &= item.get_closest_marker("slow") is None
    items.sort(key=lambda item: tuple(files[item.path]))


def pytest_unconfigure(config):
    """Stop the controller's child of :func:`pytest_configure` if no test needed it before the run ended."""
    proc = getattr(config, "_shapes_prebuild", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait()


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
    return build_det_coco_root(_run_base(tmp_path_factory))


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

    About 1.5 minutes on the 2-core development machine, started by the xdist controller as the
    run begins (:func:`pytest_configure`), or spent by the first worker that needs it while the
    others wait (see :func:`_built_once`). The run folder is laid out as tools/train_net.py
    leaves it (config.yaml included), so tools can be pointed at it; tests only read it.
    """
    out, run = build_shapes_detector(_run_base(tmp_path_factory))
    return TrainedDetector(out, run["results"], run["root"], run["seconds"], run["opts"])
