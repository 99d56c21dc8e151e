import pytest
import torch

from depthshrinker.config import validate
from depthshrinker.models import create_model


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def mbv2():
    """Random-init MobileNetV2-1.0, 10 classes, 32x32 stem."""
    return create_model("mobilenetv2_100", 10, small_input=True).eval()


@pytest.fixture
def micro_config(tmp_path):
    """A config that trains in seconds: 128 digits at 16x16, 1 epoch per stage, one cell per method."""
    return validate({
        "results": str(tmp_path / "results"),
        "data": {"dataset": "digits", "image_size": 16, "batch_size": 16, "eval_batch_size": 64, "limit": 128},
        "model": {"pretrained": "none"},
        "stages": {"dense": {"epochs": 1, "lr": 2.0}, "search": {"epochs": 1, "lr": 2.0, "latency_target": "mpc"},
                   "finetune": {"epochs": 1, "lr": 2.0}},
        "mpc": {"runs": 1, "warmup": 0, "tolerance": 1.0},
        "bench": {"repeats": 2},
        "metapruning": {"population": 2, "generations": 1, "parents": 1, "holdout_images": 32},
        "grid": {"depthshrinker": {"keep": [0.5]}, "snl": {"granularity": ["channel"], "keep": [0.5]},
                 "uniform": {"width": [0.5]}, "metapruning": {"cost": ["mpc"], "match": [0.5]}},
    })
