"""Datasets and transforms, split three ways (DESIGN "Three splits").

* ``train``: the images every stage trains on.
* ``select``: a fixed, seeded subset carved from the training data and never trained on; every choice made
  from accuracy (MetaPruning's candidate scoring, any early choice) is made on it, with evaluation transforms.
* ``test``: the held-out split that alone produces the reported top-1 (digits: a seeded fraction; CIFAR: the
  official test set; ImageNet: the official validation set; fake: its own random images).

``digits`` is the embedded default: scikit-learn's 1797 real 8x8 handwritten digits (shipped inside the
package, nothing to download), upsampled to ``image_size`` RGB. CIFAR-10/100 and ImageNet are read from local
folders with their standard transforms (ImageNet: timm's transform factory, the upstream recipe's RandAugment,
random erasing and bicubic resize).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from depthshrinker.base.config import ConfigError

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "fake": 10}
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


@dataclass
class Splits:
    """The three splits: ``train`` (trained on), ``select`` (carved from the training data, never trained on,
    evaluation transforms) and ``test`` (held out, the only source of reported top-1)."""
    train: Dataset
    select: Dataset
    test: Dataset
    num_classes: int


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def carve(n: int, select_images: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, selection indices) of a training set of ``n`` images: a seeded permutation's first
    ``select_images`` (at most half the set) select, the rest train; disjoint and fixed for a seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(select_images, n // 2)
    return sorted(order[k:]), sorted(order[:k])


def digits(image_size: int, test_fraction: float, select_images: int, seed: int) -> Splits:
    """scikit-learn digits as normalised RGB tensors of ``image_size``² (bilinear upsampling of 8x8 images):
    a seeded ``test_fraction`` is the test split, ``select_images`` of the rest the selection split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    x = _normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, rest = order[:n_test], order[n_test:]
    train, select = carve(len(rest), select_images, seed)
    train, select = rest[train], rest[select]
    return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[select], y[select]),
                  TensorDataset(x[test], y[test]), 10)


def _carved(train_aug: Dataset, train_eval: Dataset, test: Dataset, num_classes: int, select_images: int,
            seed: int) -> Splits:
    """Splits of a folder dataset: the selection images come from the training set read with the evaluation
    transform, the training images from the same set with the training transform."""
    train, select = carve(len(train_aug), select_images, seed)
    return Splits(Subset(train_aug, train), Subset(train_eval, select), test, num_classes)


