"""Classification datasets: CIFAR-10/100, SVHN, MNIST and ImageNet, read by torchvision.

The 32x32 sets (and MNIST) are returned as :class:`ArraySet`: every image in one
``uint8`` tensor (N, C, H, W) plus an ``int64`` label tensor, so the trainer can keep
the whole set on the training device and augment whole batches there
(:mod:`wrn_det.data.cls_transforms`). ImageNet is returned as torchvision
``ImageFolder`` datasets for a ``DataLoader`` with workers.

The readers are torchvision's own (``SVHN``, ``MNIST``, ``ImageFolder``; ``CIFAR10`` and
``CIFAR100`` for downloading) in their standard on-disk layouts, except that CIFAR's
batches, which are pickles, are read through the project's restricted unpickler instead of
``pickle.load`` (a batch file cannot run code)::

    ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    ROOT/cifar-100-python/{train,test,meta}
    ROOT/{train,test,extra}_32x32.mat                  (SVHN)
    ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    ROOT/{train,val}/<class>/<image>                   (ImageNet)

Before handing a folder to torchvision, the files are checked here so that a missing
or corrupt file is reported as one line naming the file and what was expected
(torchvision's own message names neither). ``DATASETS.VERIFY_CHECKSUMS`` keeps the
official MD5 check of CIFAR and SVHN files (default); turning it off accepts files
written by other tools, such as the generated ones of the tests.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
from torchvision.datasets.utils import calculate_md5

from wrn_det.data import decode
from wrn_det.engine.errors import ConfigError, WrnDetError, a_type
from wrn_det.engine.safe_pickle import safe_load_pickle

__all__ = [
    "ArraySet",
    "DATASET_NAMES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "read_cifar",
    "read_svhn",
    "read_mnist",
    "read_imagenet",
    "build_cls_datasets",
]

logger = logging.getLogger("wrn_det.data")

#: Values accepted by ``DATASETS.NAME``.
DATASET_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "imagenet")

#: The paper's CIFAR normalisation, on the 0-255 pixel scale (the original code's constants).
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)


@dataclass
class ArraySet:
    """A whole image-classification split held in memory.

    ``images``: (N, C, H, W) tensor, ``uint8`` as read (float32 after ZCA whitening);
    ``labels``: (N,) ``int64``; ``classes``: class names; ``source``: the folder read.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    source: str
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        """Return the number of classes of the dataset (not of the labels present)."""
        return len(self.classes)


# --------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg[:300]


def _check_files(kind: str, files: List[Tuple[str, Optional[str]]], verify: bool, hint: str) -> None:
    """Raise WrnDetError for the first file in ``files`` that is missing or fails its MD5.

    ``files`` holds (path, md5 or None). Returns None when all are present (and match).
    """
    for path, md5 in files:
        if not os.path.isfile(path):
            raise WrnDetError(f"{kind} file {path} is missing: {hint}")
    if not verify:
        return
    for path, md5 in files:
        if md5 is None:
            continue
        got = calculate_md5(path)
        if got != md5:
            raise WrnDetError(
                f"{kind} file {path} has MD5 {got}, expected {md5} (the official file): it is corrupt or not the "
                f"original; download it again, or set DATASETS.VERIFY_CHECKSUMS False for data you generated"
            )


def _download(kind: str, fn) -> None:
    """Run torchvision's download ``fn``; any network or archive failure becomes one line."""
    try:
        fn()
    except WrnDetError:
        raise
    except Exception as e:  # urllib, tarfile and checksum errors all land here
        raise WrnDetError(f"could not download {kind}: {_one_line(e)}") from None


# --------------------------------------------------------------------------- CIFAR


_CIFAR = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
# name -> (label key of the batches, class-name key of the meta file, number of classes)
_CIFAR_KEYS = {"cifar10": ("labels", "label_names", 10), "cifar100": ("fine_labels", "fine_label_names", 100)}


def _cifar_entry(path: str, pretty: str) -> dict:
    """Return the dict pickled in a CIFAR file, read through the restricted unpickler (keys as strings)."""
    entry = safe_load_pickle(path, f"{pretty} file")
    if not isinstance(entry, dict):
        raise WrnDetError(f"{pretty} file {path} holds {a_type(entry)}, not a dict: expected a pickled python batch "
                          f"of {pretty}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_batch(path: str, pretty: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(uint8 images (N, 3072), int64 labels (N,))`` of one CIFAR batch file, every field checked."""
    entry = _cifar_entry(path, pretty)
    where = f"{pretty} file {path}"
    if "data" not in entry or label_key not in entry:
        raise WrnDetError(f"{where} has keys {sorted(map(str, entry))[:6]}, expected 'data' and '{label_key}'")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        what = f"dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise WrnDetError(f"{where} has 'data' of {what}; expected a uint8 array of pixels (N, 3072)")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise WrnDetError(f"{where} has 'data' of shape {tuple(data.shape)}, expected (N, 3072)")
    labels = entry[label_key]
    arr = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu") or any(
            isinstance(v, bool) for v in (labels if isinstance(labels, (list, tuple)) else [])):
        what = f"dtype {arr.dtype}" if arr is not None else type(labels).__name__
        raise WrnDetError(f"{where} has '{label_key}' of {what}; expected a list of integer class ids")
    if len(arr) != data.shape[0]:
        raise WrnDetError(f"{where} has {data.shape[0]} images but {len(arr)} labels; expected one label per image")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise WrnDetError(f"{where} has labels in [{arr.min()}, {arr.max()}]; expected class ids 0..{num_classes - 1}")
    return data, arr.astype(np.int64)


