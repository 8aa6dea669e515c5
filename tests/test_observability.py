"""What a run shows about itself: throughput and MFU, memory, the timing breakdown, the FLOPs profile,
the torch.profiler trace, the run summary, the plots (one run or several) and W&B in offline mode."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from bench.throughput import SEEMORE_SIZES
from seemore_ds.backends.ds_config import resolve_ds_config
from seemore_ds.config import load_config
from seemore_ds.errors import UserError
from seemore_ds.metrics.plots import PLOT_FILES
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import CharTokenizer
from tests.conftest import read_csv_rows

SMALL = ["model.img_size=32", "model.patch_size=16", "model.image_embed_dim=32", "model.num_blks=1", "model.n_embd=32",
         "model.n_layer=1", "model.n_head=2", "data.synth_n=64", "train.batch_size=8", "train.backend=torch",
         "train.device=cpu", "log.progress=false", "train.precision=fp32"]


def model_flops_per_sample(run_dir: Path) -> int:
    cfg = load_config(str(run_dir / "config.yaml"))
    return SeemoreVLM(cfg.model, CharTokenizer.load(run_dir / "tokenizer.json").vocab_size).flops_per_sample()


@pytest.fixture(scope="module")
def default_size_run(cli, tmp_path_factory):
    """seemore's default model sizes (captions up to 48 characters, as the built-in data needs), 3 steps on
    the engine-free backend, every observability option on."""
    work = tmp_path_factory.mktemp("observe")
    sizes = [f"model.{key}={value}" for key, value in {**SEEMORE_SIZES, "max_caption_len": 48}.items()]
    overrides = [*sizes, "data.synth_n=64", "train.batch_size=8", "train.max_steps=3", "log.every=1", "eval.every=2",
                 "train.backend=torch", "train.device=cpu", "log.progress=false", "profile.flops_step=2",
                 "profile.torch_trace=2:3", "run.output_dir=run"]
    result = cli.ok(cli("train", *overrides, cwd=work))
    return work / "run", result


def test_mfu_on_cpu_at_default_sizes_is_samples_per_s_times_flops_over_peak(default_size_run):
    run_dir, result = default_size_run
    summary = json.loads((run_dir / "summary.json").read_text())
    flops = model_flops_per_sample(run_dir)
    assert summary["flops_per_sample"] == flops > 0
    peak = summary["peak_tflops_per_device"]
    assert peak > 0 and "measured fp32 matmul" in result.stdout
    rows = read_csv_rows(run_dir / "losses_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    text_len = load_config(str(run_dir / "config.yaml")).model.max_caption_len + 1
    for row in rows:
        samples_per_s, mfu = float(row["samples_per_s"]), float(row["mfu"])
        assert 0 < mfu < 1
        assert mfu == pytest.approx(samples_per_s * flops / (peak * 1e12), rel=1e-4)
        assert float(row["achieved_tflops"]) == pytest.approx(samples_per_s * flops / 1e12, rel=1e-4)
        image_tokens = (SEEMORE_SIZES["img_size"] // SEEMORE_SIZES["patch_size"]) ** 2 + 1  # patches + CLS
        assert float(row["tokens_per_s"]) == pytest.approx(samples_per_s * (image_tokens + text_len), rel=1e-4)


def test_flops_profile_trace_timings_and_memory_of_the_engine_free_path(default_size_run):
    run_dir, result = default_size_run
    headline = (run_dir / "flops_profile.txt").read_text()
    assert "flops (the model's own count)" in headline and "flops (the model's own count)" in result.stdout
    forward_gflops = float(next(line for line in headline.splitlines() if line.startswith("forward_gflops:")).split()[1])
    assert forward_gflops * 1e9 * 3 == pytest.approx(model_flops_per_sample(run_dir) * 8)
    trace = json.loads((run_dir / "torch_trace.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    for row in read_csv_rows(run_dir / "timing_logs.csv"):
        assert float(row["backward_allreduce_s"]) == 0  # one process: nothing to reduce
        parts = sum(float(row[k]) for k in ("data_s", "forward_s", "backward_s", "optimizer_s"))
        assert 0 < parts <= float(row["step_s"])
    memory = read_csv_rows(run_dir / "memory_log.csv")
    assert [int(r["step"]) for r in memory] == [1, 2, 3]
    assert all(float(r["rss_mib"]) > 50 and r["max_allocated_mib"] == "" for r in memory)  # CPU: RSS, no CUDA


def test_summary_json_and_console_table(default_size_run):
    run_dir, result = default_size_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 24 and summary["skipped_steps"] == 0
    assert summary["checkpoint"] == "run/checkpoints/step_000003" and (run_dir.parent / summary["checkpoint"]).is_dir()
    last = read_csv_rows(run_dir / "losses_log.csv")[-1]
    assert summary["final_val_loss"] == pytest.approx(float(last["val_loss"]), rel=1e-5)
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    assert summary["peak_rss_mib"] > 50 and summary["mean_samples_per_s"] > 0 and 0 < summary["mean_mfu"] < 1
    assert "summary (run/summary.json):" in result.stdout
    assert "  mean_mfu  " in result.stdout


def test_plots_of_one_run_and_of_several_overlaid(default_size_run, tiny_run, cli, tmp_path):
    run_dir, _ = default_size_run
    assert all((run_dir / name).stat().st_size > 10_000 for name in PLOT_FILES)
    result = cli.ok(cli("plot", run_dir, tiny_run.run_dir, "--out", "compare", cwd=tmp_path))
    assert sorted(Path(line).name for line in result.stdout.split()) == sorted(PLOT_FILES)
    assert all((tmp_path / "compare" / name).is_file() for name in PLOT_FILES)
    cli.user_error(cli("plot", run_dir, tiny_run.run_dir, cwd=tmp_path), "needs a folder for the PNGs: add --out DIR")


@pytest.mark.parametrize("override, message", [
    ("profile.torch_trace=5", "profile.torch_trace must be START:END"),
    ("profile.torch_trace=4:2", "profile.torch_trace must be START:END"),
    ("profile.flops_step=-1", "profile.flops_step must be zero or more"),
    ("wandb.mode=cloud", "wandb.mode must be one of online, offline"),
    ("profile.flops_step=2000", r"profile.flops_step starts at step 2000, after the last step \(train.max_steps=1000\)"),
    ("profile.torch_trace=1001:1002", "profile.torch_trace starts at step 1001, after the last step"),
])
def test_bad_profile_and_wandb_values_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_deepspeed_config_gets_timers_and_profiler():
    cfg = load_config(None, ["profile.flops_step=3", "run.output_dir=runs/x"])
    tree, _ = resolve_ds_config({"zero_optimization": {"stage": 2}}, cfg, world_size=2)
    assert tree["wall_clock_breakdown"] is True
    assert tree["flops_profiler"] == {"enabled": True, "profile_step": 2, "output_file": "runs/x/flops_profile.txt",
                                      "detailed": True}
    assert resolve_ds_config({"wall_clock_breakdown": False}, cfg, world_size=1)[0]["wall_clock_breakdown"] is False


def wandb_records(run_file: Path):
    """The protobuf records of an offline run's ``.wandb`` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""


