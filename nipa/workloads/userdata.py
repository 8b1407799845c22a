"""A user's own data: an image folder tree or a tensor file, beside the built-in datasets (nipa.workloads.datasets).

`--dataset` names one of these when it is not a built-in dataset name:
- an image folder: `dir/train/<class>/<image>` and `dir/test/<class>/...` (or `dir/val/...`). Images are
  .png/.jpg read with PIL when it is installed, and .npy arrays (H x W, H x W x C or C x H x W; uint8 is
  divided by 255) always; `--input_size` resizes and centre-crops, `--mean`/`--std` normalise (default:
  none, pixels in [0, 1]). Labels number the train split's class folders in sorted order.
- a tensor file, already preprocessed: `data.pt` (torch.save of a dict, read with weights_only=True) or
  `data.npz` (numpy, no pickles), holding `x_train, y_train, x_test, y_test`; or files `name_train.pt` and
  `name_test.pt` holding `x`, `y` each (`--dataset name.pt`, `name_train.pt` or `name_test.pt`); or one
  file with `x`, `y` and `--split 0.8`: a permutation seeded by --seed puts the first 80 % in train.

Calibration data always come from the train split, never the test split. A dataset's id in result paths
and records is its file or folder stem; its sha256 (of the file(s); of a folder's file list: relative
paths and sizes) is stored in the records, so results of other data never mix.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nipa.errors import UserError
from nipa.workloads import transforms as T

TENSOR_SUFFIXES = (".pt", ".pth", ".npz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_FOLDERS = ("test", "val")


def pil_available() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def is_user_dataset(name: str) -> bool:
    """True when `name` is a path (a folder or a tensor file, existing or not) rather than a built-in
    dataset name."""
    from nipa.workloads.datasets import DATASET_NAMES

    if name in DATASET_NAMES:
        return False
    path = Path(name)
    return path.suffix.lower() in TENSOR_SUFFIXES or path.is_dir() or "/" in name


def _split_files(path: Path) -> tuple[Path, Path] | None:
    """(train, test) files of a `name_train.pt` / `name_test.pt` pair that `path` names, or None."""
    stem = path.stem
    for tag in ("_train", "_test"):
        if stem.endswith(tag):
            stem = stem[: -len(tag)]
            break
    train, test = (path.with_name(f"{stem}_{split}{path.suffix}") for split in ("train", "test"))
    return (train, test) if train.is_file() and test.is_file() else None


def user_dataset_id(name: str) -> str:
    """The dataset's short id in result paths and records: the file or folder stem (lower case)."""
    path = Path(name.rstrip("/"))
    if path.suffix.lower() in TENSOR_SUFFIXES:
        stem = path.stem
        for tag in ("_train", "_test"):
            if stem.endswith(tag) and _split_files(path) is not None:
                stem = stem[: -len(tag)]
        return stem.lower()
    return path.name.lower()


@functools.lru_cache(maxsize=16)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _hash_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def user_dataset_sha256(name: str) -> str | None:
    """sha256 of a tensor file (of both files of a train/test pair), or of a folder's file list
    (relative paths and sizes: hashing every image of a large tree would take minutes)."""
    path = Path(name)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\n".encode())
        return digest.hexdigest()
    pair = _split_files(path)
    if pair is not None:
        digest = hashlib.sha256()
        for file in pair:
            digest.update(_file_sha256(file).encode())
        return digest.hexdigest()
    return _file_sha256(path) if path.is_file() else None


