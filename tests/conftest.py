import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from depthshrinker.base.config import load_config
from depthshrinker.nets.registry import create_model

TEST_CONFIG = Path(__file__).resolve().parents[1] / "config" / "test.yaml"

# Property tests: reproducible in CI (derandomized: the same examples every run), exploring locally.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("DEPTHSHRINKER_TEST_THREADS", "1")))  # 2: another machine's sums


@pytest.fixture
def mbv2():
    """Random-init MobileNetV2-1.0, 10 classes, 32x32 stem."""
    return create_model("mobilenetv2_100", 10, small_input=True).eval()


@pytest.fixture
def micro_config(tmp_path):
    """config/test.yaml (trains in seconds: 128 digits at 16x16, 1 epoch per stage, one cell per method), with its
    results in a temporary folder."""
    return load_config(TEST_CONFIG, {"results": str(tmp_path / "results")})


@pytest.fixture
def table_config(micro_config, tmp_path):
    """The micro config with a fraction budget, and its MPC latency table of Kim et al.'s and LayerMerge's DPs."""
    from depthshrinker.methods import depthdp

    config = {**micro_config, "depthdp": {**micro_config["depthdp"], "budget": "fraction"}}
    depthdp.latency_table(config, "mpc", tmp_path / "lat.csv")
    return config, tmp_path / "lat.csv"