def cifar(name: str, root: str, image_size: int, select_images: int, seed: int) -> Splits:
    """CIFAR-10/100 from torchvision's folder layout at ``root``; standard crop+flip augmentation; the official
    test set is the test split, ``select_images`` seeded training images the selection split."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    norm = T.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train_tf = T.Compose(resize + [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip(),
                                   T.ToTensor(), norm])
    eval_tf = T.Compose(resize + [T.ToTensor(), norm])
    try:
        parts = [cls(root, train=train, transform=tf, download=False)
                 for train, tf in ((True, train_tf), (True, eval_tf), (False, eval_tf))]
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ConfigError(f"data.root: no {name} dataset in {root} ({err})") from None
    return _carved(*parts, NUM_CLASSES[name], select_images, seed)


def imagenet(root: str, image_size: int, randaugment: str | None, random_erasing: float, interpolation: str,
             select_images: int, seed: int) -> Splits:
    """ImageNet as ``root/train`` and ``root/val`` ImageFolders with timm's train/eval transforms; ``val`` is
    the test split, ``select_images`` seeded images of ``train`` the selection split."""
    from torchvision.datasets import ImageFolder

    train_tf = create_transform(image_size, is_training=True, auto_augment=randaugment, re_prob=random_erasing,
                                interpolation=interpolation)
    eval_tf = create_transform(image_size, is_training=False, interpolation=interpolation)
    parts = []
    for part, tf in (("train", train_tf), ("train", eval_tf), ("val", eval_tf)):
        folder = Path(root) / part
        if not folder.is_dir():
            raise ConfigError(f"data.root: ImageNet folder {folder} does not exist")
        try:
            parts.append(ImageFolder(str(folder), transform=tf))
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(f"data.root: {folder} is not an ImageFolder ({err})") from None
    return _carved(*parts, len(parts[0].classes), select_images, seed)


def fake(image_size: int, select_images: int, seed: int) -> Splits:
    """torchvision FakeData (random images): only for tests of shapes and plumbing."""
    import torchvision.transforms as T
    from torchvision.datasets import FakeData

    tf, shape = T.ToTensor(), (3, image_size, image_size)
    return Splits(FakeData(256, shape, 10, tf, random_offset=seed),
                  FakeData(min(select_images, 128), shape, 10, tf, random_offset=seed + 2),
                  FakeData(64, shape, 10, tf, random_offset=seed + 1), 10)


def build_datasets(data: dict, seed: int = 0) -> Splits:
    """The train/select/test datasets named by the ``data`` config section (``limit``: the first N of each).
    The split is drawn with ``data.split_seed`` (null: ``seed``), so replicates that differ only in their
    training seed share their selection and test images and are paired image by image."""
    name, root, size, select = data["dataset"], data.get("root"), data["image_size"], data["select_images"]
    seed = seed if data.get("split_seed") is None else data["split_seed"]
    if name in ("cifar10", "cifar100", "imagenet"):
        if not root:
            raise ConfigError(f"data.root: dataset '{name}' needs a folder")
        if not Path(root).is_dir():
            raise ConfigError(f"data.root: folder {root} does not exist")
    if name == "digits":
        splits = digits(size, data["val_fraction"], select, seed)
    elif name == "fake":
        splits = fake(size, select, seed)
    elif name == "imagenet":
        splits = imagenet(root, size, data["randaugment"], data["random_erasing"], data["interpolation"], select,
                          seed)
    else:
        splits = cifar(name, root, size, select, seed)
    if data.get("limit"):
        n = data["limit"]
        splits = Splits(*(Subset(d, range(min(n, len(d)))) for d in (splits.train, splits.select, splits.test)),
                        splits.num_classes)
    return splits


def eval_loader(dataset: Dataset, data: dict) -> DataLoader:
    """An unshuffled evaluation loader; under DDP each rank takes every world-th image, so that each image is
    evaluated exactly once (``train.evaluate`` sums across ranks)."""
    sampler = range(dist.get_rank(), len(dataset), dist.get_world_size()) if dist.is_initialized() else None
    return DataLoader(dataset, batch_size=data["eval_batch_size"], sampler=sampler, shuffle=False,
                      num_workers=data["workers"], pin_memory=torch.cuda.is_available(),
                      persistent_workers=data["workers"] > 0)


class Loaders(NamedTuple):
    """The loaders of one stage: ``train`` (shuffled), ``select`` (the selection split: early stopping, every
    accuracy-based choice) and ``test`` (the reported figures), unshuffled; and the class count."""
    train: DataLoader
    select: DataLoader
    test: DataLoader
    num_classes: int


def build_loaders(data: dict, seed: int = 0) -> Loaders:
    """The train, selection and test loaders of ``data``. The train loader shuffles with its own generator,
    reseeded each epoch by the engine; under DDP (torch.distributed initialised) training shards with a
    DistributedSampler (``data.batch_size`` per process)."""
    splits = build_datasets(data, seed)
    common = dict(num_workers=data["workers"], pin_memory=torch.cuda.is_available(),
                  persistent_workers=data["workers"] > 0)
    if dist.is_initialized():
        train = DataLoader(splits.train, batch_size=data["batch_size"], drop_last=True,
                           sampler=DistributedSampler(splits.train, shuffle=True, seed=seed), **common)
    else:
        train = DataLoader(splits.train, batch_size=data["batch_size"], shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(seed), **common)
    return Loaders(train, eval_loader(splits.select, data), eval_loader(splits.test, data), splits.num_classes)
