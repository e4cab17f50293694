"""The speed options detection shares with classification: compile, channels-last, TF32, float16 with a scaler.

A GPU is not lent to the tests: what can be checked on the CPU is. ``MODEL.COMPILE`` compiles the
backbone and the box head in place (here with the ``aot_eager`` backend, which traces and
differentiates as inductor does, without its minutes of C++ compilation): same keys, same losses
and gradients. Float16 autocast runs on the CPU too (torch >= 2.4), with the gradient scaler.
"""
import json

import torch

from helpers import DRAW_64, TINY_DET, cls_cfg, write_fake_coco

from wrn_det.data.cls_synthetic import write_synthetic_cifar


def _det_cfg(root, monkeypatch, *extra):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    return load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", [*TINY_DET, "DATASETS.TEST", "()", *extra])


def _inputs(cfg, n=2):
    from wrn_det.data.catalog import get_detection_dataset_dicts
    from wrn_det.data.det_loader import DetectionMapper

    mapper = DetectionMapper(cfg, True)
    return [mapper(d, seed=i) for i, d in enumerate(get_detection_dataset_dicts(["coco_2017_train"])[:n])]


def test_compiled_backbone_and_box_head_keep_keys_losses_and_gradients(tmp_path, monkeypatch, one_thread):
    from wrn_det.detection.modeling import build_detector
    from wrn_det.detection.modeling.meta_arch import compile_detector

    root = write_fake_coco(tmp_path, {"train2017": (4, 3)}, **DRAW_64)
    cfg = _det_cfg(root, monkeypatch, "MODEL.FAST_CPU.CONV", "False", "MODEL.FAST_CPU.ROI_ALIGN", "False")
    inputs = _inputs(cfg)
    torch.manual_seed(0)
    eager = build_detector(cfg).train()
    compiled = build_detector(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_detector(compiled, backend="aot_eager") == ["backbone", "roi_heads.box_head"]
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix: checkpoints load as ever
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the samplers draw the same anchors and proposals
        losses = model(inputs)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    assert l1.keys() == l2.keys() and all(torch.allclose(l1[k], l2[k], rtol=1e-4, atol=1e-5) for k in l1), (l1, l2)
    assert g1.keys() == g2.keys() and g1
    assert all(torch.allclose(g1[k], g2[k], rtol=1e-3, atol=1e-5) for k in g1)

    # the config key compiles the same modules when the detector is built (compilation itself waits for a first call)
    keyed = build_detector(_det_cfg(root, monkeypatch, "MODEL.COMPILE", "True", "MODEL.CHANNELS_LAST", "True"))
    assert keyed.backbone._compiled_call_impl is not None and keyed.roi_heads.box_head._compiled_call_impl is not None
    assert keyed.rpn._compiled_call_impl is None
    # channels-last is a CUDA layout: on the CPU the weights keep theirs
    conv = next(m for m in keyed.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous()


def test_allow_tf32_key_sets_torch_for_both_tasks(tmp_path):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config
    from wrn_det.engine.run import setup_run

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        cfg = load_config(get_det_cfg(), None, ["OUTPUT_DIR", str(tmp_path / "a")])
        assert cfg.ALLOW_TF32 is True and cls_cfg([]).ALLOW_TF32 is True
        setup_run(cfg)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        setup_run(cls_cfg(["ALLOW_TF32", "False", "OUTPUT_DIR", str(tmp_path / "b")]), ("wrn_det.cls",))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_float16_autocast_with_the_gradient_scaler_trains_detection_on_the_cpu(tmp_path, monkeypatch, one_thread):
    from wrn_det.detection.train import Trainer

    root = write_fake_coco(tmp_path / "d2", {"train2017": (6, 3)}, **DRAW_64)
    cfg = _det_cfg(root, monkeypatch, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16",
                   "SOLVER.MAX_ITER", "3", "LOG_PERIOD", "1", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                   "OUTPUT_DIR", str(tmp_path / "run"))
    trainer = Trainer(cfg)
    assert trainer.step.dtype == torch.float16 and trainer.step.scaler.is_enabled()
    seen = []  # the backbone's outputs: float16 under the autocast
    trainer.model.backbone.register_forward_hook(lambda m, i, out: seen.append(next(iter(out.values())).dtype))
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) == 3 and all(0 < v < 100 for v in losses)
    assert seen == [torch.float16] * 3
    ckpt = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)
    assert ckpt["grad_scaler"]["scale"] > 0  # the scaler's state travels with the checkpoint
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_float16_autocast_with_the_gradient_scaler_trains_classification_on_the_cpu(tmp_path, one_thread):
    from wrn_det.classification import ClsTrainer

    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=32, n_test=16, seed=3)
    cfg = cls_cfg(["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False",
                   "OUTPUT_DIR", str(tmp_path / "run"), "SOLVER.EPOCHS", "1", "SOLVER.STEPS", "()",
                   "SOLVER.IMS_PER_BATCH", "8", "TEST.IMS_PER_BATCH", "16", "SOLVER.AMP.ENABLED", "True",
                   "SOLVER.AMP.DTYPE", "float16"])
    trainer = ClsTrainer(cfg)
    assert trainer.step.dtype == torch.float16 and trainer.step.scaler.is_enabled()
    row = trainer.train()
    assert 0 < row["train_loss"] < 10 and 0 <= row["test_top1_err"] <= 100
    ckpt = torch.load(tmp_path / "run" / "model_epoch_0001.pth", weights_only=True)
    assert ckpt["grad_scaler"]["scale"] > 0
