"""The config reference, written from the dataclasses of ``config.py``: docs/config.md, configs/default.yaml
and the key list of ``train --help``. Descriptions live only in ``config.py`` (each field's ``option``)."""

from __future__ import annotations

import dataclasses
import itertools
import textwrap

import yaml

from seemore_ds.config import CHOICES, FRACTION_KEYS, NON_NEGATIVE_KEYS, POSITIVE_KEYS, Config, all_keys

MARKDOWN_COMMAND = "python -m seemore_ds config-reference > docs/config.md"
YAML_COMMAND = "python -m seemore_ds config-reference --yaml > configs/default.yaml"

# The keys `train --help` lists; the rest are one link away.
MOST_USED_KEYS = ("run.output_dir", "data.csv", "data.val_csv", "train.max_steps", "train.batch_size", "train.lr",
                  "train.precision", "train.backend", "train.resume", "eval.every", "checkpoint.every",
                  "log.every", "wandb.enabled")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference shows it."""
    key: str
    default: str
    allowed: str
    doc: str


def yaml_scalar(value) -> str:
    """A default written as YAML writes it (``""``, ``false``, ``1.0e-08``), so the files read back equal."""
    if value == "":
        return '""'
    return yaml.safe_dump(value).removesuffix("\n...\n").strip()


def allowed_values(key: str, expected: type) -> str:
    """What a key accepts, from the checks config.validate makes."""
    if key in CHOICES:
        return " | ".join(CHOICES[key])
    if expected is bool:
        return "true | false"
    kind = {int: "integer", float: "number", str: "string"}[expected]
    if key in POSITIVE_KEYS:
        return f"{kind} > 0"
    if key in NON_NEGATIVE_KEYS:
        return f"{kind} ≥ 0"
    if key in FRACTION_KEYS:
        return f"{kind} in {FRACTION_KEYS[key]}"
    return kind


def key_docs() -> list[KeyDoc]:
    """Every config key in the order of config.py, with its default, what it accepts and its description."""
    cfg, types = Config(), all_keys()
    docs = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key = f"{section.name}.{f.name}"
            docs.append(KeyDoc(key, yaml_scalar(f.default), allowed_values(key, types[key]), f.metadata["doc"]))
    return docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the table cell


def markdown_reference() -> str:
    """docs/config.md: one table per section."""
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated from seemore_ds/config.py by `{MARKDOWN_COMMAND}`; edit the descriptions there. -->",
        "",
        "Every key of `python -m seemore_ds train` (and `plan`), its default, what it accepts and what it does.",
        "Give a YAML file with `--config FILE` (only the keys you change; `configs/default.yaml` spells out",
        "every default) and override any key with `section.key=value` arguments, which win over the file.",
        "The resolved config is saved as `RUN/config.yaml`, which `--config` reads back.",
        "",
        "Relative paths (`run.output_dir`, `data.csv`, `data.val_csv`, `data.cache_dir`, `train.resume`,",
        "`train.deepspeed_config`) are read from the folder the command runs in, not from the config file's",
        "folder; under the `deepspeed` launcher, from the folder the launch starts in, on every node. The run's",
        "`config.yaml` holds `data.csv` and `data.val_csv` made absolute, so that `eval` and `generate` find the",
        "data from any folder; image paths inside a table are relative to that table's folder.",
        "",
    ]
    for section, docs in itertools.groupby(key_docs(), key=lambda doc: doc.key.split(".")[0]):
        lines += [f"## {section}", "", "| key | default | accepts | what it does |", "|---|---|---|---|"]
        lines += [f"| `{doc.key}` | `{doc.default}` | {_cell(doc.allowed)} | {_cell(doc.doc)} |" for doc in docs]
        lines.append("")
    return "\n".join(lines)


def yaml_defaults() -> str:
    """configs/default.yaml: every key at its default, its description as a comment above it."""
    lines = [
        "# The defaults of `python -m seemore_ds train`, spelled out. Every key is optional in a config of",
        "# your own; a key you leave out keeps the value below. Override any key on the command line:",
        "#   python -m seemore_ds train --config configs/default.yaml train.max_steps=50 model.n_layer=2",
        f"# Generated from seemore_ds/config.py by `{YAML_COMMAND}`;",
        "# what each key accepts: docs/config.md.",
    ]
    for section, docs in itertools.groupby(key_docs(), key=lambda doc: doc.key.split(".")[0]):
        lines += ["", f"{section}:"]
        for doc in docs:
            lines += textwrap.wrap(doc.doc, width=100, initial_indent="  # ", subsequent_indent="  # ")
            lines.append(f"  {doc.key.split('.')[1]}: {doc.default}")
    return "\n".join(lines) + "\n"


def train_help_epilog() -> str:
    """The part of ``train --help`` after the options: the most-used keys, where the run goes, how to resume."""
    docs = {doc.key: doc for doc in key_docs()}
    rows = []
    for key in MOST_USED_KEYS:
        doc = docs[key]
        rows += textwrap.wrap(f"{key}={doc.default}: {doc.doc}", width=100, initial_indent="  ",
                              subsequent_indent="      ")
    return "\n".join([
        "most-used config keys (key=default: meaning); every key, its default and what it accepts:",
        "docs/config.md, or `python -m seemore_ds config-reference`",
        *rows,
        "",
        "where the run goes: every file lands in run.output_dir (default runs/default), a path relative to",
        "the folder you run the command in (under the deepspeed launcher: the folder the launch starts in).",
        "",
        "resuming: a run stopped by a signal saves a checkpoint and prints its resume command. Nothing",
        "resumes by itself: train.resume=auto continues from the newest intact checkpoint in run.output_dir",
        "(starts fresh when there is none), train.resume=PATH from a run or checkpoint folder, at any rank",
        "count, ZeRO stage or backend. A fresh run into a folder holding another run's checkpoints is",
        "refused; run.overwrite=true moves that run aside instead.",
    ])
