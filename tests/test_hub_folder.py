"""A trained detector as .safetensors and as a Hugging Face Hub folder (tools/export_model.py --format safetensors /
hub): the same evaluation, the same detections back through Predictor.from_pretrained and torch.hub, a card the Hub
reads."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, load_tool

from wrn_det.engine.cli import cli_main
from wrn_det.engine.errors import WrnDetError

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[hub]')")
pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install -e '.[hub]')")


def _export(run, fmt, output, *extra):
    tool = load_tool("export_model")
    argv = ["--config-file", str(run.dir / "config.yaml"), "--format", fmt, "--output", str(output), *extra,
            "MODEL.WEIGHTS", run.weights, "MODEL.DEVICE", "cpu"]
    assert cli_main(tool.main, tool.parse_args(argv)) == 0


def _val_images(run, n):
    root = Path(run.datasets_root) / "coco"
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    return [str(root / "val2017" / im["file_name"]) for im in val["images"][:n]]


def _same_detections(a, b):
    for key in ("boxes", "scores", "classes", "category_ids"):
        assert torch.equal(a[key], b[key]), key
    assert a["class_names"] == b["class_names"]


def test_safetensors_weights_give_the_same_evaluation_as_the_pth(trained_shapes_detector, tmp_path, monkeypatch,
                                                                 one_thread):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config
    from wrn_det.engine.weights_file import read_weights_file

    run = trained_shapes_detector
    weights = tmp_path / "model_final.safetensors"
    _export(run, "safetensors", weights)
    wf = read_weights_file(str(weights))
    assert wf.kind == "detector" and wf.metadata["thing_classes"] == ["square", "circle", "triangle"]
    monkeypatch.setenv("DETECTRON2_DATASETS", run.datasets_root)
    cfg = load_config(get_det_cfg(), str(run.dir / "config.yaml"),
                      ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval")])
    results = Trainer(cfg, eval_only=True).test()
    assert results["bbox"]["AP"] > 50
    # the .pth's final evaluation (APl: no large objects in this set, NaN in both)
    assert results["bbox"] == pytest.approx(run.results["bbox"], rel=1e-12, abs=1e-12, nan_ok=True)


def test_hub_folder_gives_back_the_same_detections(trained_shapes_detector, tmp_path):
    from huggingface_hub import ModelCard

    from wrn_det import Predictor

    run = trained_shapes_detector
    # the run folder as tools/train_net.py leaves it, with the command line in its log
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(run.dir / "metrics.json", run_dir / "metrics.json")
    command = "tools/train_net.py --config-file shapes_wrn_frcnn.yaml MODEL.WRN.NAME wrn_10_1"
    (run_dir / "log.txt").write_text(f"[05/09 10:00:00 wrn_det]: rank 0 of 1, torch 2.x, command: {command}\n")
    folder = tmp_path / "hub" / "shapes-wrn-10-1"
    _export(run, "hub", folder, "--run-dir", str(run_dir), "--license", "apache-2.0", "--repo-id", "me/shapes")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "model.safetensors"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]  # written whole, in one rename

    card = ModelCard.load(str(folder / "README.md"))
    data = card.data.to_dict()
    assert (data["library_name"], data["pipeline_tag"], data["license"]) == ("wrn-det", "object-detection", "apache-2.0")
    assert "object-detection" in data["tags"] and data["metrics"] == ["mean_average_precision"]
    ap = run.results["bbox"]["AP"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == round(ap, 2)
    assert "square, circle, triangle" in card.text and "wrn_10_1" in card.text
    assert f"| bbox/AP | {ap:.4g} |" in card.text and command in card.text
    assert 'Predictor.from_pretrained("me/shapes")' in card.text.replace("'", '"')
    assert "@inproceedings{zagoruyko2016wide" in card.text

    ref = Predictor(str(run.dir / "config.yaml"), weights=run.weights, device="cpu")
    back = Predictor.from_pretrained(str(folder), device="cpu")
    hub = torch.hub.load(str(REPO), "predictor", str(folder), source="local", device="cpu")
    assert back.thing_classes == hub.thing_classes == ref.thing_classes
    assert back.contiguous_id_to_thing_dataset_id == ref.contiguous_id_to_thing_dataset_id
    found = 0
    for image in _val_images(run, 6):
        want = ref(image)
        _same_detections(back(image), want)
        _same_detections(hub(image), want)
        found += len(want["scores"])
    assert found > 6


def test_bad_hub_folders_are_one_line(tmp_path):
    from wrn_det import Predictor
    from wrn_det.models import from_pretrained

    (tmp_path / "empty").mkdir()
    cases = [(str(tmp_path / "empty"), "lacks config.yaml and model.safetensors"),
             (str(tmp_path / "not" / "here" / "x"), "neither a model folder"),
             ("owner/name-that-is-not-cached", "could not be downloaded")]
    for where, expected in cases:
        for load in (Predictor.from_pretrained, from_pretrained):
            with pytest.raises(WrnDetError) as e:
                load(where, local_files_only=True, cache_dir=str(tmp_path / "cache"))  # nothing from outside
            assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
