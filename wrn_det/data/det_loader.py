"""Detection data loading: the mapper (read, resize, flip), samplers and DataLoaders.

Training batches are a pure function of (seed, iteration): the sampler draws image
indices from a seeded infinite stream, groups them by aspect ratio, and hands every
image its own augmentation seed. So a run resumed at iteration k sees exactly the
batches an uninterrupted run sees from k on, whatever the number of DataLoader
workers, and each process of a distributed job takes its own share of the stream.
"""
import itertools
import logging
import pickle
from typing import Iterator, List, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.utils.data as tud
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from wrn_det.data import decode
from wrn_det.data.decode import read_image  # the loaders' reader, named here for the detection tools
from wrn_det.engine import comm
from wrn_det.engine.comm import local_batch_size
from wrn_det.engine.device import resolve_device
from wrn_det.engine.errors import ConfigError, WrnDetError

__all__ = [
    "DetectionMapper", "GroupedTrainingSampler", "InferenceSampler", "build_detection_train_loader",
    "build_detection_test_loader", "LoadError", "raise_load_errors", "read_image", "check_image_file",
    "check_dataset_images", "quiet_opencv", "annotation_boxes",
]

logger = logging.getLogger("wrn_det")


def annotation_boxes(annotations: Sequence[dict], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the (N, 4) XYXY boxes of annotations, whose ``bbox`` is ``[x, y, width, height]`` (COCO's) or, with
    ``"bbox_mode": 0`` (detectron2's XYXY_ABS, as the VOC reader gives), ``[x0, y0, x1, y1]``."""
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=dtype).reshape(-1, 4)
    xyxy = torch.tensor([a.get("bbox_mode", 1) == 0 for a in annotations], dtype=torch.bool)
    return torch.where(xyxy[:, None], boxes, box_convert(boxes, "xywh", "xyxy"))


class LoadError(dict):
    """What the mapper returns instead of raising: the one-line message of a failed image.

    A DataLoader worker re-raises exceptions with the worker's traceback folded into the
    message; returning the message lets the main process raise it as one clean line.
    """


def raise_load_errors(batch: List[dict]) -> List[dict]:
    """Return ``batch`` unchanged, or raise :class:`WrnDetError` for the first image that failed to load."""
    for x in batch:
        if isinstance(x, LoadError):
            raise WrnDetError(x["message"])
    return batch


def quiet_opencv() -> None:
    """Keep OpenCV's own warnings (a file it cannot open, say) off stderr; the project reports those in one line."""
    try:
        import cv2.utils.logging as cv2_logging

        cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_ERROR)
    except (ImportError, AttributeError):  # an OpenCV build without its logging module
        pass


def check_image_file(path: str, height: int = 0, width: int = 0, where: str = "") -> None:
    """Raise :class:`WrnDetError` unless ``path`` is a readable, complete image of ``height`` x ``width`` upright.

    Reads the header and the file's last bytes only (no decoding): a missing file, a file
    that is no image, a JPEG or PNG cut short, or a size other than the annotation's is one
    line naming the file (and ``where``: the image id). The size compared is the upright one
    the loader hands the model (EXIF orientations 5-8 swap the stored width and height), as
    detectron2 checks it.
    """
    h, w, orientation = decode.image_header(path, where)
    if height and width and (h, w) != (height, width):
        at = f" ({where})" if where else ""
        why = f"; it is stored {h}x{w} and its EXIF orientation {orientation} turns it upright" if orientation >= 5 else ""
        raise WrnDetError(f"image file {path} is {w}x{h} but its annotation says {width}x{height}{at}{why}")


def check_dataset_images(dicts: Sequence[dict], what: str) -> None:
    """Check every image file of dataset dicts with :func:`check_image_file`; returns None.

    Costs a header read per image (0.17 ms per 640x480 JPEG measured here: about 20 s for COCO's 118k
    training images with the files cached; ``DATALOADER.CHECK_IMAGES False`` skips it).
    """
    for d in dicts:
        check_image_file(d["file_name"], d.get("height", 0), d.get("width", 0), f"image id {d.get('image_id')} of {what}")


class DetectionMapper:
    """Turn one dataset dict into the model's input dict.

    Returns ``{"image": uint8 (3, H, W) in INPUT.FORMAT, "height", "width" (original size),
    "image_id", "file_name"}`` plus, in training, ``"boxes"`` (XYXY float, resized image
    coordinates) and ``"classes"`` (int64). Training resizes the shortest edge to one of
    ``INPUT.MIN_SIZE_TRAIN`` (``choice``) or a value in its range (``range``), the longest
    edge capped at ``INPUT.MAX_SIZE_TRAIN``, and flips per ``INPUT.RANDOM_FLIP``; boxes
    follow through torchvision.transforms.v2 as ``tv_tensors.BoundingBoxes``. Crowd boxes
    are dropped for training. Randomness comes only from the per-image ``seed``.

    With ``MODEL.LOAD_PROPOSALS`` the precomputed proposals of the dataset dict
    (``proposal_boxes``, sorted best first) go through the same resize and flip as
    ``tv_tensors.BoundingBoxes`` too; those the image border clips to a side of at most
    ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE`` are dropped and the best
    ``DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN`` / ``_TEST`` are returned as
    ``"proposals"`` (XYXY, resized image coordinates) and ``"proposal_objectness_logits"``,
    in training and in inference.
    """

    def __init__(self, cfg, is_train: bool):
        self.is_train = is_train
        self.format = cfg.INPUT.FORMAT
        self.decoder = decode.check_decoder(cfg.DATALOADER.DECODE, ("torchvision", "cv2", "pil"))
        if is_train:
            self.min_sizes = [int(s) for s in cfg.INPUT.MIN_SIZE_TRAIN]
            self.max_size = int(cfg.INPUT.MAX_SIZE_TRAIN)
            self.sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
            if self.sampling not in ("choice", "range") or (self.sampling == "range" and len(self.min_sizes) != 2):
                raise ConfigError("INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice', or 'range' with two "
                                  f"INPUT.MIN_SIZE_TRAIN values; got {self.sampling!r} with {self.min_sizes}")
            self.flip = cfg.INPUT.RANDOM_FLIP
            if self.flip not in ("horizontal", "vertical", "none"):
                raise ConfigError(f"INPUT.RANDOM_FLIP must be horizontal, vertical or none, got {self.flip!r}")
        else:
            self.min_sizes, self.max_size = [int(cfg.INPUT.MIN_SIZE_TEST)], int(cfg.INPUT.MAX_SIZE_TEST)
            self.sampling, self.flip = "choice", "none"
        self.proposal_topk = None
        if cfg.MODEL.LOAD_PROPOSALS:
            key = "PRECOMPUTED_PROPOSAL_TOPK_TRAIN" if is_train else "PRECOMPUTED_PROPOSAL_TOPK_TEST"
            self.proposal_topk = int(cfg.DATASETS[key])
            if self.proposal_topk <= 0:
                raise ConfigError(f"DATASETS.{key} must be a positive number of proposals, got {self.proposal_topk}")
            self.proposal_min_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)

    def __call__(self, d: dict, seed: int = 0) -> dict:
        """Return the model input for dataset dict ``d``, or a :class:`LoadError` if its image cannot be used."""
        try:
            return self._map(d, seed)
        except WrnDetError as e:
            return LoadError(message=str(e))

    def _map(self, d: dict, seed: int) -> dict:
        return self.map_image(read_image(d["file_name"], self.format, self.decoder), d, seed)

    def map_image(self, image: torch.Tensor, d: dict, seed: int = 0) -> dict:
        """Return the model input for a decoded ``image`` (uint8 (3, H, W) in INPUT.FORMAT) described by ``d``.

        ``d`` is a dataset dict (``height``, ``width``, ``image_id``, ``file_name``, annotations
        or proposals as needed). Raises :class:`WrnDetError` if the image is not the size ``d`` says.
        """
        g = torch.Generator().manual_seed(int(seed))
        h, w = image.shape[-2:]
        if (h, w) != (d["height"], d["width"]):
            raise WrnDetError(f"image file {d['file_name']} is {w}x{h} but its annotation says "
                              f"{d['width']}x{d['height']} (image id {d.get('image_id')})")
        if self.sampling == "choice":
            size = self.min_sizes[int(torch.randint(len(self.min_sizes), (1,), generator=g))]
        else:
            size = int(torch.randint(self.min_sizes[0], self.min_sizes[1] + 1, (1,), generator=g))
        flip = self.flip != "none" and bool(torch.rand(1, generator=g) < 0.5)
        max_size = self.max_size if self.max_size > size else None
        steps = [] if size <= 0 else [v2.Resize([size], max_size=max_size,
                                               antialias=decode.resize_antialias(h, w, size, max_size))]
        if flip:
            steps.append(v2.RandomHorizontalFlip(p=1.0) if self.flip == "horizontal" else v2.RandomVerticalFlip(p=1.0))
        out = {"height": d["height"], "width": d["width"], "image_id": d["image_id"], "file_name": d["file_name"]}
        # every box set rides through the same transforms as the image
        box_sets = {}
        if self.is_train:
            annos = [a for a in d.get("annotations", []) if a.get("iscrowd", 0) == 0]
            box_sets["boxes"] = tv_tensors.BoundingBoxes(annotation_boxes(annos), format="XYXY", canvas_size=(h, w))
        if self.proposal_topk is not None:
            if "proposal_boxes" not in d:
                raise WrnDetError(f"image {d['file_name']} (id {d.get('image_id')}) has no precomputed proposals; "
                                  "MODEL.LOAD_PROPOSALS needs DATASETS.PROPOSAL_FILES_TRAIN / _TEST")
            props = torch.as_tensor(np.asarray(d["proposal_boxes"], dtype=np.float32)).reshape(-1, 4)
            box_sets["proposals"] = tv_tensors.BoundingBoxes(props, format="XYXY", canvas_size=(h, w))
        if not box_sets:
            out["image"] = v2.Compose(steps)(tv_tensors.Image(image)).as_subclass(torch.Tensor) if steps else image
            return out
        img_t, box_sets = v2.Compose(steps + [v2.ClampBoundingBoxes()])(tv_tensors.Image(image), box_sets)
        out["image"] = img_t.as_subclass(torch.Tensor)
        if self.is_train:
            boxes = box_sets["boxes"].as_subclass(torch.Tensor)
            classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
            # boxes squeezed to nothing by clamping carry no signal (detectron2 drops them too)
            keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
            out.update(boxes=boxes[keep], classes=classes[keep])
        if self.proposal_topk is not None:
            props = box_sets["proposals"].as_subclass(torch.Tensor)
            logits = torch.as_tensor(np.asarray(d["proposal_objectness_logits"], dtype=np.float32))
            # as detectron2's transform_proposals: drop what the border clipped away, then keep the best k
            keep = ((props[:, 2:] - props[:, :2]) > self.proposal_min_size).all(dim=1)
            out["proposals"] = props[keep][: self.proposal_topk]
            out["proposal_objectness_logits"] = logits[keep][: self.proposal_topk]
        return out


