"""DistributedDataParallel in the engine: 2 gloo processes on the CPU follow the same loss trajectory as one
process with the same global batch and the same sample order."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from depthshrinker.base.config import validate
from depthshrinker.base.data import build_loaders
from depthshrinker.train import Recipe, fit

CONFIG = validate({"data": {"image_size": 16, "batch_size": 16, "eval_batch_size": 64, "limit": 256}})
RECIPE = Recipe(epochs=3, lr=0.05, grad_clip=None, label_smoothing=0.0)


def tiny_net():
    """No BatchNorm: per-process batch statistics would differ from the global batch's by design."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10))


class InterleavedLoader:
    """One process, global batches made of what rank 0 and rank 1 of a DistributedSampler would draw."""

    def __init__(self, dataset, per_rank, world=2, seed=0):
        self.dataset, self.per_rank, self.world, self.seed, self.epoch = dataset, per_rank, world, seed, 0
        self.sampler = self

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset) // (self.per_rank * self.world)

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        ranks = [order[r::self.world] for r in range(self.world)]
        for k in range(len(self)):
            idx = torch.cat([r[k * self.per_rank:(k + 1) * self.per_rank] for r in ranks])
            yield self.dataset[idx]


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        loaders = build_loaders(CONFIG["data"])
        history = fit(tiny_net(), loaders.train, loaders.select, RECIPE, f"{out}/ddp.last")
        if rank == 0:
            with open(f"{out}/ddp.json", "w") as f:
                json.dump(history, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ddp = json.loads((tmp_path / "ddp.json").read_text())

    train, val = build_loaders(CONFIG["data"])[:2]
    x, y = zip(*[train.dataset[i] for i in range(len(train.dataset))])
    loader = InterleavedLoader(TensorDataset(torch.stack(x), torch.stack(y)), per_rank=16)
    single = fit(tiny_net(), loader, val, RECIPE, tmp_path / "single.last")
    assert len(ddp) == len(single) == 3
    for a, b in zip(ddp, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["select_loss"] == pytest.approx(b["select_loss"], rel=1e-4)
        assert a["select_top1"] == pytest.approx(b["select_top1"])
    assert single[-1]["train_loss"] < single[0]["train_loss"]
    assert torch.load(tmp_path / "ddp.last", weights_only=True)["epoch"] == 3  # written by rank 0
