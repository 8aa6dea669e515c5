"""Run configuration: overrides, YAML files, one-line errors that name the key, the saved config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from seemore_ds.config import Config, load_config, save_config
from seemore_ds.errors import UserError


def config_error(path=None, overrides=()) -> str:
    with pytest.raises(UserError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=50", "train.lr=3e-4", "log.progress=false", "model.image_tokens=cls",
                             "data.max_image_pixels=1_000_000"])
    assert cfg.train.max_steps == 50 and cfg.train.lr == 3e-4 and cfg.log.progress is False
    assert cfg.model.image_tokens == "cls" and cfg.data.max_image_pixels == 1_000_000
    assert cfg.train.batch_size == Config().train.batch_size


def test_configs_default_yaml_spells_out_exactly_the_built_in_defaults():
    """The shipped default.yaml is documentation: it must not drift from config.py."""
    root = Path(__file__).resolve().parent.parent
    assert load_config(str(root / "configs" / "default.yaml")) == Config()
    assert load_config(str(root / "configs" / "default.yaml"), ["train.max_steps=7"]) != Config()


@pytest.mark.parametrize("override, suggestion", [
    ("train.max_step=5", "did you mean train.max_steps?"),
    ("train.learning_rate=0.1", None),
    ("modle.n_embd=64", "did you mean model.n_embd?"),
    ("trian.seed=1", "did you mean train.seed?"),
])
def test_unknown_key_is_refused_with_the_closest_key(override, suggestion):
    message = config_error(overrides=[override])
    assert f"unknown config key {override.split('=')[0]!r}" in message
    if suggestion:
        assert suggestion in message


@pytest.mark.parametrize("override, expects", [
    ("train.max_steps=lots", "config key train.max_steps expects an integer, got 'lots'"),
    ("train.max_steps=2.5", "config key train.max_steps expects an integer, got '2.5'"),
    ("train.lr=fast", "config key train.lr expects a number, got 'fast'"),
    ("log.progress=maybe", "config key log.progress expects true or false, got 'maybe'"),
])
def test_wrong_type_names_the_key_and_what_it_expects(override, expects):
    assert config_error(overrides=[override]) == expects


@pytest.mark.parametrize("override, says", [
    ("train.precision=fp8", "config key train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("data.on_bad_row=ignore", "config key data.on_bad_row must be one of skip, error, got 'ignore'"),
    ("model.image_tokens=all", "config key model.image_tokens must be one of patches, pooled, cls, got 'all'"),
    ("train.backend=jax", "config key train.backend must be one of torch, deepspeed, auto, got 'jax'"),
    ("train.max_steps=0", "config key train.max_steps must be positive, got 0"),
    ("train.lr=-1", "config key train.lr must be zero or more, got -1.0"),
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1), got 1.0"),
    ("run.output_dir=", "run.output_dir must name a folder"),
    ("train.lr=nan", "config key train.lr must be a finite number, got nan"),
    ("train.eps=nan", "config key train.eps must be a finite number, got nan"),
    ("train.lr=inf", "config key train.lr must be a finite number, got inf"),
    ("train.grad_clip=nan", "config key train.grad_clip must be a finite number, got nan"),
    ("profile.peak_tflops=-inf", "config key profile.peak_tflops must be a finite number, got -inf"),
])
def test_bad_values_are_refused(override, says):
    assert says in config_error(overrides=[override])


def test_an_override_without_equals_sign_is_refused():
    assert "expected a key=value override" in config_error(overrides=["train.max_steps"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 7\n  lr: 0.01\nmodel:\n  n_embd: 64\n  n_head: 4\nlog:\n  progress: no\n",
                    encoding="utf-8")
    cfg = load_config(str(path), ["train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.model.n_embd, cfg.model.n_head) == (9, 0.01, 64, 4)
    assert cfg.log.progress is False


def test_a_section_with_every_key_commented_out_is_allowed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  # max_steps: 5\nmodel:\n  n_embd: 64\n", encoding="utf-8")
    cfg = load_config(str(path))
    assert cfg.model.n_embd == 64 and cfg.train.max_steps == Config().train.max_steps


@pytest.mark.parametrize("text, says", [
    ("train:\n  max_steps: [1, 2\n", "is not valid YAML at line"),
    ("train:\n\tmax_steps: 3\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold sections such as 'train:'"),
    ("max_steps: 3\n", "'max_steps' must sit inside a section"),
    ("train:\n  max_step: 3\n", "unknown config key 'train.max_step'; did you mean train.max_steps?"),
    ("train:\n  max_steps: many\n", "config key train.max_steps expects an integer"),
    ("train:\n  max_steps: 3\ntrain:\n  batch_size: 8\n", "at line 3: 'train' is given twice (first at line 1)"),
    ("train:\n  max_steps: 3\n  lr: 0.1\n  max_steps: 4\n", "at line 4: 'max_steps' is given twice (first at line 2)"),
])
def test_a_bad_yaml_file_is_one_line_naming_the_file(tmp_path, text, says):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    message = config_error(str(path))
    assert str(path) in message and says in message


def test_yaml_infinity_is_refused_like_an_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: .inf\n", encoding="utf-8")
    assert config_error(str(path)) == "config key train.lr must be a finite number, got inf"


def test_a_missing_yaml_file_is_a_user_error(tmp_path):
    assert "does not exist" in config_error(str(tmp_path / "nope.yaml"))


def test_a_folder_or_non_utf8_bytes_as_yaml_file_is_a_user_error(tmp_path):
    assert config_error(str(tmp_path)) == f"config file {tmp_path} is a folder; name a file"
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe bad")
    assert "binary.yaml is not UTF-8 text" in config_error(str(tmp_path / "binary.yaml"))


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=11", "model.image_tokens=cls", "data.csv=my data.csv", "train.lr=0.002",
                             "log.progress=false"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).to_dict() == cfg.to_dict()


def test_the_run_folder_holds_the_resolved_config_and_it_reloads(tiny_run):
    saved = tiny_run.run_dir / "config.yaml"
    reloaded = load_config(str(saved))
    expected = load_config(None, tiny_run.overrides)
    assert reloaded.to_dict() == expected.to_dict()
    assert reloaded.train.max_steps == 6 and reloaded.model.n_embd == 32
    assert "max_steps: 6" in saved.read_text(encoding="utf-8")


# --- the same mistakes on the command line ------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["train.max_step=5"], "error: unknown config key 'train.max_step'; did you mean train.max_steps?"),
    (["train.max_steps=lots"], "error: config key train.max_steps expects an integer, got 'lots'"),
    (["model.n_embd=30", "model.n_head=4"], "error: model.n_embd (30) must be divisible by model.n_head (4)"),
    (["train.lr=nan"], "error: config key train.lr must be a finite number, got nan"),
])
def test_cli_config_mistakes_are_one_line_with_exit_2(cli, tmp_path, args, says):
    result = cli("train", *args, "run.output_dir=runs/x", cwd=tmp_path)
    assert cli.user_error(result).startswith(says)
    assert not (tmp_path / "runs").exists(), "nothing is written before the config is known to be good"


def test_cli_invalid_yaml_is_one_line_with_exit_2(cli, tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  max_steps: [1, 2\nmodel: {\n", encoding="utf-8")
    result = cli("train", "--config", "run.yaml", cwd=tmp_path)
    cli.user_error(result, "run.yaml is not valid YAML at line")


def test_cli_non_utf8_yaml_is_one_line_with_exit_2(cli, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe bad")
    for command in ("train", "plan"):
        cli.user_error(cli(command, "--config", "binary.yaml", cwd=tmp_path), "binary.yaml is not UTF-8 text")


def test_cli_overrides_may_follow_options(cli, tmp_path):
    """`train --config FILE key=value --deepspeed_config ... key=value`: every override applies."""
    (tmp_path / "mine.yaml").write_text("train:\n  max_steps: 3\n", encoding="utf-8")
    # argparse alone stops collecting overrides at an option; the one after --config must still count.
    result = cli("train", "train.seed=5", "--config", "mine.yaml", "train.max_step=2", cwd=tmp_path)
    cli.user_error(result, "unknown config key 'train.max_step'", "did you mean train.max_steps?")
    result = cli("eval", "--checkpoint", "nowhere", "--bogus", cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
