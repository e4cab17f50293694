"""Every shipped classification config loads with the classification defaults (no unknown key)."""
import re
from pathlib import Path

import pytest

from wrn_det.classification import get_cls_cfg
from wrn_det.engine.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "classification").glob("*.yaml"))
ROWS = [p for p in CONFIGS if not p.name.startswith("Base-")]
MODEL_NAME = re.compile(r"wrn_\d+_\d+|wide_resnet\d+_\d+|preact_resnet\d+|nin|vgg_cifar")


def test_there_is_a_config_per_paper_row():
    names = {p.stem for p in ROWS}
    for want in ("cifar10_wrn_28_10", "cifar100_wrn_28_10_dropout", "cifar10_wrn_40_4", "cifar100_wrn_16_8",
                 "cifar10_wrn_40_10_dropout", "svhn_wrn_16_8_dropout", "mnist_wrn_16_4", "imagenet_wide_resnet50_2",
                 "cifar10_preact_resnet164", "cifar100_preact_resnet1001"):
        assert want in names


@pytest.mark.parametrize("path", ROWS, ids=lambda p: p.stem)
def test_config_loads(path):
    cfg = load_config(get_cls_cfg(), str(path), [])
    assert MODEL_NAME.fullmatch(cfg.MODEL.NAME)
    assert cfg.OUTPUT_DIR.endswith(path.stem)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")  # each row says where its reference figure comes from
    dataset = path.stem.split("_")[0]
    assert cfg.DATASETS.NAME == dataset
    assert cfg.MODEL.NUM_CLASSES == {"cifar10": 10, "cifar100": 100, "svhn": 10, "mnist": 10, "imagenet": 1000}[dataset]
