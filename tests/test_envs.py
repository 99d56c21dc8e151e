"""The conda environment the rules declare lists what pyproject.toml and the Makefile install, with the same bounds."""
import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_env_file_lists_pyproject_dependencies_with_the_same_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"]["mpc"] + project["dependencies"]  # the bounded entry wins
    wanted = {_name(r): r.replace(" ", "") for r in requirements}
    env = yaml.safe_load((ROOT / "envs/depthshrinker.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r.replace(" ", "") for r in pip}
    assert listed == wanted


def test_post_deploy_installs_the_makefiles_no_deps_packages():
    nodeps = re.search(r"^NODEPS := (.+)$", (ROOT / "Makefile").read_text(), re.M)[1].split()
    script = (ROOT / "envs/depthshrinker.post-deploy.sh").read_text()
    line = next(line for line in script.splitlines() if "--no-deps" in line and "-e ." not in line)
    assert line.split("--no-deps", 1)[1].split() == nodeps


def test_every_rule_declares_the_environment():
    rules = "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    assert rules.count("\nrule ") == rules.count("    conda:\n        ENV\n") > 10
