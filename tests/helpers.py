"""What the test files share besides fixtures: the repository root, running the tools, writing COCO trees.

Test files import these (``from helpers import REPO, load_tool, ...``): pytest puts this folder
on ``sys.path`` when it loads ``conftest.py`` beside it. The fixtures live in ``conftest.py``.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]

#: Shapes drawn natively at 64 pixels, like the demo's (which trains at 64 pixels).
DRAW_64 = dict(sides=(64,), min_size=12.0, max_frac=0.6, max_objects=4)

#: Overrides of the demo config for a narrow WRN-FPN on a fake COCO tree that runs a few
#: iterations in well under a second.
TINY_DET = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
            "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)"]

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


def cls_cfg(opts: List[str]):
    """Return the classification defaults with the ``KEY VALUE`` overrides ``opts`` merged, checked as the tools
    check them (frozen)."""
    from wrn_det.classification import get_cls_cfg
    from wrn_det.engine.config import load_config

    return load_config(get_cls_cfg(), None, opts)


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


def write_coco(json_path, images: Sequence, annotations: Sequence, categories: Sequence,
               image_dir=None, raw: Optional[str] = None) -> str:
    """Write the COCO instances file ``json_path`` of these entries, and their images under ``image_dir``; returns
    ``json_path`` as a string.

    Each image is a JPEG of noise (seeded by its id) of the entry's ``height`` x ``width``. An
    entry with ``"write": False`` gets no image (and loses that key in the file), nor does one
    that is not an object with integer sides (a hostile entry), nor any when ``image_dir`` is
    None. ``raw``: the file's text instead of the entries (a file that is not valid JSON).
    """
    import cv2
    import numpy as np

    if image_dir is not None:
        os.makedirs(image_dir, exist_ok=True)
        for im in images:
            if isinstance(im, dict) and im.get("write", True) and all(
                    isinstance(im.get(k), int) for k in ("id", "height", "width")):
                pixels = np.random.default_rng(im["id"]).integers(0, 255, (im["height"], im["width"], 3), np.uint8)
                cv2.imwrite(os.path.join(str(image_dir), im["file_name"]), pixels)
    if raw is None:
        entries = [{k: v for k, v in im.items() if k != "write"} if isinstance(im, dict) else im for im in images]
        raw = json.dumps({"images": entries, "annotations": list(annotations), "categories": list(categories)})
    os.makedirs(os.path.dirname(os.path.abspath(str(json_path))), exist_ok=True)
    with open(json_path, "w") as f:
        f.write(raw)
    return str(json_path)


def write_coco_split(root, split: str, images: Sequence, annotations: Sequence, categories: Sequence,
                     write_images: bool = True, raw: Optional[str] = None) -> str:
    """:func:`write_coco` in detectron2's layout under the datasets root ``root``; returns the JSON file's path.

    The images go to ``root/coco/<split>`` (none when ``write_images`` is False), the file to
    ``root/coco/annotations/instances_<split>.json``, where the catalog's COCO names
    (``coco_2017_train`` ...) find them with ``DETECTRON2_DATASETS=root``.
    """
    coco = os.path.join(str(root), "coco")
    return write_coco(os.path.join(coco, "annotations", f"instances_{split}.json"), images, annotations,
                      categories, os.path.join(coco, split) if write_images else None, raw)


class RunsShell:
    """A pickle payload: unpickling it runs ``touch <target>`` in a shell (so a test can see it ran)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)
