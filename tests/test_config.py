"""Schema validation: defaults, ranges, one-line errors that name the key; the shipped configs validate."""
from pathlib import Path

import pytest
import yaml

from depthshrinker.base.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_filled():
    cfg = validate({})
    assert cfg["data"]["dataset"] == "digits"
    assert cfg["stages"]["search"]["epochs"] == 2 and cfg["stages"]["distill"]["alpha"] == 0.7
    assert cfg["grid"]["depthshrinker"]["keep"] == [0.4, 0.6, 0.8]


@pytest.mark.parametrize("bad,key", [
    ({"grid": {"depthshrinker": {"keep": [1.5]}}}, "grid.depthshrinker.keep.0"),
    ({"stages": {"finetune": {"epochs": 0}}}, "stages.finetune.epochs"),
    ({"data": {"dataset": "mnist"}}, "data.dataset"),
    ({"model": {"free_act": "gelu"}}, "model.free_act"),
    ({"train": {"momentum": 2}}, "train.momentum"),
    ({"stagse": {}}, "<top level>"),
])
def test_bad_value_names_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        validate(bad)
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_schema_key_is_documented():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            if "$ref" not in sub and set(sub) != {"default"}:  # refinements of keys documented in $defs
                assert sub.get("description"), f"{path}{key} has no description"
            walk(sub, f"{path}{key}.")

    walk(schema, "")


def test_strings_from_snakemake_config_become_the_schema_types():
    """`snakemake --config 'grid={snl: {keep: [0.5]}}'` hands every nested scalar over as a string."""
    cfg = validate({"grid": {"snl": {"keep": ["0.5"]}, "seeds": ["1", "2"]}, "mpc": {"runs": "2"},
                    "bench": {"gpu": "False"}, "results": "123"})
    assert cfg["grid"]["snl"]["keep"] == [0.5] and cfg["grid"]["seeds"] == [1, 2] and cfg["mpc"]["runs"] == 2
    assert cfg["bench"]["gpu"] is False and cfg["results"] == "123"
    with pytest.raises(ConfigError, match="'mpc.runs': 'two' is not of type 'integer'"):
        validate({"mpc": {"runs": "two"}})


def test_stage_keys_from_the_shared_stage_definition_are_coerced_too():
    """`patience` lives in `$defs/stage` (reached through `allOf`), not in each stage's own properties."""
    cfg = validate({"stages": {"finetune": {"patience": "2", "epochs": "5"}, "dense": {"patience": "null"}}})
    assert cfg["stages"]["finetune"]["patience"] == 2 and cfg["stages"]["finetune"]["epochs"] == 5
    assert cfg["stages"]["dense"]["patience"] is None
