"""Configuration: one JSON schema (``config.schema.yaml``, shared with the Snakemake workflow) that documents
every key, sets the defaults and the ranges. ``load_config`` validates a YAML file and fills the defaults the
same way Snakemake's ``validate(..., set_default=True)`` does, so a stage run by hand sees the same config as
the rule that runs it."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A bad config value or input path; the message names the key or the file."""


def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(cls):
    """A jsonschema validator class that fills ``default`` values while it validates (jsonschema FAQ)."""
    validate_properties = cls.VALIDATORS["properties"]

    def fill(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, sch)

    return jsonschema.validators.extend(cls, {"properties": fill})


def _scalar(text: str, types: set[str]):
    """``text`` read as the first of the schema's scalar ``types`` it parses as (else unchanged)."""
    for kind, parse in (("integer", int), ("number", float), ("boolean", {"true": True, "false": False}.__getitem__),
                        ("null", {"null": None}.__getitem__)):
        if kind in types:
            try:
                return parse(text.strip().lower() if kind in ("boolean", "null") else text)
            except (KeyError, ValueError):
                pass
    return text


def coerce(instance, sch: dict, root: dict):
    """Snakemake's ``--config key=value`` reads every nested scalar as a string (YAML BaseLoader): turn strings
    back into the numbers and booleans the schema asks for, so ``--config 'grid={snl: {keep: [0.5]}}'`` works."""
    while "$ref" in sch:
        sch = root["$defs"][sch["$ref"].rsplit("/", 1)[-1]]
    types = set(sch.get("type", [])) if isinstance(sch.get("type"), list) else {sch.get("type")}
    if "enum" in sch and isinstance(instance, str):
        return next((v for v in sch["enum"] if str(v).lower() == instance.lower()), instance)
    if isinstance(instance, str) and "string" not in types:
        return _scalar(instance, types)
    if isinstance(instance, list) and "items" in sch:
        return [coerce(item, sch["items"], root) for item in instance]
    if isinstance(instance, dict):
        props = dict(sch.get("properties", {}))
        for part in sch.get("allOf", []):  # keys a stage takes from `$defs/stage` (epochs, lr, patience)
            while "$ref" in part:
                part = root["$defs"][part["$ref"].rsplit("/", 1)[-1]]
            for key, sub in part.get("properties", {}).items():
                props[key] = {**sub, **props.get(key, {})}  # the stage's own defaults over the shared types
        return {k: coerce(v, props[k], root) if k in props else v for k, v in instance.items()}
    return instance


def validate(config: dict) -> dict:
    """Return a validated copy of ``config`` with the schema defaults filled in (strings coerced to the schema's
    numbers and booleans); raise ConfigError naming the key."""
    root = schema()
    config = coerce(copy.deepcopy(config or {}), root, root)
    cls = _with_defaults(jsonschema.Draft202012Validator)
    errors = list(cls(root).iter_errors(config))
    # a failed `allOf` drops its keys' evaluation, so `unevaluatedProperties` then also flags keys it declares:
    # report the cause, not that consequence
    causes = [e for e in errors if e.validator != "unevaluatedProperties"] or errors
    error = jsonschema.exceptions.best_match(causes)
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
        raise ConfigError(f"config key '{key}': {error.message}")
    return config


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config (or none), merge ``overrides`` into it, validate and fill defaults."""
    config = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        config = yaml.safe_load(path.read_text()) or {}
    return validate(deep_merge(config, overrides or {}))


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def for_seed(config: dict, seed: int | str | None) -> dict:
    """The config of one replicate: ``seed`` set to ``seed`` (``config`` itself when ``seed`` is None)."""
    return config if seed is None else deep_merge(config, {"seed": int(seed)})