class _SerializedList:
    """A list of dicts stored as one pickled byte buffer.

    DataLoader workers are forked; touching Python objects in them copies their memory
    pages (reference counts change), so a large list of dicts would be duplicated per
    worker. Bytes in one numpy array are shared.
    """

    def __init__(self, items: Sequence[dict]):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in items]
        self._addr = np.cumsum([len(b) for b in blobs]).astype(np.int64)
        self._data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, i: int) -> dict:
        start = 0 if i == 0 else int(self._addr[i - 1])
        return pickle.loads(memoryview(self._data[start: int(self._addr[i])]))


class _MappedDataset(tud.Dataset):
    """Indexable by ``(index, seed)``; returns ``mapper(dicts[index], seed)``."""

    def __init__(self, dicts: Sequence[dict], mapper):
        self.dicts = _SerializedList(dicts)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, item):
        index, seed = item
        return self.mapper(self.dicts[index], seed)


class GroupedTrainingSampler(tud.Sampler):
    """Infinite batches of ``(index, seed)`` for one process, grouped by aspect ratio.

    The global index stream is an endless sequence of seeded permutations; process
    ``rank`` takes every ``world_size``-th element from position ``rank`` (as
    detectron2's TrainingSampler). Indices are buffered per aspect group (wide or
    tall) and a batch is emitted when a group holds ``batch_size`` images. Batches
    before ``start_iter`` are computed and skipped without loading anything.
    """

    def __init__(self, aspect_groups: Sequence[int], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_iter: int = 0):
        self.groups = list(aspect_groups)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.start_iter = int(start_iter)

    def _indices(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        stream = itertools.chain.from_iterable(torch.randperm(len(self.groups), generator=g).tolist()
                                               for _ in itertools.count())
        return itertools.islice(stream, self.rank, None, self.world_size)

    def __iter__(self) -> Iterator[List[tuple]]:
        buckets = {}
        it = 0
        for idx in self._indices():
            bucket = buckets.setdefault(self.groups[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                if it >= self.start_iter:
                    # per-image augmentation seeds derived from (seed, rank, iteration, slot)
                    seeds = np.random.SeedSequence([self.seed, self.rank, it]).generate_state(self.batch_size)
                    yield [(i, int(s)) for i, s in zip(bucket, seeds)]
                it += 1
                bucket.clear()

    def __len__(self) -> int:  # pragma: no cover - infinite; DataLoader only needs it for len()
        raise TypeError("GroupedTrainingSampler is infinite")


class InferenceSampler(tud.Sampler):
    """Batches of ``(index, 0)``: this process's contiguous share of the dataset, each image once.

    ``batch_size`` 1 (detectron2's inference): one image per batch, in dataset order. Larger:
    up to ``batch_size`` images per batch, all of one ``sizes`` entry (the images' original
    (height, width)), so that a batch pads no image beyond the size it has alone and every image's
    detections are those of one-at-a-time inference (within float rounding); a size's last batch
    may be smaller. ``num_images`` is this process's number of images, ``len()`` its number of batches.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, batch_size: int = 1,
                 sizes: Optional[Sequence] = None):
        per = (size - 1) // world_size + 1 if size else 0
        self.indices = list(range(min(size, rank * per), min(size, (rank + 1) * per)))
        self.num_images = len(self.indices)
        self.batches = _same_size_batches(self.indices, sizes, batch_size)

    def __iter__(self):
        return iter([[(i, 0) for i in b] for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


def _same_size_batches(indices: List[int], sizes: Optional[Sequence], batch_size: int) -> List[List[int]]:
    """Return ``indices`` cut into batches of at most ``batch_size`` indices of one ``sizes[index]`` each.

    A batch is emitted when its size's group fills up, the groups' remainders at the end in
    the order their sizes first appeared. Without ``sizes`` (or with ``batch_size`` 1) every index
    is its own group's.
    """
    if batch_size <= 1 or sizes is None:
        return [[i] for i in indices] if batch_size <= 1 else [indices[k:k + batch_size]
                                                                for k in range(0, len(indices), batch_size)]
    groups: dict = {}
    out = []
    for i in indices:
        group = groups.setdefault(tuple(sizes[i]), [])
        group.append(i)
        if len(group) == batch_size:
            out.append(list(group))
            group.clear()
    out += [g for g in groups.values() if g]
    return out


def _collate(batch):
    return raise_load_errors(batch)


def _worker_init(_):
    # each worker is one of several processes on few cores: no nested threading
    quiet_opencv()
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def build_detection_train_loader(cfg, dicts: List[dict], seed: int, start_iter: int = 0,
                                 mapper: Optional[DetectionMapper] = None) -> tud.DataLoader:
    """Return an infinite DataLoader of training batches (lists of model inputs) for this process.

    The batch per process is ``SOLVER.IMS_PER_BATCH / world size``; with
    ``DATALOADER.ASPECT_RATIO_GROUPING`` a batch holds only wide or only tall images.
    """
    world = comm.get_world_size()
    per_process = local_batch_size(int(cfg.SOLVER.IMS_PER_BATCH), world)
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ConfigError(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported; use TrainingSampler")
    groups = [int(d["width"] > d["height"]) for d in dicts] if cfg.DATALOADER.ASPECT_RATIO_GROUPING else [0] * len(dicts)
    sampler = GroupedTrainingSampler(groups, per_process, seed, comm.get_rank(), world, start_iter)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return tud.DataLoader(
        _MappedDataset(dicts, mapper or DetectionMapper(cfg, True)),
        batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        # its own generator, so creating the loader leaves the global torch RNG untouched
        generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=False,
        pin_memory=pins_memory(cfg),
    )


def pins_memory(cfg) -> bool:
    """Return True when the batches for ``cfg``'s model go to a GPU: the loader then pins them in page-locked memory.

    The model copies pinned tensors with ``non_blocking=True``: the copy runs beside the
    computation instead of holding up the host until it is done.
    """
    try:
        return resolve_device(cfg.MODEL.DEVICE).type == "cuda"
    except WrnDetError:  # a bad MODEL.DEVICE is reported where the model is built
        return False


def build_detection_test_loader(cfg, dicts: List[dict], mapper: Optional[DetectionMapper] = None) -> tud.DataLoader:
    """Return a DataLoader over this process's share of ``dicts``, each image once.

    Batches of ``TEST.IMS_PER_BATCH`` images of one original size (see :class:`InferenceSampler`;
    1, the default, is detectron2's one image at a time). Raises :class:`ConfigError` for a
    batch size below 1.
    """
    batch = int(cfg.TEST.get("IMS_PER_BATCH", 1))
    if batch < 1:
        raise ConfigError(f"TEST.IMS_PER_BATCH must be a positive number of images, got {cfg.TEST.IMS_PER_BATCH}")
    sizes = [(d.get("height"), d.get("width")) for d in dicts] if batch > 1 else None
    sampler = InferenceSampler(len(dicts), comm.get_rank(), comm.get_world_size(), batch, sizes)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return tud.DataLoader(
        _MappedDataset(dicts, mapper or DetectionMapper(cfg, False)),
        batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        generator=torch.Generator().manual_seed(0),
        pin_memory=pins_memory(cfg),
    )
