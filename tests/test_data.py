"""The three splits (DESIGN "Three splits"): train, a selection split carved from the training data and never
trained on, and the held-out test split; fixed for a seed, disjoint, evaluation transforms on select/test."""
import pytest
import torch
from PIL import Image

from depthshrinker.base.config import validate
from depthshrinker.base.data import build_datasets, build_loaders, carve


def test_carve_is_disjoint_covering_and_seeded():
    train, select = carve(100, 30, seed=3)
    assert len(select) == 30 and sorted(train + select) == list(range(100))
    assert carve(100, 30, seed=3) == (train, select) and carve(100, 30, seed=4) != (train, select)
    assert len(carve(10, 30, seed=0)[1]) == 5, "at most half the training set"


def _rows(dataset):
    return {tuple(x.flatten().tolist()) + (int(y),) for x, y in dataset}


def test_digits_three_disjoint_splits():
    data = validate({"data": {"image_size": 8, "select_images": 200}})["data"]
    splits = build_datasets(data, seed=0)
    sizes = [len(splits.train), len(splits.select), len(splits.test)]
    assert sizes == [1797 - 359 - 200, 200, 359]
    train, select, test = _rows(splits.train), _rows(splits.select), _rows(splits.test)
    # digits has a few duplicate images (same pixels, same label): compare what is unique to each split
    assert len(select & train) <= 2 and len(select & test) <= 2 and len(train & test) <= 4
    again = build_datasets(data, seed=0)
    assert torch.equal(again.select.tensors[0], splits.select.tensors[0])
    loaders = build_loaders(data, seed=0)
    assert sum(len(y) for _, y in loaders.select) == 200, "the engine scores each epoch on the selection split"
    assert sum(len(y) for _, y in loaders.test) == 359, "reported figures come from the test split"
    assert torch.equal(next(iter(loaders.select))[0], splits.select.tensors[0][:data["eval_batch_size"]])


def test_split_seed_fixes_the_split_across_training_seeds():
    data = validate({"data": {"image_size": 8}})["data"]
    assert data["split_seed"] == 0
    a, b = build_datasets(data, seed=0), build_datasets(data, seed=5)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]) and torch.equal(a.select.tensors[0], b.select.tensors[0])
    own = {**data, "split_seed": None}
    assert not torch.equal(build_datasets(own, seed=5).test.tensors[0], a.test.tensors[0])
    assert torch.equal(build_datasets(own, seed=0).test.tensors[0], a.test.tensors[0])


def test_imagenet_selection_comes_from_train_with_the_eval_transform(tmp_path):
    for part, n in (("train", 12), ("val", 4)):
        for label in ("a", "b"):
            folder = tmp_path / part / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(folder / f"{i}.png")
    data = validate({"data": {"dataset": "imagenet", "root": str(tmp_path), "image_size": 32,
                              "select_images": 6, "random_erasing": 0.25}})["data"]
    splits = build_datasets(data, seed=0)
    assert [len(splits.train), len(splits.select), len(splits.test)] == [18, 6, 8]
    assert splits.select.dataset.root.endswith("train") and splits.test.root.endswith("val")
    assert not set(splits.train.indices) & set(splits.select.indices)
    a, b = splits.select[0][0], splits.select[0][0]
    assert torch.equal(a, b), "selection images are read without random augmentation"


@pytest.mark.parametrize("limit", [None, 16])
def test_fake_and_limit(limit):
    splits = build_datasets(validate({"data": {"dataset": "fake", "image_size": 8, "limit": limit}})["data"])
    assert [len(splits.train), len(splits.select), len(splits.test)] == ([16] * 3 if limit else [256, 128, 64])
