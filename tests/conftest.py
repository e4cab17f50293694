"""Fixtures and helpers shared by the test files: the repository root, running the tools, fake COCO trees.

Test files import the helpers (``from conftest import REPO, load_tool, ...``); pytest puts
this folder on ``sys.path``.
"""
import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: Shapes drawn natively at 64 pixels, like the demo's (which trains at 64 pixels).
DRAW_64 = dict(sides=(64,), min_size=12.0, max_frac=0.6, max_objects=4)

#: Overrides of the demo config for a narrow WRN-FPN on a fake COCO tree that runs a few
#: iterations in well under a second.
TINY_DET = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
            "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)"]


def load_tool(name: str):
    """Return the module of ``tools/<name>.py``, loaded from its file as the command line runs it."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tool_env(datasets_root: Optional[str] = None, **extra) -> Dict[str, str]:
    """Return the environment of a tool run as a child: this checkout first, one thread, ``DETECTRON2_DATASETS``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(datasets_root)
    return env


def run_tool(name: str, *args, datasets_root: Optional[str] = None, env: Optional[dict] = None, timeout: int = 300,
             cwd=REPO, **kw) -> subprocess.CompletedProcess:
    """Run ``tools/<name>.py ARGS`` in a child process; returns the completed process (text output captured)."""
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)],
                          env=env or tool_env(datasets_root), cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_tool_in_process(name: str, argv: List[str], capsys) -> Tuple[int, str]:
    """Run ``tools/<name>.py`` in this process as the script does; returns (exit status, stderr).

    Every tool is ``cli_main(main, parse_args(argv))``; a command line argparse refuses gives
    argparse's exit status, as the script would.
    """
    from wrn_det.engine import cli_main

    tool = load_tool(name)
    capsys.readouterr()
    try:
        args = tool.parse_args(argv)
    except SystemExit as e:
        status = e.code
    else:
        status = cli_main(tool.main, args)
    logging.getLogger("wrn_det").handlers.clear()  # the run's log file handlers
    return status, capsys.readouterr().err


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_two_agents(tool: str, args: List[str], env: Dict[str, str], timeout: int = 300) -> List[subprocess.CompletedProcess]:
    """Run ``tools/<tool>.py ARGS`` as two torchrun agents of one process each ("two machines" on this one).

    The agents meet through torchrun's c10d rendezvous, as on a cluster. Returns both
    completed processes (rank order is torchrun's choice).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "wrn-det-test",
           str(REPO / "tools" / f"{tool}.py"), *map(str, args)]
    procs = [subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def write_fake_coco(root, splits: Dict[str, Tuple[int, int]], **draw) -> str:
    """Write a COCO tree of shapes images under ``root/coco`` (``split -> (images, seed)``); returns ``root``.

    The layout is detectron2's (``coco/<split>``, ``coco/annotations/instances_<split>.json``),
    so the catalog's COCO names (``coco_2017_train`` ...) read it with
    ``DETECTRON2_DATASETS=root``. ``draw`` goes to :func:`wrn_det.data.shapes.generate_split`.
    """
    from wrn_det.data import shapes

    for split, (n, seed) in splits.items():
        shapes.generate_split(os.path.join(str(root), "coco"), split, n, seed=seed, **draw)
    return str(root)

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

    Returns the datasets root (what ``DETECTRON2_DATASETS`` points at).
    """
    return write_fake_coco(tmp_path_factory.mktemp("d2root"), {"train2017": (800, 11), "val2017": (100, 12)},
                           **DRAW_64)


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
