"""Training throughput of the engine (``depthshrinker.train.fit``) against a bare PyTorch loop.

Both train the same model on the same DataLoader and batch, one epoch at a time, interleaved (bare, engine,
bare, engine, ...) so that machine noise hits both alike; prints images/s as median and IQR and the ratio
engine / bare per repeat pair.

    .venv/bin/python benchmarks/bench_engine.py --repeats 5 --threads 2
    python benchmarks/bench_engine.py --synthetic 4096 --image-size 224 --batch 128             # on a GPU
    python benchmarks/bench_engine.py --synthetic 4096 --image-size 224 --batch 128 --amp bf16 --channels-last

``--synthetic N`` trains on N random images held in memory (1000 classes), so that neither loop waits on image
decoding; ``--amp``/``--channels-last`` apply to both loops alike.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from depthshrinker.base.config import validate
from depthshrinker.base.data import build_loaders
from depthshrinker.base.timing import quartiles
from depthshrinker.nets.registry import create_model
from depthshrinker.train import Recipe, device, fit


def bare_epoch(model, loader, recipe: Recipe) -> float:
    """Images/s of the plainest loop: forward, cross-entropy, backward, SGD step."""
    dev = device()
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True)
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    seen, tic = 0, time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=recipe.amp == "bf16"):
            loss = F.cross_entropy(model(images.contiguous(memory_format=fmt)).float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += targets.numel()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="N random in-memory images instead")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        size, classes = args.image_size, 1000
        data = TensorDataset(torch.randn(args.synthetic, 3, size, size), torch.randint(0, classes, (args.synthetic,)))
        train_loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                                  pin_memory=torch.cuda.is_available())
    else:
        config = validate({"data": {"dataset": args.dataset, "image_size": args.image_size,
                                    "batch_size": args.batch}})
        train_loader, _, _, classes = build_loaders(config["data"])
    val_loader = [next(iter(train_loader))]  # the engine evaluates after each epoch; keep that out of the way
    model = create_model("mobilenetv2_100", classes, small_input=args.image_size <= 64).to(device())
    recipe = Recipe(epochs=1, lr=0.01, amp=args.amp, channels_last=args.channels_last)
    bare_epoch(model, train_loader, recipe)  # warm-up
    bare, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            bare.append(bare_epoch(model, train_loader, recipe))
            history = fit(model, train_loader, val_loader, recipe, Path(tmp) / "x.last", desc="engine")
            (Path(tmp) / "x.last").unlink()
            engine.append(history[-1]["images_per_s"])
    ratios = [e / b for e, b in zip(engine, bare)]
    source = f"synthetic {args.synthetic}" if args.synthetic else args.dataset
    print(f"device {device()}, threads {args.threads}, batch {args.batch}, {source} {args.image_size}px, "
          f"amp {args.amp}, channels_last {args.channels_last}, {args.repeats} interleaved epochs each")
    for name, values in (("bare loop img/s", bare), ("engine img/s", engine), ("engine / bare", ratios)):
        med, iqr = quartiles(values)
        print(f"{name:>16}: median {med:8.3f}  IQR {iqr:.3f}")


if __name__ == "__main__":
    main()
