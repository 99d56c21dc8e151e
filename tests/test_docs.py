"""The README's configuration reference names exactly the schema's top-level keys."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_table_matches_the_schema():
    schema = yaml.safe_load((ROOT / "src/depthshrinker/base/config.schema.yaml").read_text())
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = {key for line in section.splitlines() if line.startswith("| `")
                  for key in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    assert documented == set(schema["properties"])
