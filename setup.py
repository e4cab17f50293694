"""Install wrn-det: Wide Residual Networks for classification and object detection."""
from setuptools import find_packages, setup

setup(
    name="wrn_det",
    version="0.1.0",
    description="Wide Residual Networks for classification pretraining and object detection",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["wrn_det", "wrn_det.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5.post20221221",
        "pycocotools>=2.0.7",
        "faster-coco-eval>=1.6",
        "opencv-python-headless>=4.8",
        "tqdm>=4.64",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "scipy>=1.10",
    ],
    extras_require={
        # filelock: the xdist workers build the session's trained detector once, one waiting for the other;
        # mlflow and wandb: the tracker tests, run offline (local MLflow stores, WANDB_MODE=offline); the hub
        # extra's packages, so that CI runs the timm, safetensors and Hub folder tests
        "test": ["pytest>=7.4", "pytest-xdist>=3.8", "filelock>=3.12", "mlflow>=2.9", "wandb>=0.16",
                 "timm>=0.9.2", "huggingface_hub>=0.23", "safetensors>=0.4"],
        # LOGGERS "('mlflow',)" / "('wandb',)": the experiment trackers (wrn_det.engine.trackers)
        "trackers": ["mlflow>=2.9", "wandb>=0.16"],
        # timm's registry (timm.create_model of our networks), .safetensors weights, Hugging Face Hub folders
        "hub": ["timm>=0.9.2", "huggingface_hub>=0.23", "safetensors>=0.4"],
        # tools/export_model.py --format onnx (onnx writes the file, onnxruntime checks it)
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],
    },
)