def read_cifar(root: str, name: str = "cifar10", train: bool = True, download: bool = False,
               verify_checksums: bool = True) -> ArraySet:
    """Read a CIFAR-10 or CIFAR-100 split from the python-version batch files.

    Returns an :class:`ArraySet` with ``uint8`` images (N, 3, 32, 32) and labels (the fine
    labels for CIFAR-100). The batches are pickles: they are read through the project's
    restricted unpickler (:func:`wrn_det.engine.safe_pickle.safe_load_pickle`) whatever
    ``verify_checksums`` says, so a file cannot run code, and every field is checked (uint8
    pixels of shape (N, 3072), one integer label per image in range). A missing file, an MD5
    mismatch (when ``verify_checksums``) or a malformed batch raises :class:`WrnDetError`
    naming the file. ``download`` fetches the archive with torchvision first.
    """
    cls = _CIFAR[name]
    folder = os.path.join(root, cls.base_folder)
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    if download:
        _download(pretty, lambda: cls(root, train=train, download=True))
    names = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
    files = [(os.path.join(folder, f), md5) for f, md5 in names]
    hint = (
        f"expected the python version of {pretty} ({', '.join(f for f, _ in names)}) in {folder}; "
        f"pass --download (DATASETS.DOWNLOAD True) to fetch it"
    )
    _check_files(pretty, files, verify_checksums, hint)
    label_key, names_key, num_classes = _CIFAR_KEYS[name]
    meta_path = os.path.join(folder, cls.meta["filename"])
    classes = _cifar_entry(meta_path, pretty).get(names_key)
    if not isinstance(classes, list) or len(classes) != num_classes or not all(isinstance(c, str) for c in classes):
        raise WrnDetError(f"{pretty} file {meta_path} has {names_key!r} {classes!r:.60}; expected {num_classes} "
                          "class names")
    parts = [_read_cifar_batch(os.path.join(folder, f), pretty, label_key, num_classes)
             for f, _ in (cls.train_list if train else cls.test_list)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return ArraySet(images, torch.from_numpy(labels), list(classes), folder)


# --------------------------------------------------------------------------- SVHN


def read_svhn(root: str, split: str = "train", download: bool = False, verify_checksums: bool = True) -> ArraySet:
    """Read one SVHN split ('train', 'test' or 'extra') through torchvision's reader.

    Returns an :class:`ArraySet` with ``uint8`` images (N, 3, 32, 32) and labels 0-9
    (torchvision maps the file's label 10 to digit 0). Raises :class:`WrnDetError`
    naming the .mat file when it is missing, fails its MD5 or cannot be parsed.
    """
    url, filename, md5 = tvd.SVHN.split_list[split]
    path = os.path.join(root, filename)
    if download:
        _download(f"SVHN {split}", lambda: tvd.SVHN(root, split=split, download=True))
    hint = f"expected SVHN's format-2 file {filename} (from {url}) in {root}; pass --download (DATASETS.DOWNLOAD True) to fetch it"
    _check_files("SVHN", [(path, md5)], verify_checksums, hint)
    unchecked = type("_SVHNUnchecked", (tvd.SVHN,), {
        "split_list": {k: [u, f, None] for k, (u, f, _) in tvd.SVHN.split_list.items()}
    })
    try:
        ds = unchecked(root, split=split, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64).reshape(-1))
    except Exception as e:
        raise WrnDetError(
            f"SVHN file {path} cannot be read ({_one_line(e)}): expected a MATLAB file with 'X' (32x32x3xN uint8) "
            f"and 'y' (N labels 1-10)"
        ) from None
    if images.shape[1:] != (3, 32, 32) or images.shape[0] != labels.numel():
        raise WrnDetError(
            f"SVHN file {path} holds images of shape {tuple(images.shape)} and {labels.numel()} labels: "
            f"expected 'X' of shape (32, 32, 3, N) and N labels"
        )
    return ArraySet(images, labels, [str(i) for i in range(10)], root)


# --------------------------------------------------------------------------- MNIST


