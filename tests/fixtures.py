"""Tiny dataset trees in the exact layouts the real-benchmark loaders expect.

Each writer takes a folder and returns it. Images are small random arrays, so
these trees test the loaders' reading, splitting and error paths, never accuracy.
"""
import csv, pickle
from pathlib import Path

import numpy as np
from PIL import Image

from tgr.data import split_lists


def _png(path: Path, size: int, seed: int, fmt: str = "JPEG"):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)


def write_cifar100(root: Path, per_class: int = 2) -> Path:
    "ROOT/cifar-100-python/{train,test,meta} in CIFAR-100's python pickle format, `per_class` images per class and file."
    sl = split_lists("cifar-fs")
    names = sorted(sl["train"] + sl["val"] + sl["test"])      # CIFAR-100's fine label names are alphabetical
    base = Path(root) / "cifar-100-python"; base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 255, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(base / part, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}, f)
    return Path(root)


def write_mini_imagenet(root: Path, per_class: int = 3, size: int = 90) -> Path:
    "ROOT/images/*.jpg and ROOT/{train,val,test}.csv with header 'filename,label'."
    root = Path(root); sl = split_lists("mini-imagenet")
    for split in ("train", "val", "test"):
        rows = []
        for k, wnid in enumerate(sl[split]):
            for j in range(per_class):
                fn = f"{wnid}{j:08d}.jpg"; rows.append((fn, wnid))
                _png(root / "images" / fn, size, hash((split, k, j)) % 2**32)
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f); w.writerow(["filename", "label"]); w.writerows(rows)
    return root


def write_cub(root: Path, per_class: int = 2, size: int = 60) -> Path:
    "ROOT/CUB_200_2011/images/<NNN.Name>/*.jpg for the 200 classes."
    root = Path(root); sl = split_lists("cub")
    names = sorted(sl["train"] + sl["val"] + sl["test"])
    for k, name in enumerate(names):
        for j in range(per_class):
            _png(root / "CUB_200_2011" / "images" / name / f"{name.split('.')[1]}_{j:04d}.jpg", size, k * 10 + j)
    return root


def write_folder(root: Path, classes=None, per_class: int = 3, size: int = 40) -> Path:
    "ROOT/{train,val,test}/<class>/*.png"
    root = Path(root)
    classes = classes or {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f", "g"]}
    for split, cs in classes.items():
        for k, c in enumerate(cs):
            for j in range(per_class): _png(root / split / c / f"{j}.png", size, k * 7 + j, fmt="PNG")
    return root
