"""Datasets and transforms.

``digits`` is the embedded default: scikit-learn's 1797 real 8x8 handwritten digits (shipped inside the
package, nothing to download), upsampled to ``image_size`` RGB with a fixed seeded train/val split.
CIFAR-10/100 and ImageNet are read from local folders with their standard transforms (ImageNet: timm's
transform factory, the upstream recipe's RandAugment, random erasing and bicubic resize).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from .config import ConfigError

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "fake": 10}
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def digits(image_size: int, val_fraction: float, seed: int) -> Splits:
    """scikit-learn digits as normalised RGB tensors of ``image_size``² (bilinear upsampling of 8x8 images)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    x = _normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * len(x))
    val, train = order[:n_val], order[n_val:]
    return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10)


def cifar(name: str, root: str, image_size: int) -> Splits:
    """CIFAR-10/100 from torchvision's folder layout at ``root``; standard crop+flip augmentation."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    norm = T.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train_tf = T.Compose(resize + [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip(),
                                   T.ToTensor(), norm])
    val_tf = T.Compose(resize + [T.ToTensor(), norm])
    try:
        return Splits(cls(root, train=True, transform=train_tf, download=False),
                      cls(root, train=False, transform=val_tf, download=False), NUM_CLASSES[name])
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ConfigError(f"data.root: no {name} dataset in {root} ({err})") from None


def imagenet(root: str, image_size: int, randaugment: str | None, random_erasing: float,
             interpolation: str) -> Splits:
    """ImageNet as ``root/train`` and ``root/val`` ImageFolders with timm's train/eval transforms."""
    from torchvision.datasets import ImageFolder

    train_tf = create_transform(image_size, is_training=True, auto_augment=randaugment, re_prob=random_erasing,
                                interpolation=interpolation)
    val_tf = create_transform(image_size, is_training=False, interpolation=interpolation)
    splits = []
    for part, tf in (("train", train_tf), ("val", val_tf)):
        folder = Path(root) / part
        if not folder.is_dir():
            raise ConfigError(f"data.root: ImageNet folder {folder} does not exist")
        try:
            splits.append(ImageFolder(str(folder), transform=tf))
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(f"data.root: {folder} is not an ImageFolder ({err})") from None
    return Splits(splits[0], splits[1], len(splits[0].classes))


def fake(image_size: int, seed: int) -> Splits:
    """torchvision FakeData (random images): only for tests of shapes and plumbing."""
    from torchvision.datasets import FakeData
    import torchvision.transforms as T

    tf = T.ToTensor()
    return Splits(FakeData(256, (3, image_size, image_size), 10, tf, random_offset=seed),
                  FakeData(64, (3, image_size, image_size), 10, tf, random_offset=seed + 1), 10)


def build_datasets(data: dict, seed: int = 0) -> Splits:
    """The train/val datasets named by the ``data`` config section."""
    name, root, size = data["dataset"], data.get("root"), data["image_size"]
    if name in ("cifar10", "cifar100", "imagenet"):
        if not root:
            raise ConfigError(f"data.root: dataset '{name}' needs a folder")
        if not Path(root).is_dir():
            raise ConfigError(f"data.root: folder {root} does not exist")
    if name == "digits":
        splits = digits(size, data["val_fraction"], seed)
    elif name == "fake":
        splits = fake(size, seed)
    elif name == "imagenet":
        splits = imagenet(root, size, data["randaugment"], data["random_erasing"], data["interpolation"])
    else:
        splits = cifar(name, root, size)
    if data.get("limit"):
        n = data["limit"]
        splits = Splits(Subset(splits.train, range(min(n, len(splits.train)))),
                        Subset(splits.val, range(min(n, len(splits.val)))), splits.num_classes)
    return splits


def build_loaders(data: dict, seed: int = 0):
    """(train_loader, val_loader, num_classes). The train loader shuffles with its own generator, reseeded each
    epoch by the engine. Under DDP (torch.distributed initialised) training shards with a DistributedSampler
    (``data.batch_size`` per process) and validation takes every world-th image, so that each image is
    evaluated exactly once."""
    splits = build_datasets(data, seed)
    common = dict(num_workers=data["workers"], pin_memory=torch.cuda.is_available(),
                  persistent_workers=data["workers"] > 0)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        train = DataLoader(splits.train, batch_size=data["batch_size"], drop_last=True,
                           sampler=DistributedSampler(splits.train, shuffle=True, seed=seed), **common)
        val = DataLoader(splits.val, batch_size=data["eval_batch_size"],
                         sampler=range(rank, len(splits.val), world), **common)
    else:
        train = DataLoader(splits.train, batch_size=data["batch_size"], shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(seed), **common)
        val = DataLoader(splits.val, batch_size=data["eval_batch_size"], shuffle=False, **common)
    return train, val, splits.num_classes