class TensorSplit(Dataset):
    """One split of a tensor file: inputs of any shape (already preprocessed) and integer labels."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, source: str) -> None:
        if inputs.shape[0] != labels.shape[0]:
            raise UserError(f"{source}: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        self.inputs = inputs.float()
        self.targets = labels.long().reshape(-1)
        self.num_classes = int(self.targets.max()) + 1 if len(self.targets) else 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], int(self.targets[index])


def _read_tensor_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"--dataset {path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                payload = {key: torch.from_numpy(np.array(arrays[key])) for key in arrays.files}
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/numpy raise pickle, zip, value and runtime errors for a foreign file
        raise UserError(f"--dataset {path}: cannot be read as a tensor file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'damaged file'}); save a dict of tensors "
                        "with torch.save or numpy.savez") from None
    if not isinstance(payload, dict):
        raise UserError(f"--dataset {path}: holds a {type(payload).__name__}, not a dict of tensors with keys "
                        "x, y (or x_train, y_train, x_test, y_test)")
    return {key: torch.as_tensor(value) for key, value in payload.items()}


def _pick(payload: dict[str, Any], keys: Sequence[str], path: Path) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in payload]
    if missing:
        raise UserError(f"--dataset {path}: no key(s) {missing} (has {sorted(payload)}); a tensor file holds x, y "
                        "(with --split or a name_train/name_test pair) or x_train, y_train, x_test, y_test")
    return [payload[k] for k in keys]


def tensor_file_split(name: str, split: str, fraction: float | None = None, seed: int = 0) -> TensorSplit:
    """The `split` ("train" or "test") of a tensor file (see the module docstring)."""
    path = Path(name)
    pair = _split_files(path)
    if pair is not None:
        file = pair[0] if split == "train" else pair[1]
        x, y = _pick(_read_tensor_file(file), ("x", "y"), file)
        return TensorSplit(x, y, str(file))
    payload = _read_tensor_file(path)
    if f"x_{split}" in payload:
        x, y = _pick(payload, (f"x_{split}", f"y_{split}"), path)
        return TensorSplit(x, y, str(path))
    x, y = _pick(payload, ("x", "y"), path)
    if fraction is None:
        raise UserError(f"--dataset {path}: holds one set (x, y) and no test split; give --split 0.8 (the train "
                        "share of a seeded permutation), keys x_train/y_train/x_test/y_test, or files "
                        f"{path.stem}_train{path.suffix} and {path.stem}_test{path.suffix}")
    if len(x) != len(y):
        raise UserError(f"--dataset {path}: {len(x)} inputs but {len(y)} labels")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    cut = int(round(fraction * len(x)))
    if not 0 < cut < len(x):
        raise UserError(f"--split {fraction}: leaves an empty split of {len(x)} samples")
    index = order[:cut] if split == "train" else order[cut:]
    return TensorSplit(x[index], y[index], str(path))


def _load_npy_image(path: Path) -> torch.Tensor:
    array = np.load(path, allow_pickle=False)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
        array = np.moveaxis(array, -1, 0)  # H x W x C -> C x H x W
    if array.ndim != 3:
        raise UserError(f"{path}: an image array must be H x W, H x W x C or C x H x W, not {array.shape}")
    image = torch.from_numpy(np.array(array, copy=True))
    return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()


class UserImageFolder(Dataset):
    """`root/<class>/<file>` images (.npy always, .png/.jpg with PIL) with the given classes' numbering."""

    def __init__(self, root: Path, classes: Sequence[str], transform: T.Compose) -> None:
        suffixes = (".npy", *PIL_SUFFIXES) if pil_available() else (".npy",)
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        skipped = 0
        for label, cls in enumerate(self.classes):
            for file in sorted((root / cls).rglob("*")) if (root / cls).is_dir() else []:
                if file.is_file() and file.suffix.lower() in suffixes:
                    self.samples.append((file, label))
                elif file.suffix.lower() in PIL_SUFFIXES:
                    skipped += 1
        if not self.samples:
            hint = (f" ({skipped} .png/.jpg file(s) need PIL, which is not installed: pip install pillow, or "
                    "save the images as .npy arrays)" if skipped else "")
            raise UserError(f"--dataset: no image under {root}/<class>/ ({', '.join(suffixes)}){hint}")
        if skipped:
            raise UserError(f"--dataset: {root} holds {skipped} .png/.jpg file(s) but PIL is not installed; "
                            "pip install pillow, or save the images as .npy arrays")
        self.targets = [label for _, label in self.samples]
        self.num_classes = len(self.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        if path.suffix.lower() == ".npy":
            image = _load_npy_image(path)
        else:
            from PIL import Image  # only for .png/.jpg trees

            with Image.open(path) as im:
                image = T.ToTensor()(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
        return self.transform(image), label


@dataclass(frozen=True)
class ImageOptions:
    """How an image folder's images become inputs: size (None: as stored), per-channel mean and std."""

    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def transform(self) -> T.Compose:
        steps: list = []
        if self.input_size is not None:
            steps += [T.Resize(min(self.input_size)), T.CenterCrop(self.input_size)]
        if self.mean is not None or self.std is not None:
            mean, std = self.mean or (0.0,), self.std or (1.0,)
            if len(mean) != len(std):
                raise UserError(f"--mean {mean} --std {std}: give one value per channel to both")
            steps.append(T.Normalize(mean, std))
        return T.Compose(steps)


def image_folder_split(name: str, split: str, options: ImageOptions = ImageOptions()) -> UserImageFolder:
    root = Path(name)
    if not root.is_dir():
        raise UserError(f"--dataset {name}: no such folder or tensor file (.pt, .npz)")
    train = root / "train"
    tests = [root / folder for folder in TEST_FOLDERS if (root / folder).is_dir()]
    if not train.is_dir() or not tests:
        raise UserError(f"--dataset {name}: an image folder needs {train}/<class>/ and {root}/test/<class>/ "
                        f"(or val/); found {sorted(p.name for p in root.iterdir() if p.is_dir()) or 'no folders'}")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    folder = train if split == "train" else tests[0]
    unknown = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UserError(f"--dataset {name}: {folder} has class folder(s) {unknown} that {train} lacks")
    return UserImageFolder(folder, classes, options.transform())


def user_dataset_split(name: str, split: str, *, options: ImageOptions = ImageOptions(),
                       fraction: float | None = None, seed: int = 0) -> Dataset:
    """The `split` ("train" or "test") of a user's folder or tensor file."""
    if Path(name).suffix.lower() in TENSOR_SUFFIXES:
        return tensor_file_split(name, split, fraction, seed)
    return image_folder_split(name, split, options)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'32' -> (32, 32); '32x48' -> (32, 48)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        raise UserError(f"--input_size {text!r}: give N or HxW, e.g. 32 or 32x48") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"--input_size {text!r}: give N or HxW with positive sizes")
    return parts[0], parts[1]
