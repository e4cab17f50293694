"""Classification data: torchvision readers on files in the real formats, batched augmentation, sharding, ZCA."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cls_cfg

from wrn_det.classification import get_cls_cfg
from wrn_det.data import cls_preprocess
from wrn_det.data.classification import ArraySet, build_cls_datasets, read_cifar, read_imagenet, read_mnist, read_svhn
from wrn_det.data.cls_loader import (IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, InMemoryLoader, ShardSampler,
                                     build_imagenet_loader, imagenet_transforms, reflect_crop_flip)
from wrn_det.data.cls_preprocess import normalizer_from_cfg, zca_whiten
from wrn_det.data.cls_synthetic import synthetic_stripes, write_cifar, write_image_folder, write_mnist, write_svhn
from wrn_det.engine.errors import ConfigError, WrnDetError


def test_cifar10_and_cifar100_round_trip(tmp_path):
    (xi, yi), (xt, yt) = synthetic_stripes(53, seed=1), synthetic_stripes(17, seed=2)
    write_cifar(str(tmp_path), (xi, yi), (xt, yt), "cifar10")
    tr = read_cifar(str(tmp_path), "cifar10", True, verify_checksums=False)
    te = read_cifar(str(tmp_path), "cifar10", False, verify_checksums=False)
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (53, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(xi)) and torch.equal(tr.labels, torch.from_numpy(yi))
    assert torch.equal(te.images, torch.from_numpy(xt)) and te.num_classes == 10
    # generated files are not the official ones: the default MD5 check rejects them
    with pytest.raises(WrnDetError, match="data_batch_1 has MD5 .* DATASETS.VERIFY_CHECKSUMS False"):
        read_cifar(str(tmp_path), "cifar10", True, verify_checksums=True)

    y100 = (np.arange(40) * 7) % 100
    write_cifar(str(tmp_path), (synthetic_stripes(40)[0], y100), (xt, yt), "cifar100")
    tr100 = read_cifar(str(tmp_path), "cifar100", True, verify_checksums=False)
    assert tr100.num_classes == 100 and torch.equal(tr100.labels, torch.from_numpy(y100))


def test_svhn_extra_join_and_mnist(tmp_path):
    x, y = synthetic_stripes(30, seed=4)
    y = np.arange(30) % 10  # includes digit 0, stored as 10 in the .mat files
    for split, n in (("train", 30), ("test", 12), ("extra", 20)):
        write_svhn(str(tmp_path), split, x[:n], y[:n])
    tr = read_svhn(str(tmp_path), "train", verify_checksums=False)
    assert torch.equal(tr.images, torch.from_numpy(x)) and torch.equal(tr.labels, torch.from_numpy(y))
    cfg = get_cls_cfg()
    cfg.merge_from_list(["DATASETS.NAME", "svhn", "DATASETS.ROOT", str(tmp_path), "DATASETS.VERIFY_CHECKSUMS", "False"])
    train, test = build_cls_datasets(cfg)
    assert len(train) == 50 and len(test) == 12
    assert torch.equal(train.labels[30:], torch.from_numpy(y[:20]))
    cfg.DATASETS.SVHN_USE_EXTRA = False
    assert len(build_cls_datasets(cfg)[0]) == 30

    imgs = (np.arange(5 * 28 * 28) % 251).astype(np.uint8).reshape(5, 28, 28)
    write_mnist(str(tmp_path), True, imgs, np.array([3, 1, 4, 1, 5]))
    write_mnist(str(tmp_path), False, imgs[:2], np.array([9, 2]))
    m = read_mnist(str(tmp_path), True)
    assert m.images.shape == (5, 1, 28, 28) and torch.equal(m.images[:, 0], torch.from_numpy(imgs))
    assert m.labels.tolist() == [3, 1, 4, 1, 5]
    norm = normalizer_from_cfg(cls_cfg(["INPUT.PIXEL_MEAN", "[33.3]", "INPUT.PIXEL_STD", "[78.6]"]), 1, 3)
    out = norm(m.images)
    assert out.shape == (5, 3, 28, 28) and torch.allclose(out[:, 1], (m.images[:, 0].float() - 33.3) / 78.6)


def test_preprocessing_modes():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    ms = normalizer_from_cfg(cls_cfg([]), 3)(x)
    expect = (torch.tensor([0.0, 128, 255]) - torch.tensor([125.3, 123.0, 113.9])) / torch.tensor([63.0, 62.1, 66.7])
    assert torch.allclose(ms[0, :, 0, 0], expect)
    d = normalizer_from_cfg(cls_cfg(["INPUT.PREPROCESS", "div255"]), 3)(x)
    assert torch.allclose(d[0, :, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    with pytest.raises(ConfigError, match="INPUT.PREPROCESS"):
        normalizer_from_cfg(cls_cfg(["INPUT.PREPROCESS", "whiten"]), 3)
    with pytest.raises(ConfigError, match="INPUT.PIXEL_MEAN has 3 values"):
        normalizer_from_cfg(cls_cfg([]), 1)


def test_batched_crop_flip_equals_reflect_pad_then_crop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    idx = torch.tensor([5, 0, 3, 3, 1, 2, 4, 0, 5])
    offsets = torch.randint(0, 9, (9, 2), generator=g)
    offsets[0] = torch.tensor([0, 8])
    offsets[1] = torch.tensor([8, 0])  # the extreme corners
    flips = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    out = reflect_crop_flip(images, idx, offsets, flips, 4)
    padded = F.pad(images.float(), [4, 4, 4, 4], mode="reflect")
    for j, i in enumerate(idx.tolist()):
        y, x = offsets[j].tolist()
        ref = padded[i, :, y:y + 32, x:x + 32]
        ref = ref.flip(2) if flips[j] else ref
        assert torch.equal(out[j].float(), ref), j


def test_shards_of_two_ranks_make_the_single_process_batches():
    data = ArraySet(torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8), torch.arange(70) % 10,
                    [str(i) for i in range(10)], "mem")
    single = InMemoryLoader(data, 16, "cpu", True, 2, True, seed=5)
    ranks = [InMemoryLoader(data, 16, "cpu", True, 2, True, seed=5, rank=r, world_size=2) for r in range(2)]
    for loader in [single, *ranks]:
        loader.set_epoch(3)
    assert len(single) == 4 == len(ranks[0])  # the incomplete last global batch is dropped
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    first = [b[1] for b in single]
    single.set_epoch(3)
    assert all(torch.equal(a, b[1]) for a, b in zip(first, single))  # an epoch is reproducible (resume)
    single.set_epoch(4)
    assert not all(torch.equal(a, b[1]) for a, b in zip(first, single))  # and epochs differ

    tests = [InMemoryLoader(data, 32, "cpu", False, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([y for t in tests for _, y in t])
    assert sorted(seen.tolist()) == sorted(data.labels.tolist())
    samplers = [ShardSampler(70, 16, True, seed=5, rank=r, world_size=2) for r in range(2)]
    assert sorted(list(samplers[0]) + list(samplers[1])) == sorted(set(list(samplers[0]) + list(samplers[1])))
    assert len(samplers[0]) == 32


def test_imagenet_folders_and_loader(tmp_path):
    x, y = synthetic_stripes(12, num_classes=3, seed=6)
    names = ["n01", "n02", "n03"]
    write_image_folder(str(tmp_path / "train"), x, y, names)
    write_image_folder(str(tmp_path / "val"), x[:6], y[:6], names)
    tr_tf, te_tf = imagenet_transforms(24, 28, 24)
    train = read_imagenet(str(tmp_path), True, tr_tf)
    assert train.classes == names and len(train) == 12
    # with workers, the augmentation of an epoch is seeded by (seed, epoch, rank)
    loader = build_imagenet_loader(train, 4, True, num_workers=1, seed=1, rank=0, world_size=1)
    loader.set_epoch(2)
    a = [b for b in loader]
    loader.set_epoch(2)
    b = [b for b in loader]
    assert len(a) == 3 and a[0][0].shape == (4, 3, 24, 24) and a[0][0].dtype == torch.uint8
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))  # augmentation reproducible per epoch
    with pytest.raises(WrnDetError, match="ImageNet folder .*missing"):
        read_imagenet(str(tmp_path / "nowhere"), False)


def test_imagenet_training_transform_applies_jitter_and_lighting_and_the_test_one_is_unchanged():
    from PIL import Image
    from torchvision import transforms as T

    from wrn_det.engine.config import load_config

    cfg = load_config(get_cls_cfg(), "imagenet_wide_resnet50_2.yaml", [])
    assert list(cfg.INPUT.COLOR_JITTER) == [0.4, 0.4, 0.4] and cfg.INPUT.LIGHTING_STD == 0.1  # fb.resnet.torch's
    assert load_config(get_cls_cfg(), "imagenet_wide_resnet50_2_cosine.yaml", []).INPUT.LIGHTING_STD == 0.1

    def draws(transform, rgb, n=300):
        # a uniform image: cropping and flipping change nothing, so every change is the colour augmentation
        img = Image.new("RGB", (40, 40), rgb)
        torch.manual_seed(0)
        outs = [transform(img) for _ in range(n)]
        assert all(o.dtype == torch.float32 and o.shape == (3, 24, 24) for o in outs)
        assert all(float(o.std(dim=(1, 2)).max()) < 1e-3 for o in outs)  # still uniform: one shift per image
        return torch.stack([o.mean(dim=(1, 2)) for o in outs])  # (n, 3), on the 0-255 scale

    # brightness alone acts on grey (contrast and saturation blend grey with itself): factors over [0.6, 1.4]
    jitter_only, _ = imagenet_transforms(24, 28, 24, cfg.INPUT.COLOR_JITTER, 0.0)
    factor = draws(jitter_only, (128, 128, 128))[:, 0] / 128
    assert factor.min() >= 0.6 - 1e-3 and factor.max() <= 1.4 + 1e-3
    assert factor.min() < 0.65 and factor.max() > 1.35 and 0.9 < factor.mean() < 1.1
    # on a colour, contrast and saturation change the spread of the channels too
    spread = draws(jitter_only, (60, 120, 180), n=100)
    ratio = (spread[:, 2] - spread[:, 0]) / 120
    assert ratio.min() < 0.5 and ratio.max() > 1.5

    # lighting alone: 255 * eigvec @ (alpha * eigval) with alpha ~ N(0, 0.1^2), the same shift on every pixel
    lighting_only, _ = imagenet_transforms(24, 28, 24, (0, 0, 0), cfg.INPUT.LIGHTING_STD)
    shift = draws(lighting_only, (128, 128, 128)) - 128
    eigvec, eigval = torch.tensor(IMAGENET_PCA_EIGVEC), torch.tensor(IMAGENET_PCA_EIGVAL)
    assert abs(float(eigval[0]) - 0.2175) < 1e-6 and abs(float(eigvec[0, 0]) + 0.5675) < 1e-6
    alpha = torch.linalg.solve(eigvec, shift.T / 255).T / eigval
    assert torch.all((alpha.std(dim=0) - 0.1).abs() < 0.02) and torch.all(alpha.mean(dim=0).abs() < 0.02)

    # both, as the config sets them: colours change and the result stays on the 0-255 scale
    train, test = imagenet_transforms(24, 28, 24, cfg.INPUT.COLOR_JITTER, cfg.INPUT.LIGHTING_STD)
    both = draws(train, (60, 120, 180), n=50)
    assert (both - torch.tensor([60.0, 120.0, 180.0])).abs().max() > 20 and both.max() < 300

    # the test transform is the plain Resize + CenterCrop, uint8, whatever the training options
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(28), T.CenterCrop(24), T.PILToTensor()])(photo)
    assert test(photo).dtype == torch.uint8 and torch.equal(test(photo), reference)
    plain_train, plain_test = imagenet_transforms(24, 28, 24)
    assert torch.equal(plain_test(photo), reference) and plain_train(photo).dtype == torch.uint8
    with pytest.raises(ConfigError, match="INPUT.COLOR_JITTER"):
        imagenet_transforms(24, 28, 24, (0.4, -0.1, 0.4))
    with pytest.raises(ConfigError, match="INPUT.LIGHTING_STD"):
        imagenet_transforms(24, 28, 24, (0.4, 0.4, 0.4), -0.1)


def test_zca_whitening_is_fitted_on_train_and_cached(tmp_path, monkeypatch):
    # 8x8 images keep the fit (a D x D eigen-decomposition, D = 3 * 8 * 8) fast; the code is size-generic
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (600, 3, 8, 8), generator=g).float()
    smooth = (base + base.roll(1, 3) + base.roll(1, 2)) / 3  # correlated neighbouring pixels, like images
    train = ArraySet(smooth[:500].to(torch.uint8), torch.zeros(500, dtype=torch.long), ["a"], str(tmp_path))
    test = ArraySet(smooth[500:].to(torch.uint8), torch.zeros(100, dtype=torch.long), ["a"], str(tmp_path))
    wtr, wte = zca_whiten(train, test, 55.0, 0.1)
    assert wtr.images.dtype == torch.float32 and wtr.images.shape == train.images.shape and wte.images.shape == (100, 3, 8, 8)
    cache = wtr.extra["zca_cache"]
    assert os.path.dirname(cache) == str(tmp_path) and os.path.isfile(cache)
    # ZCA with filter bias b maps the covariance C of the contrast-normalised images to C (C + b I)^-1
    gcn = cls_preprocess.global_contrast_normalize(train.images.reshape(500, -1).double(), 55.0)
    assert torch.allclose(gcn.norm(dim=1), torch.full((500,), 55.0, dtype=torch.float64))
    c = torch.cov(gcn.T, correction=0)
    expect = c @ torch.linalg.inv(c + 0.1 * torch.eye(c.shape[0], dtype=torch.float64))
    got = torch.cov(wtr.images.reshape(500, -1).double().T, correction=0)
    assert torch.allclose(got, expect, atol=2e-3)
    # a second run reads the cache instead of fitting again
    monkeypatch.setattr(cls_preprocess, "fit_zca", lambda *a, **k: pytest.fail("refitted despite the cache"))
    again, _ = zca_whiten(train, test, 55.0, 0.1)
    assert torch.equal(again.images, wtr.images)


@pytest.mark.parametrize("n", [5, 150, 191, 193, 400])
def test_zca_of_fewer_images_than_pixels_equals_the_eigen_decomposition(n):
    # below D = 192 rows the fit takes the thin SVD of the rows; it must give the D x D eigen-decomposition's W
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 192, generator=g, dtype=torch.float64) @ torch.randn(192, 192, generator=g, dtype=torch.float64) * 0.3
    mean, w = cls_preprocess.fit_zca(x, 0.1)
    xc = x - x.mean(dim=0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc / n)
    expect = (evecs * (evals.clamp(min=0) + 0.1).rsqrt()) @ evecs.T
    assert mean.dtype == w.dtype == torch.float32 and w.shape == (192, 192)
    assert torch.allclose(mean.double(), x.mean(dim=0), atol=1e-5)
    assert torch.allclose(w.double(), expect, rtol=1e-4, atol=1e-5), (w.double() - expect).abs().max()
