"""Datasets (nipa.workloads.datasets) and transforms (nipa.workloads.transforms): shapes, splits, normalisation,
file formats."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nipa.errors import UserError
from nipa.workloads import datasets as data
from nipa.workloads import transforms as T

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _stack(ds, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(ds) if n is None else n
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _cifar_batch(n: int, label_key: bytes, n_classes: int, rng: np.random.Generator) -> dict:
    """One batch in the official layout: b'data' N x 3072 uint8 (R, G, B planes), labels a list."""
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, n_classes, size=n)],
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_fake_cifar10(folder: Path, n_per_batch: int = 3, n_test: int = 4) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _cifar_batch(n_per_batch, b"labels", 10, rng) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n_test, b"labels", 10, rng)
    for name, b in batches.items():
        _dump(b, folder / name)
    _dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": 3},
          folder / "batches.meta")
    return batches


def _make_fake_cifar100_archive(archive: Path) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    batches = {"train": _cifar_batch(6, b"fine_labels", 100, rng),
               "test": _cifar_batch(2, b"fine_labels", 100, rng)}
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in [*batches.items(), ("meta", meta)]:
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return batches


def _raw_cifar_image(batch: dict, i: int) -> torch.Tensor:
    return torch.from_numpy(batch[b"data"][i].reshape(3, 32, 32).astype(np.float32) / 255.0)


def _denormalize(x: torch.Tensor, info: data.DatasetInfo) -> torch.Tensor:
    return x * torch.tensor(info.std).view(-1, 1, 1) + torch.tensor(info.mean).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------------
# names and infos
# ----------------------------------------------------------------------------------------------------


def test_dataset_info_and_unknown_name():
    assert data.DATASET_NAMES == ("digits", "mnist5k", "cifar10", "cifar100", "imagenet")
    assert data.dataset_info("cifar100").num_classes == 100
    assert data.dataset_info("imagenet").image_size == 224
    assert data.dataset_info("mnist5k").in_channels == 1
    for name in data.DATASET_NAMES:
        info = data.dataset_info(name)
        assert info.name == name and len(info.mean) == len(info.std) == info.in_channels
    with pytest.raises(ValueError, match="valid names: digits, mnist5k, cifar10, cifar100, imagenet"):
        data.dataset_info("svhn")
    with pytest.raises(ValueError, match="valid names"):
        data.get_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split"):
        data.get_dataset("digits", "val")


# ----------------------------------------------------------------------------------------------------
# offline datasets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,sizes", [("digits", (1, 8, 8), (1437, 360)),
                                              ("mnist5k", (1, 28, 28), (4000, 1000))])
def test_offline_shapes_splits_and_determinism(name, shape, sizes):
    train = data.get_dataset(name, "train", augment=False)
    test = data.get_dataset(name, "test")
    assert (len(train), len(test)) == sizes
    x, y = train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == shape and isinstance(y, int)
    assert train.num_classes == test.num_classes == data.dataset_info(name).num_classes == 10
    xs, ys = _stack(test)
    assert ys.min() >= 0 and ys.max() <= 9 and set(ys.tolist()) == set(range(10))
    # stratified: every class holds about 20 % of its items in the test split
    counts = np.bincount(ys.numpy(), minlength=10)
    assert counts.min() >= 0.8 * counts.mean()
    # the split is fixed: another call, with another seed, gives the same test set
    xs2, ys2 = _stack(data.get_dataset(name, "test", seed=123))
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    # train and test partition the source data
    tr, te = set(train.indices.tolist()), set(test.indices.tolist())
    assert not tr & te and len(tr | te) == sum(sizes)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_offline_normalization(name):
    xs, _ = _stack(data.get_dataset(name, "train", augment=False))
    assert abs(xs.mean().item()) < 0.01
    assert abs(xs.std().item() - 1.0) < 0.01


def test_digits_constants_recomputed():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_train, _, _, _ = train_test_split(d.images / 16.0, d.target, test_size=0.2, random_state=0,
                                        stratify=d.target)
    assert data.DIGITS_MEAN[0] == pytest.approx(x_train.mean(), abs=1e-4)
    assert data.DIGITS_STD[0] == pytest.approx(x_train.std(), abs=1e-4)
    assert data.dataset_info("digits").mean == data.DIGITS_MEAN


def test_digits_values_match_sklearn():
    from sklearn.datasets import load_digits

    test = data.get_dataset("digits", "test")
    raw = load_digits().images[test.indices[0]] / 16.0
    x, y = test[0]
    assert y == load_digits().target[test.indices[0]]
    x_raw = _denormalize(x, data.dataset_info("digits"))[0]
    assert torch.allclose(x_raw, torch.tensor(raw).float(), atol=1e-5)


def test_mnist5k_augmentation_train_only():
    train = data.get_dataset("mnist5k", "train", augment=True)
    plain = data.get_dataset("mnist5k", "train", augment=False)
    test = data.get_dataset("mnist5k", "test", augment=True)
    idx = range(16)
    torch.manual_seed(0)
    a = [train[i][0] for i in idx]
    torch.manual_seed(1)
    b = [train[i][0] for i in idx]
    torch.manual_seed(0)
    a2 = [train[i][0] for i in idx]
    assert any(not torch.equal(u, v) for u, v in zip(a, b, strict=True))  # augmentation varies
    assert all(torch.equal(u, v) for u, v in zip(a, a2, strict=True))  # and follows torch's seed
    assert any(not torch.equal(u, plain[i][0]) for i, u in zip(idx, a, strict=True))
    torch.manual_seed(0)
    t1 = [test[i][0] for i in idx]
    torch.manual_seed(1)
    t2 = [test[i][0] for i in idx]
    assert all(torch.equal(u, v) for u, v in zip(t1, t2, strict=True))
    # digits has no augmentation at all
    dig = data.get_dataset("digits", "train", augment=True)
    assert torch.equal(dig[0][0], dig[0][0])


def test_make_loader_reproducible():
    ds = data.get_dataset("digits", "train")
    first = [next(iter(data.make_loader(ds, 32, shuffle=True, seed=s)))[1] for s in (7, 7, 8)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    xb, yb = next(iter(data.make_loader(ds, 32, shuffle=False, seed=0)))
    assert xb.shape == (32, 1, 8, 8) and yb.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------------


def test_cifar10_from_folder(tmp_path):
    batches = _make_fake_cifar10(tmp_path / "cifar-10-batches-py")
    info = data.dataset_info("cifar10")
    train = data.get_dataset("cifar10", "train", data_root=str(tmp_path), augment=False)
    test = data.get_dataset("cifar10", "test", data_root=str(tmp_path))
    assert (len(train), len(test)) == (15, 4)
    assert train.num_classes == 10 and train.classes[3] == "class3"
    x, y = test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == batches["test_batch"][b"labels"][2]
    # channel-planar layout and normalisation: undoing Normalize gives the raw pixels back
    assert torch.allclose(_denormalize(x, info), _raw_cifar_image(batches["test_batch"], 2), atol=1e-5)
    # train items run through data_batch_1..5 in order
    x, y = train[3]
    assert y == batches["data_batch_2"][b"labels"][0]
    assert torch.allclose(_denormalize(x, info), _raw_cifar_image(batches["data_batch_2"], 0), atol=1e-5)


def test_cifar10_files_directly_in_root_and_augmentation(tmp_path):
    batches = _make_fake_cifar10(tmp_path)
    aug = data.get_dataset("cifar10", "train", data_root=str(tmp_path), augment=True)
    test = data.get_dataset("cifar10", "test", data_root=str(tmp_path), augment=True)
    assert aug[0][1] == batches["data_batch_1"][b"labels"][0]
    torch.manual_seed(0)
    a = torch.stack([aug[i][0] for i in range(len(aug))])
    torch.manual_seed(1)
    b = torch.stack([aug[i][0] for i in range(len(aug))])
    assert a.shape == (15, 3, 32, 32) and not torch.equal(a, b)
    assert torch.equal(test[1][0], test[1][0])


def test_cifar_loader_workers_reproducible(tmp_path):
    _make_fake_cifar10(tmp_path)
    ds = data.get_dataset("cifar10", "train", data_root=str(tmp_path), augment=True)

    def first_epoch(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # must not matter with workers: they are seeded from `seed`
        return torch.cat([x for x, _ in data.make_loader(ds, 5, shuffle=True, seed=seed, num_workers=2)])

    assert torch.equal(first_epoch(3, 0), first_epoch(3, 1))
    assert not torch.equal(first_epoch(3, 0), first_epoch(4, 0))


def test_cifar100_from_archive(tmp_path):
    batches = _make_fake_cifar100_archive(tmp_path / "cifar-100-python.tar.gz")
    train = data.get_dataset("cifar100", "train", data_root=str(tmp_path), augment=True)
    test = data.get_dataset("cifar100", "test", data_root=str(tmp_path))
    assert (tmp_path / "cifar-100-python" / "train").is_file()  # extracted next to the archive
    assert (len(train), len(test)) == (6, 2)
    assert train.num_classes == 100 and train.classes[5] == "c5"
    assert "RandomRotation(degrees=15.0)" in repr(train.transform)
    x, y = test[1]
    assert x.shape == (3, 32, 32) and y == batches["test"][b"fine_labels"][1]
    x_raw = _denormalize(x, data.dataset_info("cifar100"))
    assert torch.allclose(x_raw, _raw_cifar_image(batches["test"], 1), atol=1e-5)
    assert all(0 <= train[i][1] < 100 and train[i][0].shape == (3, 32, 32) for i in range(len(train)))


def test_md5_verification(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"nipa" * 1000)
    good = hashlib.md5(f.read_bytes()).hexdigest()
    data.verify_md5(f, good)
    data.verify_md5(f, good.upper())
    with pytest.raises(ValueError, match="MD5 mismatch"):
        data.verify_md5(f, "c58f30108f718f92721af3b95e74349a")


def test_cifar_download_path_with_local_url(tmp_path, monkeypatch):
    src = tmp_path / "mirror" / "cifar-100-python.tar.gz"
    src.parent.mkdir()
    batches = _make_fake_cifar100_archive(src)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    spec = data.CIFAR_SPECS["cifar100"]

    # wrong checksum: an error, and no archive left behind
    bad_spec = dataclasses.replace(spec, url=src.as_uri(), md5="0" * 32)
    monkeypatch.setitem(data.CIFAR_SPECS, "cifar100", bad_spec)
    bad_root = tmp_path / "bad"
    with pytest.raises(ValueError, match="MD5 mismatch"):
        data.get_dataset("cifar100", "test", data_root=str(bad_root), download=True)
    assert not any(bad_root.iterdir())

    monkeypatch.setitem(data.CIFAR_SPECS, "cifar100", dataclasses.replace(spec, url=src.as_uri(), md5=md5))
    good_root = tmp_path / "good"
    with pytest.raises(FileNotFoundError):  # download=False never touches the network
        data.get_dataset("cifar100", "test", data_root=str(good_root))
    test = data.get_dataset("cifar100", "test", data_root=str(good_root), download=True)
    assert [test[i][1] for i in range(2)] == batches["test"][b"fine_labels"]


def test_unsafe_pickle_and_tar_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _make_fake_cifar10(folder)
    _dump({b"data": os.getcwd, b"labels": []}, folder / "test_batch")  # a global outside numpy
    with pytest.raises(UserError, match=r"test_batch: not a readable CIFAR batch \(UnpicklingError: refusing"):
        data.get_dataset("cifar10", "test", data_root=str(tmp_path))

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(tarfile.TarError):
        data.extract_archive(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_missing_datasets_say_where(tmp_path):
    root = tmp_path / "nowhere"
    expected = re.escape(str(root / "cifar-10-batches-py"))
    with pytest.raises(FileNotFoundError, match=expected) as e:
        data.get_dataset("cifar10", "train", data_root=str(root))
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert isinstance(e.value, data.DatasetNotFoundError)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "cifar-100-python"))):
        data.get_dataset("cifar100", "test", data_root=str(root))
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "imagenet" / "val"))):
        data.get_dataset("imagenet", "test", data_root=str(root))


# ----------------------------------------------------------------------------------------------------
# ImageNet
# ----------------------------------------------------------------------------------------------------


def test_imagenet_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = {"train": {"n01_cat": 3, "n02_dog": 2}, "val": {"n01_cat": 1, "n02_dog": 2}}
    for split, classes in files.items():
        for cls, n in classes.items():
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(40 + 10 * i, 60, 3), dtype=np.uint8)
                ext = ".JPEG" if i == 1 else ".png"
                Image.fromarray(arr).save(folder / f"img{i}{ext}")
            (folder / "notes.txt").write_text("not an image")
    train = data.get_dataset("imagenet", "train", data_root=str(tmp_path))
    test = data.get_dataset("imagenet", "test", data_root=str(tmp_path))
    assert (len(train), len(test)) == (5, 3)
    assert train.num_classes == test.num_classes == 2 and data.dataset_info("imagenet").num_classes == 1000
    assert train.classes == ["n01_cat", "n02_dog"]
    assert train.targets == [0, 0, 0, 1, 1] and test.targets == [0, 1, 1]
    for ds in (train, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y in (0, 1)
    assert torch.equal(test[0][0], test[0][0])  # Resize + CenterCrop: deterministic


# ----------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------


def test_to_tensor():
    from PIL import Image

    hwc = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    t = T.ToTensor()(hwc)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[1, 0, 2].item() == pytest.approx(hwc[0, 2, 1] / 255.0)
    assert T.ToTensor()(hwc[:, :, 0]).shape == (1, 2, 3)
    assert torch.equal(T.ToTensor()(Image.fromarray(hwc)), t)
    with pytest.raises(TypeError):
        T.ToTensor()(hwc.astype(np.float32))


def test_random_crop():
    img = torch.rand(3, 10, 12)
    assert T.RandomCrop(8, padding=0)(img).shape == (3, 8, 8)
    assert T.RandomCrop((6, 7), padding=3)(img).shape == (3, 6, 7)
    assert torch.equal(T.RandomCrop((10, 12), padding=0)(img), img)
    # padding is zeros: the corners of a padded full-size crop are often zero, never anything else
    torch.manual_seed(0)
    crops = torch.stack([T.RandomCrop((10, 12), padding=4)(torch.ones(1, 10, 12)) for _ in range(50)])
    assert set(crops.unique().tolist()) == {0.0, 1.0}


def test_flip():
    img = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(T.RandomHorizontalFlip(p=1.0)(img), img.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(p=0.0)(img), img)
    assert T.RandomHorizontalFlip(p=1.0)(img)[0, 0, 0].item() == 3.0


def test_rotation():
    img = torch.rand(3, 9, 13)
    assert torch.allclose(T.RandomRotation(0)(img), img, atol=1e-5)
    assert torch.allclose(T.rotate(img, 0.0), img, atol=1e-5)
    # +90 degrees is counter-clockwise: a dot below the centre moves to the right of it
    dot = torch.zeros(1, 5, 7)
    dot[0, 4, 3] = 1.0
    assert (T.rotate(dot, 90.0)[0] > 0.5).nonzero().tolist() == [[2, 5]]
    out = T.rotate(torch.ones(1, 32, 32), 15.0)
    assert out[0, 0, 0] < 0.1 and out[0, -1, -1] < 0.1 and out[0, 16, 16] == pytest.approx(1.0)  # zero fill
    torch.manual_seed(0)
    angles = [T.RandomRotation(15)(dot) for _ in range(10)]
    assert all(a.shape == dot.shape for a in angles) and not torch.equal(angles[0], angles[1])


def test_normalize():
    img = torch.tensor([[[0.5, 1.0]], [[0.0, 0.25]]])
    out = T.Normalize((0.5, 0.25), (0.5, 0.25))(img)
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0]], [[-1.0, 0.0]]]))
    with pytest.raises(ValueError):
        T.Normalize((0.5,), (0.0,))


def test_resize_center_crop_random_resized_crop():
    img = torch.rand(3, 300, 500)
    assert T.Resize(256)(img).shape == (3, 256, 426)
    assert T.Resize(256)(img.transpose(1, 2)).shape == (3, 426, 256)
    assert T.Resize((20, 30))(img).shape == (3, 20, 30)
    const = torch.full((3, 300, 500), 0.7)
    assert torch.allclose(T.Resize(64)(const), torch.full((3, 64, 106), 0.7), atol=1e-5)
    cc = T.CenterCrop(4)(torch.arange(36.0).view(1, 6, 6))
    assert torch.equal(cc, torch.arange(36.0).view(1, 6, 6)[:, 1:5, 1:5])
    assert T.CenterCrop(8)(torch.ones(1, 4, 4)).shape == (1, 8, 8)
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(224)
    for _ in range(20):
        top, left, h, w = rrc.get_params(300, 500)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 500
        assert rrc(img).shape == (3, 224, 224)
    # impossible constraints fall back to a central crop
    assert T.RandomResizedCrop(16, scale=(2.0, 3.0)).get_params(10, 40) == (0, 13, 10, 13)


def test_compose_and_reprs():
    t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Normalize((0.5,), (0.5,))])
    r = repr(t)
    assert "RandomCrop(size=(32, 32), padding=4)" in r and "RandomHorizontalFlip(p=0.5)" in r
    assert "Normalize" in r
    others = (T.ToTensor(), T.RandomRotation(15), T.Resize(256), T.CenterCrop(224), T.RandomResizedCrop(224))
    for tr in others:
        assert repr(tr).startswith(type(tr).__name__ + "(")
    assert t(torch.rand(1, 32, 32)).shape == (1, 32, 32)
