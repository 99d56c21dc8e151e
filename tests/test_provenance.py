"""Provenance: which config sections each stage reads, their hash, and the stamp the CLI puts in a stage's JSON."""
import pytest

from depthshrinker.jsonio import read_json, write_json
from depthshrinker.cli import stamp
from depthshrinker.config import ConfigError, deep_merge, for_seed, validate
from depthshrinker.provenance import CHAINS, READS, config_hash, provenance, reads, sections

CONFIG = validate({})


def test_a_stage_hash_changes_exactly_when_a_key_it_reads_changes():
    finetune = config_hash(sections(CONFIG, "finetune"))
    assert config_hash(sections(deep_merge(CONFIG, {"stages": {"finetune": {"epochs": 7}}}), "finetune")) != finetune
    assert config_hash(sections(deep_merge(CONFIG, {"mpc": {"runs": 9}}), "finetune")) == finetune
    assert config_hash(sections(for_seed(CONFIG, 3), "finetune")) != finetune
    bench = sections(CONFIG, "bench-mpc")
    assert config_hash(sections(deep_merge(CONFIG, {"mpc": {"runs": 9}}), "bench-mpc")) != config_hash(bench)
    assert config_hash(sections(for_seed(CONFIG, 3), "bench-mpc")) == config_hash(bench)  # architecture only


def test_every_read_key_exists_in_the_schema_defaults():
    for stage in [*READS, *(f"row:{method}" for method in CHAINS)]:
        sections(CONFIG, stage)  # raises ConfigError on a key the schema does not have


def test_a_row_reads_its_whole_chain_and_nothing_of_other_methods():
    assert "stages.finetune" in reads("row:depthshrinker") and "stages.uniform" not in reads("row:depthshrinker")
    assert "stages.uniform" in reads("row:uniform") and "stages.finetune" not in reads("row:uniform")
    with pytest.raises(ConfigError, match="unknown stage 'row:nope'"):
        reads("row:nope")


def test_stamp_adds_the_block_and_keeps_the_data(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"top1": 0.5})
    stamp(path, CONFIG, "finetune")
    data = read_json(path)
    assert data["top1"] == 0.5
    block = data["provenance"]
    assert block == {**provenance(CONFIG, "finetune")}
    assert block["config_hash"] == config_hash(sections(CONFIG, "finetune")) and block["torch"]