def offline_run(run_dir: Path, index: int) -> tuple[str, list[str], dict, dict[int, dict]]:
    """(run id, tags, config, {step: logged metrics}) of the index-th offline W&B run in a run folder."""
    run_file = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))[index]
    run_id, tags, config, history = None, [], {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, tags = record.run.run_id, list(record.run.tags)
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["step"], {}).update(row)
    return run_id, tags, config, history


def test_wandb_offline_without_api_key_logs_every_metric_and_resumes_the_same_run(cli, tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    wandb = ["wandb.enabled=true", "wandb.tags=cpu,tiny", "log.every=1", "eval.every=2", "run.output_dir=run"]
    first = cli.ok(cli("train", *SMALL, *wandb, "train.max_steps=2", cwd=tmp_path))
    (line,) = [x for x in first.stdout.splitlines() if x.startswith("wandb:")]
    assert "no API key" in line and "logging offline" in line
    run_dir = tmp_path / "run"
    run_id, tags, config, history = offline_run(run_dir, 0)
    assert tags == ["cpu", "tiny"] and config["train"]["max_steps"] == 2 and config["model"]["n_embd"] == 32
    losses = {int(r["step"]): r for r in read_csv_rows(run_dir / "losses_log.csv")}
    timings = {int(r["step"]): r for r in read_csv_rows(run_dir / "timing_logs.csv")}
    for step in (1, 2):
        for column in ("train_loss", "lr", "grad_norm", "samples_per_s", "mfu", "tokens_per_s"):
            assert history[step][column] == pytest.approx(float(losses[step][column]), rel=1e-4), (step, column)
        for column in ("forward_s", "backward_s", "backward_allreduce_s", "optimizer_s", "data_s"):
            assert history[step][column] == pytest.approx(float(timings[step][column]), rel=1e-4, abs=1e-9)
        assert history[step]["rss_mib"] > 0
    assert history[2]["val_loss"] == pytest.approx(float(losses[2]["val_loss"]), rel=1e-4)
    assert history[2]["captions/_type"] == "table-file" and history[2]["captions/nrows"] == 6  # the 6 held-out images
    grid = history[2]["captions_grid/path"]  # captions.png beside the table, as W&B stored it
    assert history[2]["captions_grid/_type"] == "image-file" and grid.endswith(".png")
    stored = next(run_dir.glob(f"wandb/offline-run-*/files/{grid}"))
    assert Image.open(stored).size == Image.open(run_dir / "captions.png").size
    cli.ok(cli("train", *SMALL, *wandb, "train.max_steps=4", "train.resume=auto", cwd=tmp_path))
    resumed_id, _, _, resumed_history = offline_run(run_dir, 1)
    assert resumed_id == run_id and sorted(resumed_history) == [3, 4]
