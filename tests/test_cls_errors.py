"""Bad datasets and configs give one clear line and a non-zero exit (tools/train_cls.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, load_tool, tool_env

from wrn_det.data.classification import read_cifar, read_mnist, read_svhn
from wrn_det.data.cls_synthetic import synthetic_stripes, write_cifar, write_mnist, write_svhn, write_synthetic_cifar
from wrn_det.engine.cli import cli_main
from wrn_det.engine.errors import WrnDetError

TRAIN_CLS = REPO / "tools" / "train_cls.py"


def _one_error_line(capsys, argv, tmp_path):
    """Run tools/train_cls.py's entry point as the script does; returns (exit status, stderr)."""
    capsys.readouterr()
    tool = load_tool("train_cls")
    status = cli_main(tool.main, tool.parse_args(["MODEL.NAME", "wrn_10_1", "OUTPUT_DIR", str(tmp_path / "out"), *argv]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return status, err


def test_corrupt_cifar_batch(tmp_path, capsys):
    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=50, n_test=20)
    bad = Path(root) / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated, as by an interrupted copy
    status, err = _one_error_line(capsys, ["DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False"], tmp_path)
    assert status == 2 and str(bad) in err and "unpickled" in err
    # with the official checksums on, the same folder fails the MD5 check, naming a file and the switch
    status, err = _one_error_line(capsys, ["DATASETS.ROOT", root], tmp_path)
    assert status == 2 and "MD5" in err and "data_batch_1" in err and "DATASETS.VERIFY_CHECKSUMS" in err


def test_cifar_batch_with_wrong_content_is_named(tmp_path):
    images, labels = synthetic_stripes(20)
    write_cifar(str(tmp_path), (images, labels), (images, labels), "cifar100")
    import pickle

    path = tmp_path / "cifar-100-python" / "test"
    entry = pickle.loads(path.read_bytes(), encoding="latin1")
    entry["data"] = entry["data"][:, :1000]  # not 3x32x32 images
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(WrnDetError, match=r"cifar-100-python/test has 'data' of shape \(20, 1000\), expected"):
        read_cifar(str(tmp_path), "cifar100", False, verify_checksums=False)


def test_missing_svhn_file(tmp_path, capsys):
    images, labels = synthetic_stripes(30)
    write_svhn(str(tmp_path), "train", images, labels)
    write_svhn(str(tmp_path), "test", images, labels)
    # the paper's SVHN recipe joins the extra split, which is absent here
    status, err = _one_error_line(
        capsys, ["DATASETS.NAME", "svhn", "DATASETS.ROOT", str(tmp_path), "DATASETS.VERIFY_CHECKSUMS", "False"], tmp_path)
    assert status == 2 and str(tmp_path / "extra_32x32.mat") in err and "missing" in err
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(WrnDetError, match="test_32x32.mat cannot be read"):
        read_svhn(str(tmp_path), "test", verify_checksums=False)


def test_missing_and_corrupt_mnist_file(tmp_path):
    imgs = np.zeros((4, 28, 28), np.uint8)
    write_mnist(str(tmp_path), True, imgs, np.arange(4))
    with pytest.raises(WrnDetError, match=r"t10k-images-idx3-ubyte is missing"):
        read_mnist(str(tmp_path), train=False)
    write_mnist(str(tmp_path), False, imgs, np.arange(4))
    (tmp_path / "MNIST/raw/train-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(WrnDetError, match="train-labels-idx1-ubyte is not a valid idx file"):
        read_mnist(str(tmp_path), train=True)


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("SOLVER:\n  BASE_LR: 0.1\n  LR_STEPS: [60, 120]\n")
    capsys.readouterr()
    tool = load_tool("train_cls")
    status = cli_main(tool.main, tool.parse_args(["--config-file", str(cfg)]))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "LR_STEPS" in err and str(cfg) in err
    status, err = _one_error_line(capsys, ["SOLVER.BASE_RL", "0.1"], tmp_path)
    assert status == 2 and "SOLVER.BASE_RL" in err

    # the real script: exit status 2 and a single line on stderr, no traceback
    res = subprocess.run([sys.executable, str(TRAIN_CLS), "--config-file", str(cfg)], capture_output=True, text=True,
                         timeout=120, env=tool_env())
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "LR_STEPS" in res.stderr
