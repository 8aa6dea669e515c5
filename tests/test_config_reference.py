"""The config reference: docs/config.md and configs/default.yaml are what config.py says today, and
``train --help`` tells a user the main keys, where the run goes and how to resume."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from conftest import REPO
from seemore_ds.__main__ import main
from seemore_ds.config import CHOICES, Config, all_keys
from seemore_ds.config_reference import MARKDOWN_COMMAND, YAML_COMMAND, markdown_reference, yaml_defaults


@pytest.mark.parametrize("path, write, command", [
    ("docs/config.md", markdown_reference, MARKDOWN_COMMAND),
    ("configs/default.yaml", yaml_defaults, YAML_COMMAND),
])
def test_generated_files_are_up_to_date(path, write, command):
    assert (REPO / path).read_text(encoding="utf-8") == write(), f"{path} is out of date with seemore_ds/config.py; run: {command}"


def test_the_regenerate_commands_print_the_files(capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == markdown_reference()
    assert main(["config-reference", "--yaml"]) == 0
    assert capsys.readouterr().out == yaml_defaults()


def test_the_reference_has_every_key_once_with_its_real_default_and_choices():
    rows = {}
    for line in markdown_reference().splitlines():
        match = re.fullmatch(r"\| `([a-z_]+\.[a-z_0-9]+)` \| `([^`]*)` \| (.*?) \| (.+) \|", line)
        if match:
            assert match[1] not in rows, f"{match[1]} listed twice"
            rows[match[1]] = match.groups()[1:]
    assert set(rows) == set(all_keys())
    defaults = Config()
    for key, (default, accepts, doc) in rows.items():
        section, name = key.split(".")
        assert yaml.safe_load(default) == getattr(getattr(defaults, section), name), key
        assert doc.strip() and "\n" not in doc, key
        if key in CHOICES:
            assert accepts.split(" \\| ") == list(CHOICES[key]), key


def test_every_field_has_a_description():
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f.metadata.get("doc", "").strip(), f"{section.name}.{f.name} has no description in config.py"


def test_train_help_lists_keys_where_the_run_goes_and_how_to_resume(cli, tmp_path):
    shown = cli.ok(cli("train", "--help", cwd=tmp_path)).stdout
    defaults = Config()
    for key, value in (("run.output_dir", defaults.run.output_dir), ("train.max_steps", defaults.train.max_steps),
                       ("train.resume", defaults.train.resume), ("data.csv", '""')):
        assert f"{key}={value}" in shown
    assert "docs/config.md" in shown and "config-reference" in shown
    assert "relative to" in shown and "train.resume=auto" in shown and "run.overwrite=true" in shown
    named = set(re.findall(r"\b([a-z]+\.[a-z_0-9]+)=", shown))
    assert named and named <= set(all_keys()), f"train --help names keys that do not exist: {named - set(all_keys())}"
