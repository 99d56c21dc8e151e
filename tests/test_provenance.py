"""Provenance: which config sections each stage reads, their hash, and the stamp the CLI puts in a stage's JSON."""
import pytest

from depthshrinker.base.config import ConfigError, deep_merge, for_seed, validate
from depthshrinker.base.jsonio import read_json, write_json
from depthshrinker.base.provenance import CHAINS, READS, config_hash, provenance, reads, search_stage, sections
from depthshrinker.cli import stamp

CONFIG = validate({})


def test_a_stage_hash_changes_exactly_when_a_key_it_reads_changes():
    finetune = config_hash(sections(CONFIG, "finetune"))
    assert config_hash(sections(deep_merge(CONFIG, {"stages": {"finetune": {"epochs": 7}}}), "finetune")) != finetune
    assert config_hash(sections(deep_merge(CONFIG, {"mpc": {"runs": 9}}), "finetune")) == finetune
    assert config_hash(sections(for_seed(CONFIG, 3), "finetune")) != finetune
    bench = sections(CONFIG, "bench-mpc")
    assert config_hash(sections(deep_merge(CONFIG, {"mpc": {"runs": 9}}), "bench-mpc")) != config_hash(bench)
    assert config_hash(sections(for_seed(CONFIG, 3), "bench-mpc")) == config_hash(bench)  # architecture only


def same_hash(stage: str, change: dict) -> bool:
    return config_hash(sections(deep_merge(CONFIG, change), stage)) == config_hash(sections(CONFIG, stage))


def test_only_the_stages_that_use_a_key_rerun_when_it_changes():
    """`model.free_act` shapes only a stage-2 network: the teacher and the searches keep their results; the
    distillation recipe reruns SNL's element search (which distils) but no other search."""
    free_act = {"model": {"free_act": "relu6"}}
    for stage in ("train-dense", "train-uniform", "metaprune", "search"):
        assert same_hash(stage, free_act), stage
    for stage in ("finetune", "merge", "cost-table"):
        assert not same_hash(stage, free_act), stage
    distill = {"stages": {"distill": {"alpha": 0.5}}}
    assert search_stage("depthshrinker", "block") == search_stage("snl", "channel") == "search"
    assert same_hash("search", distill) and not same_hash(search_stage("snl", "element"), distill)
    assert not same_hash("train-dense", {"model": {"arch": "mobilenetv2_140"}})


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