def read_mnist(root: str, train: bool = True, download: bool = False) -> ArraySet:
    """Read an MNIST split through torchvision's reader (idx files under ``ROOT/MNIST/raw``).

    Returns an :class:`ArraySet` with ``uint8`` images (N, 1, 28, 28). Raises
    :class:`WrnDetError` naming the idx file when it is missing or malformed. (torchvision
    checks MNIST's MD5 sums only on the downloaded archives, so there is no checksum here.)
    """
    raw = os.path.join(root, "MNIST", "raw")
    if download:
        _download("MNIST", lambda: tvd.MNIST(root, train=train, download=True))
    # torchvision's reader wants both splits present, whichever it reads
    files = [(os.path.join(raw, f"{p}-{kind}-ubyte"), None)
             for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    hint = f"expected MNIST's uncompressed idx files in {raw}; pass --download (DATASETS.DOWNLOAD True) to fetch them"
    _check_files("MNIST", files, False, hint)
    try:
        ds = tvd.MNIST(root, train=train, download=False)
    except Exception as e:
        for path, _ in files:
            try:
                read_sn3_pascalvincent_tensor(path, strict=False)
            except Exception as e2:
                raise WrnDetError(f"MNIST file {path} is not a valid idx file ({_one_line(e2)})") from None
        raise WrnDetError(f"MNIST folder {raw} cannot be read: {_one_line(e)}") from None
    images, labels = ds.data, ds.targets
    if images.ndim != 3 or images.shape[0] != labels.numel():
        raise WrnDetError(f"MNIST files in {raw} hold {tuple(images.shape)} images and {labels.numel()} labels: expected (N, 28, 28) and N")
    return ArraySet(images.unsqueeze(1).contiguous(), labels.long(), list(ds.classes), raw)


# --------------------------------------------------------------------------- ImageNet


def read_imagenet(root: str, train: bool = True, transform=None, decoder: str = "pil"):
    """Return torchvision's ``ImageFolder`` over ``ROOT/train`` or ``ROOT/val`` (one folder per class).

    ``decoder``: ``DATALOADER.DECODE``; the images reach ``transform`` as
    :func:`wrn_det.data.decode.image_loader` gives them: upright (EXIF orientation) and in
    8-bit RGB whatever the file's mode, with every decoder. Raises :class:`WrnDetError`
    naming the folder when it is missing or holds no class folders with images.
    """
    folder = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(folder):
        raise WrnDetError(
            f"ImageNet folder {folder} is missing: expected ROOT/train and ROOT/val with one sub-folder of images "
            f"per class (the val images sorted into class folders)"
        )
    try:
        return tvd.ImageFolder(folder, transform=transform, loader=decode.image_loader(decoder))
    except (FileNotFoundError, RuntimeError) as e:
        raise WrnDetError(f"ImageNet folder {folder} cannot be used: {_one_line(e)}") from None


# --------------------------------------------------------------------------- from a config


def build_cls_datasets(cfg, train_transform=None, test_transform=None):
    """Return ``(train, test)`` for ``cfg.DATASETS``.

    For the 32x32 sets and MNIST both are :class:`ArraySet`; for ImageNet both are
    ``ImageFolder`` datasets using the given transforms. ``DATASETS.SVHN_USE_EXTRA``
    joins SVHN's extra split to its training split, as the paper did. Raises
    :class:`ConfigError` for an unknown ``DATASETS.NAME``.
    """
    d = cfg.DATASETS
    name = d.NAME.lower()
    root = os.path.expanduser(d.ROOT)
    if name not in DATASET_NAMES:
        raise ConfigError(f"DATASETS.NAME must be one of {', '.join(DATASET_NAMES)}, got {d.NAME!r}")
    if name in _CIFAR:
        return (
            read_cifar(root, name, True, d.DOWNLOAD, d.VERIFY_CHECKSUMS),
            read_cifar(root, name, False, False, d.VERIFY_CHECKSUMS),
        )
    if name == "svhn":
        train = read_svhn(root, "train", d.DOWNLOAD, d.VERIFY_CHECKSUMS)
        if d.SVHN_USE_EXTRA:
            extra = read_svhn(root, "extra", d.DOWNLOAD, d.VERIFY_CHECKSUMS)
            train = ArraySet(
                torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]), train.classes, root
            )
        return train, read_svhn(root, "test", d.DOWNLOAD, d.VERIFY_CHECKSUMS)
    if name == "mnist":
        return read_mnist(root, True, d.DOWNLOAD), read_mnist(root, False, False)
    if d.DOWNLOAD:
        logger.warning("DATASETS.DOWNLOAD is ignored for ImageNet: it cannot be downloaded automatically")
    decoder = decode.check_decoder(cfg.DATALOADER.DECODE, ("pil", "torchvision", "cv2", "cuda"))
    train_transform, test_transform = decode.imagenet_transforms_for(decoder, train_transform, test_transform, cfg.INPUT)
    return (read_imagenet(root, True, train_transform, decoder),
            read_imagenet(root, False, test_transform, decoder))
