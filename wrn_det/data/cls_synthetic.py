"""Write small classification sets in the real on-disk formats, and a learnable synthetic set.

Nothing can be downloaded where the tests run, so the tests write data with these
functions and read it back through the same torchvision readers a user's real files
go through: CIFAR python pickle batches, SVHN format-2 ``.mat`` files, MNIST idx
files and ImageFolder trees. They are also handy for a smoke run of the trainer
(with ``DATASETS.VERIFY_CHECKSUMS False``: the files are not the official ones).
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["synthetic_stripes", "write_synthetic_cifar", "write_cifar", "write_svhn", "write_mnist", "write_image_folder"]

# five well-separated base colours; two stripe orientations make ten classes
_PALETTE = np.array([[200, 60, 60], [60, 180, 70], [70, 90, 210], [200, 190, 60], [160, 70, 190]], dtype=np.float32)


def synthetic_stripes(n: int, num_classes: int = 10, seed: int = 0, noise: float = 40.0, size: int = 32
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: ``n`` uint8 images (n, 3, size, size) of striped colour patches.

    Class ``c`` has base colour ``c % 5`` and stripes that are horizontal for ``c < 5``
    and vertical otherwise, with a random period (5-8 pixels), phase, colour jitter and
    Gaussian pixel noise of std ``noise``. Neither the colour alone (at best 1 in 2)
    nor the orientation alone (1 in 5) identifies the class, so a network has to learn
    both; crop and flip augmentation keep the class (they only shift the phase).
    """
    if not 1 <= num_classes <= 10:
        raise ValueError("synthetic_stripes makes at most 10 classes")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    colour = _PALETTE[labels % 5] + rng.uniform(-25, 25, (n, 3)).astype(np.float32)
    period = rng.uniform(5, 8, n).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    coord = np.arange(size, dtype=np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * coord[None, :] / period[:, None] + phase[:, None])  # (n, size)
    horizontal = labels < 5
    # horizontal stripes vary along rows (y), vertical ones along columns (x)
    pattern = np.where(horizontal[:, None, None], wave[:, :, None], wave[:, None, :])  # (n, size, size)
    img = colour[:, :, None, None] * (0.55 + 0.45 * pattern[:, None])
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), labels.astype(np.int64)


def _chw(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"expected (N, 3, H, W) or (N, H, W, 3) images, got {images.shape}")
    return images if images.shape[1] == 3 else images.transpose(0, 3, 1, 2)


def _dump(obj, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: str, train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray],
                name: str = "cifar10", class_names: Optional[Sequence[str]] = None) -> str:
    """Write CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 files.

    ``train`` and ``test`` are ``(uint8 images (N, 3, 32, 32), labels)``. CIFAR-10 spreads
    the training images over five batches, as the real files do. Returns the folder
    written (``ROOT/cifar-10-batches-py`` or ``ROOT/cifar-100-python``).
    """
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    n_classes = 10 if name == "cifar10" else 100
    names = list(class_names or [f"class{i}" for i in range(n_classes)])

    def batch(images, labels, label_key, title):
        """Return one batch dict as the CIFAR python files hold it."""
        images = _chw(images)
        d = {"batch_label": title, "data": images.reshape(len(images), -1).astype(np.uint8),
             "filenames": [f"img_{i:06d}.png" for i in range(len(images))]}
        d[label_key] = [int(v) for v in labels]
        if label_key == "fine_labels":
            d["coarse_labels"] = [int(v) // 5 for v in labels]
        return d

    if name == "cifar10":
        chunks = np.array_split(np.arange(len(train[1])), 5)
        for i, idx in enumerate(chunks):
            _dump(batch(train[0][idx], train[1][idx], "labels", f"training batch {i + 1} of 5"),
                  os.path.join(folder, f"data_batch_{i + 1}"))
        _dump(batch(*test, "labels", "testing batch 1 of 1"), os.path.join(folder, "test_batch"))
        _dump({"label_names": names, "num_cases_per_batch": len(chunks[0]), "num_vis": 3072},
              os.path.join(folder, "batches.meta"))
    else:
        _dump(batch(*train, "fine_labels", "training batch 1 of 1"), os.path.join(folder, "train"))
        _dump(batch(*test, "fine_labels", "testing batch 1 of 1"), os.path.join(folder, "test"))
        _dump({"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]},
              os.path.join(folder, "meta"))
    return folder


def write_svhn(root: str, split: str, images: np.ndarray, labels: np.ndarray) -> str:
    """Write ``ROOT/{split}_32x32.mat`` in SVHN's format 2 (X: 32x32x3xN, y: Nx1, digit 0 stored as 10).

    Returns the path written.
    """
    from scipy.io import savemat

    os.makedirs(root, exist_ok=True)
    x = _chw(images).transpose(2, 3, 1, 0)  # (N, 3, H, W) -> (H, W, 3, N)
    y = np.asarray(labels, dtype=np.uint8).copy()
    y[y == 0] = 10
    path = os.path.join(root, f"{split}_32x32.mat")
    savemat(path, {"X": np.ascontiguousarray(x), "y": y.reshape(-1, 1)})
    return path


def write_mnist(root: str, train: bool, images: np.ndarray, labels: np.ndarray) -> List[str]:
    """Write MNIST's uncompressed idx files under ``ROOT/MNIST/raw``; returns their paths."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    prefix = "train" if train else "t10k"
    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.uint8)
    img_path = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
    lbl_path = os.path.join(raw, f"{prefix}-labels-idx1-ubyte")
    with open(img_path, "wb") as f:
        # magic 0x00000803: unsigned bytes, 3 dimensions; sizes are big-endian int32
        f.write(struct.pack(">IIII", 0x0803, *images.shape))
        f.write(images.tobytes())
    with open(lbl_path, "wb") as f:
        f.write(struct.pack(">II", 0x0801, len(labels)))
        f.write(labels.tobytes())
    return [img_path, lbl_path]


def write_image_folder(root: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """Write images as ``ROOT/<class name>/<index>.png`` (torchvision ImageFolder layout); returns ROOT."""
    from PIL import Image

    images = _chw(images).transpose(0, 2, 3, 1)
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = os.path.join(root, class_names[int(lab)])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(d, f"{i:06d}.png"))
    return root


def write_synthetic_cifar(root: str, n_train: int = 2000, n_test: int = 500, seed: int = 0, noise: float = 40.0) -> str:
    """Write :func:`synthetic_stripes` train and test sets as CIFAR-10 batches under ``root``; returns ``root``.

    Read it with ``DATASETS.NAME cifar10 DATASETS.ROOT <root> DATASETS.VERIFY_CHECKSUMS False``.
    """
    train = synthetic_stripes(n_train, seed=seed, noise=noise)
    test = synthetic_stripes(n_test, seed=seed + 1, noise=noise)
    write_cifar(root, train, test, "cifar10", ["red-h", "green-h", "blue-h", "yellow-h", "purple-h",
                                              "red-v", "green-v", "blue-v", "yellow-v", "purple-v"])
    return root
