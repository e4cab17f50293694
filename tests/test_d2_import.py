"""detectron2 stays optional: ``import wrn_det`` and the builtin engine never import it (runs everywhere)."""
import subprocess
import sys
import textwrap
from helpers import REPO, tool_env



def _python(code: str) -> subprocess.CompletedProcess:
    env = tool_env()
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=120)


def test_wrn_det_and_builtin_engine_do_not_import_detectron2():
    res = _python("""
        import sys
        import wrn_det
        import wrn_det.models, wrn_det.models.convert, wrn_det.engine, wrn_det.classification
        import wrn_det.detection.config, wrn_det.detection.modeling.backbone, wrn_det.detection.modeling, wrn_det.detection.train
        import wrn_det.data.catalog, wrn_det.data.coco, wrn_det.data.shapes
        from wrn_det.detection.config import get_det_cfg
        from wrn_det.detection.modeling import build_detector
        from wrn_det.engine.config import load_config
        cfg = load_config(get_det_cfg(), None, ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.DEVICE", "cpu",
                                                "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES",
                                                "['stage2']", "MODEL.ROI_HEADS.IN_FEATURES", "['stage2']"])
        build_detector(cfg)
        spec = __import__("importlib.util").util.spec_from_file_location("train_net", "tools/train_net.py")
        mod = __import__("importlib.util").util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.parse_args(["--config-file", "x.yaml"])
        print(sorted(m for m in sys.modules if m == "detectron2" or m.startswith("detectron2.")))
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_wrn_det_d2_without_detectron2_says_how_to_install():
    # block detectron2 (whether or not it is installed) and import the integration package
    res = _python("""
        import sys
        sys.modules["detectron2"] = None
        try:
            import wrn_det.d2
        except ImportError as e:
            print("IMPORTERROR", e)
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.strip()
    assert out.startswith("IMPORTERROR wrn_det.d2 needs detectron2") and "\n" not in out
    assert "git+https://github.com/facebookresearch/detectron2.git" in out
