"""Write detectron2 as a pure-Python wheel (``py3-none-any``) from a checkout of its repository.

    python benchmarks/device/d2_wheel.py D2SRC OUT_DIR      # -> OUT_DIR/detectron2-<version>-py3-none-any.whl

The package's Python files and its model zoo's configs go in (``detectron2/model_zoo/configs``, as
detectron2's own setup.py puts them); its compiled ``_C`` extension does not: Faster R-CNN with
torchvision's RoIAlign and NMS never calls it, ``detectron2.layers.deform_conv`` replaces its classes
by stubs that raise when used, and the COCO evaluator falls back to pycocotools' ``COCOeval``.
Nothing of detectron2 is committed to this repository: the wheel goes to ``.whl/`` (ignored by git).
Prints the wheel's path.
"""
import base64
import hashlib
import os
import re
import sys
import zipfile


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def files(src: str):
    """Yield ``(name in the wheel, path)`` of the package's Python files and model-zoo configs."""
    pkg = os.path.join(src, "detectron2")
    for root, dirs, names in os.walk(pkg):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for n in sorted(names):
            if n.endswith(".py") or n.endswith(".pyi"):
                path = os.path.join(root, n)
                yield os.path.relpath(path, src).replace(os.sep, "/"), path
    configs = os.path.join(src, "configs")
    for root, dirs, names in os.walk(configs):
        dirs.sort()
        for n in sorted(names):
            if n.endswith((".yaml", ".py")):
                path = os.path.join(root, n)
                yield "detectron2/model_zoo/configs/" + os.path.relpath(path, configs).replace(os.sep, "/"), path


def main(src: str, out_dir: str) -> str:
    """Write the wheel into ``out_dir``; returns its path."""
    init = open(os.path.join(src, "detectron2", "__init__.py"), encoding="utf-8").read()
    version = re.search(r'__version__ = "([^"]+)"', init).group(1)
    dist = f"detectron2-{version}.dist-info"
    path = os.path.join(out_dir, f"detectron2-{version}-py3-none-any.whl")
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, p in files(src):
            data = open(p, "rb").read()
            z.writestr(name, data)
            record.append(_record_line(name, data))
        meta = {
            f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: detectron2\nVersion: {version}\n"
                                "Summary: detectron2's Python package, without its compiled _C extension\n",
            f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: wrn-det d2_wheel.py\nRoot-Is-Purelib: true\n"
                             "Tag: py3-none-any\n",
            f"{dist}/top_level.txt": "detectron2\n",
        }
        for name, text in meta.items():
            z.writestr(name, text)
            record.append(_record_line(name, text.encode()))
        record.append(f"{dist}/RECORD,,")
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    print(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: d2_wheel.py D2SRC OUT_DIR")
    main(sys.argv[1], sys.argv[2])
