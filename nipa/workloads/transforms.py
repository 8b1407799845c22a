"""Small tensor-based image transforms (no torchvision dependency).

Every transform except :class:`ToTensor` takes and returns a float tensor of shape ``C x H x W``.
Random transforms draw from torch's *global* generator on purpose: DataLoader seeds that generator
in each worker from its own seeded generator, and ``torch.manual_seed`` covers the in-process case,
so augmentation is reproducible without threading a generator through every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "ToTensor",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRotation",
    "Resize",
    "CenterCrop",
    "RandomResizedCrop",
]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as an ``(height, width)`` pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _check_chw(img: torch.Tensor) -> None:
    if not isinstance(img, torch.Tensor) or img.ndim != 3:
        raise TypeError(f"expected a C x H x W tensor, got {type(img).__name__} "
                        f"with shape {tuple(getattr(img, 'shape', ()))}")


def _uniform(low: float, high: float) -> float:
    """One float uniformly drawn from [low, high) with torch's global generator."""
    return float(torch.empty(()).uniform_(low, high))


def _randint(high_exclusive: int) -> int:
    """One int uniformly drawn from [0, high_exclusive) with torch's global generator."""
    return int(torch.randint(0, high_exclusive, ()))


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a C x H x W tensor; antialiasing avoids aliasing when shrinking big photos."""
    if tuple(img.shape[-2:]) == size:
        return img
    return F.interpolate(img.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


class Compose:
    """Apply transforms one after the other."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])" if inner else "Compose([])"


class ToTensor:
    """uint8 ``H x W x C`` / ``H x W`` numpy array or PIL image -> float ``C x H x W`` tensor in [0, 1]."""

    def __call__(self, pic: Any) -> torch.Tensor:
        arr = np.asarray(pic)  # PIL images expose the array interface
        if arr.dtype != np.uint8:
            raise TypeError(f"ToTensor expects uint8 pixels, got dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise TypeError(f"ToTensor expects H x W or H x W x C, got shape {arr.shape}")
        # np.array copy: PIL's buffer is read-only and torch warns on non-writable arrays.
        t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()
        return t.float().div_(255.0)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Per-channel ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        if img.shape[0] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, image has {img.shape[0]}")
        return (img - self._mean.to(img.dtype)) / self._std.to(img.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomCrop:
    """Zero-pad every border by ``padding`` pixels, then crop a random ``size`` window."""

    def __init__(self, size: int | Sequence[int], padding: int = 0) -> None:
        if padding < 0:
            raise ValueError("padding must be >= 0")
        self.size = _pair(size)
        self.padding = int(padding)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        if self.padding:
            p = self.padding
            img = F.pad(img, (p, p, p, p), mode="constant", value=0.0)
        h, w = img.shape[-2:]
        th, tw = self.size
        if th > h or tw > w:
            raise ValueError(f"crop size {self.size} larger than padded image {(h, w)}")
        top = _randint(h - th + 1)
        left = _randint(w - tw + 1)
        return img[:, top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        # Always draw, even when p is 0 or 1, so the random stream doesn't depend on p.
        if _uniform(0.0, 1.0) < self.p:
            return img.flip(-1)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomRotation:
    """Rotate about the centre by a uniform angle in ``[-degrees, degrees]``; bilinear, zero fill."""

    def __init__(self, degrees: float) -> None:
        if degrees < 0:
            raise ValueError("degrees must be >= 0")
        self.degrees = float(degrees)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        angle = _uniform(-self.degrees, self.degrees)
        return rotate(img, angle)

    def __repr__(self) -> str:
        return f"RandomRotation(degrees={self.degrees})"


def rotate(img: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate a C x H x W tensor counter-clockwise by ``angle`` degrees (bilinear, zero fill)."""
    _check_chw(img)
    h, w = img.shape[-2:]
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps *output* normalised coords to *input* ones, so we need the inverse rotation.
    # Normalised coords scale x by W/2 and y by H/2; conjugating by that scaling keeps the rotation
    # rigid in pixels on non-square images. Image y points down, so this inverse is [[c, -s], [s, c]]
    # in (x, y) pixel coords for a counter-clockwise turn as seen on screen.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=img.dtype).unsqueeze(0)
    grid = F.affine_grid(theta, [1, img.shape[0], h, w], align_corners=False)
    out = F.grid_sample(img.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.squeeze(0)


class Resize:
    """Resize the shorter side to ``size`` keeping the aspect ratio (or to an exact ``(h, w)``)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size if isinstance(size, int) else _pair(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        if isinstance(self.size, int):
            h, w = img.shape[-2:]
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)  # truncation, as the usual ImageNet recipe
            target = (self.size, new_long) if h <= w else (new_long, self.size)
        else:
            target = self.size
        return _resize(img, target)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, bilinear, antialias=True)"


class CenterCrop:
    """Crop the central ``size`` window (zero-padding first if the image is smaller)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        th, tw = self.size
        h, w = img.shape[-2:]
        if th > h or tw > w:
            ph, pw = max(th - h, 0), max(tw - w, 0)
            img = F.pad(img, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
            h, w = img.shape[-2:]
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return img[:, top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class RandomResizedCrop:
    """Crop a random area fraction / aspect ratio window and resize it to ``size`` (Inception-style).

    Up to ten tries to draw an area in ``scale`` of the image and a log-uniform aspect ratio in
    ``ratio`` that fits; if none fits, fall back to the largest central crop with a clamped ratio.
    """

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> None:
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError("scale and ratio must be (min, max)")
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Random ``(top, left, h, w)`` of the crop window."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(height - h + 1), _randint(width - w + 1), h, w
        # Fallback: whole image, cropped centrally to the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        _check_chw(img)
        top, left, h, w = self.get_params(*img.shape[-2:])
        return _resize(img[:, top:top + h, left:left + w], self.size)

    def __repr__(self) -> str:
        return (f"RandomResizedCrop(size={self.size}, scale={self.scale}, "
                f"ratio=({self.ratio[0]:.4f}, {self.ratio[1]:.4f}))")
