"""What a run shows about itself: throughput and MFU, memory, the timing breakdown, the FLOPs profile,
the torch.profiler trace, the run summary, the plots (one run or several) and W&B in offline mode."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bench.throughput import SEEMORE_SIZES
from seemore_ds.backends.ds_config import resolve_ds_config
from seemore_ds.config import load_config
from seemore_ds.errors import UserError
from seemore_ds.metrics.plots import PLOT_FILES, plot_runs
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import CharTokenizer
from tests.conftest import read_csv_rows, trained_text_len

SMALL = ["model.img_size=32", "model.patch_size=16", "model.image_embed_dim=32", "model.num_blks=1", "model.n_embd=32",
         "model.n_layer=1", "model.n_head=2", "data.synth_n=64", "train.batch_size=8", "train.backend=torch",
         "train.device=cpu", "log.progress=false", "train.precision=fp32"]


def model_flops_per_sample(run_dir: Path) -> int:
    cfg = load_config(str(run_dir / "config.yaml"))
    model = SeemoreVLM(cfg.model, CharTokenizer.load(run_dir / "tokenizer.json").vocab_size)
    return model.flops_per_sample(trained_text_len(run_dir))


@dataclass
class ObservedRun:
    run_dir: Path
    result: subprocess.CompletedProcess
    wall_s: float  # the whole process as the test timed it: start-up, data, evaluation and plots included


@pytest.fixture(scope="module")
def default_size_run(cli, tmp_path_factory) -> ObservedRun:
    """seemore's default model sizes (captions up to 48 characters, as the built-in data needs), 3 steps on
    the engine-free backend, every observability option on."""
    work = tmp_path_factory.mktemp("observe")
    sizes = [f"model.{key}={value}" for key, value in {**SEEMORE_SIZES, "max_caption_len": 48}.items()]
    overrides = [*sizes, "data.synth_n=64", "train.batch_size=8", "train.max_steps=3", "log.every=1", "eval.every=2",
                 "train.backend=torch", "train.device=cpu", "train.precision=fp32", "log.progress=false",
                 "profile.flops_step=2", "profile.torch_trace=2:3", "run.output_dir=run"]
    started = time.perf_counter()
    result = cli.ok(cli("train", *overrides, cwd=work))
    return ObservedRun(work / "run", result, time.perf_counter() - started)


def counted_flops_per_sample(run_dir: Path, backward: bool, batch: int = 8) -> float:
    """FLOPs of one sample as torch's FlopCounterMode counts them on the run's model (its matmuls,
    convolutions and attention, dispatched op by op): independent of the model's own formula."""
    cfg = load_config(str(run_dir / "config.yaml"))
    vocab = CharTokenizer.load(run_dir / "tokenizer.json").vocab_size
    model = SeemoreVLM(cfg.model, vocab)
    images = torch.rand(batch, 3, cfg.model.img_size, cfg.model.img_size)
    tokens = torch.randint(0, vocab, (batch, trained_text_len(run_dir)))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(images, tokens, tokens)
        if backward:
            loss.backward()
    return counter.get_total_flops() / batch


def test_samples_per_s_is_the_samples_over_the_logged_step_time_within_the_wall_time(default_size_run):
    """samples/s (and so tokens/s and MFU, derived from it below) against time measured apart from it: the
    timing CSV's step_s, whose sum cannot exceed the wall time the test measured around the process."""
    run = default_size_run
    rows, timings = read_csv_rows(run.run_dir / "losses_log.csv"), read_csv_rows(run.run_dir / "timing_logs.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in timings] == ["1", "2", "3"]
    samples_per_step = 8  # train.batch_size x train.grad_accum x 1 rank
    for row, timing in zip(rows, timings):  # log.every=1: each row's interval is its own step
        assert float(row["samples_per_s"]) == pytest.approx(samples_per_step / float(timing["step_s"]), rel=1e-4)
    logged_s = sum(float(t["step_s"]) for t in timings)
    assert 0 < logged_s < run.wall_s
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["samples"] == 3 * samples_per_step
    # The mean of the rows' rates: at least the rate over the summed time (the arithmetic mean of rates is at
    # least their harmonic mean), at most the fastest row's.
    rates = [float(r["samples_per_s"]) for r in rows]
    assert 3 * samples_per_step / logged_s * (1 - 1e-4) <= summary["mean_samples_per_s"] <= max(rates) * (1 + 1e-4)


def test_mfu_on_cpu_at_default_sizes_is_samples_per_s_times_flops_over_peak(default_size_run):
    run_dir, result = default_size_run.run_dir, default_size_run.result
    summary = json.loads((run_dir / "summary.json").read_text())
    flops = model_flops_per_sample(run_dir)
    assert summary["flops_per_sample"] == flops > 0
    # The model's formula against torch's own count of the ops a training step dispatches (forward and
    # backward; the backward skips the image's gradient, so it counts a little less than 2 x forward).
    assert flops == pytest.approx(counted_flops_per_sample(run_dir, backward=True), rel=0.02)
    peak = summary["peak_tflops_per_device"]
    assert peak > 0 and "measured fp32 matmul" in result.stdout
    rows = read_csv_rows(run_dir / "losses_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    text_len = trained_text_len(run_dir)
    assert text_len < load_config(str(run_dir / "config.yaml")).model.max_caption_len + 1  # no padding beyond it
    for row in rows:
        samples_per_s, mfu = float(row["samples_per_s"]), float(row["mfu"])
        assert 0 < mfu < 1
        assert mfu == pytest.approx(samples_per_s * flops / (peak * 1e12), rel=1e-4)
        assert float(row["achieved_tflops"]) == pytest.approx(samples_per_s * flops / 1e12, rel=1e-4)
        image_tokens = (SEEMORE_SIZES["img_size"] // SEEMORE_SIZES["patch_size"]) ** 2 + 1  # patches + CLS
        assert float(row["tokens_per_s"]) == pytest.approx(samples_per_s * (image_tokens + text_len), rel=1e-4)


def test_flops_profile_trace_timings_and_memory_of_the_engine_free_path(default_size_run):
    run_dir, result = default_size_run.run_dir, default_size_run.result
    headline = (run_dir / "flops_profile.txt").read_text()
    assert "flops (the model's own count)" in headline and "flops (the model's own count)" in result.stdout
    forward_gflops = float(next(line for line in headline.splitlines() if line.startswith("forward_gflops:")).split()[1])
    # One micro-batch of 8, against torch's count of the forward's ops.
    assert forward_gflops * 1e9 == pytest.approx(8 * counted_flops_per_sample(run_dir, backward=False), rel=0.02)
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
    run_dir, result = default_size_run.run_dir, default_size_run.result
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 24 and summary["skipped_steps"] == 0
    assert summary["checkpoint"] == "run/checkpoints/step_000003" and (run_dir.parent / summary["checkpoint"]).is_dir()
    last = read_csv_rows(run_dir / "losses_log.csv")[-1]
    assert summary["final_val_loss"] == pytest.approx(float(last["val_loss"]), rel=1e-5)
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    assert summary["peak_rss_mib"] > 50 and summary["mean_samples_per_s"] > 0 and 0 < summary["mean_mfu"] < 1
    assert "summary (run/summary.json):" in result.stdout
    assert "  mean_mfu  " in result.stdout


def drawn_figures(monkeypatch) -> dict[str, Figure]:
    """Every Figure saved from now on, by file name: what the plots draw, not only that a PNG was written."""
    figures, save = {}, Figure.savefig

    def recorded(figure, path, *args, **kwargs):
        figures[Path(path).name] = figure
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recorded)
    return figures


def lines_by_label(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def legend_labels(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_plots_of_one_run_and_of_several_overlaid(default_size_run, tiny_run, cli, tmp_path, monkeypatch):
    """The overlay draws each run's CSV columns as its own lines, named after its folder in the legend."""
    run_dir = default_size_run.run_dir
    assert all((run_dir / name).stat().st_size > 10_000 for name in PLOT_FILES)
    result = cli.ok(cli("plot", run_dir, tiny_run.run_dir, "--out", "compare", cwd=tmp_path))
    assert sorted(Path(line).name for line in result.stdout.split()) == sorted(PLOT_FILES)
    assert all((tmp_path / "compare" / name).is_file() for name in PLOT_FILES)
    cli.user_error(cli("plot", run_dir, tiny_run.run_dir, cwd=tmp_path), "needs a folder for the PNGs: add --out DIR")

    figures = drawn_figures(monkeypatch)
    plot_runs([run_dir, tiny_run.run_dir], tmp_path / "in_process")
    assert sorted(figures) == sorted(PLOT_FILES)
    runs = {"run": run_dir, "tiny": tiny_run.run_dir}  # the legend's names: the folders' names
    losses = {name: read_csv_rows(folder / "losses_log.csv") for name, folder in runs.items()}
    timings = {name: read_csv_rows(folder / "timing_logs.csv") for name, folder in runs.items()}
    memory = {name: read_csv_rows(folder / "memory_log.csv") for name, folder in runs.items()}

    def csv_column(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
        rows = [r for r in rows if r[key] != ""]
        return [float(r["step"]) for r in rows], [float(r[key]) * scale for r in rows]

    def assert_drawn(drawn: tuple[list[float], list[float]], expected: tuple[list[float], list[float]]) -> None:
        assert drawn[0] == expected[0]
        assert drawn[1] == pytest.approx(expected[1], rel=1e-12)

    (loss_ax,) = figures["loss_curve.png"].axes
    assert legend_labels(loss_ax) == ["run train", "run val", "tiny train", "tiny val"]
    drawn = lines_by_label(loss_ax)
    for name, rows in losses.items():
        assert_drawn(drawn[f"{name} train"], csv_column(rows, "train_loss"))
        assert_drawn(drawn[f"{name} val"], csv_column(rows, "val_loss"))
    (lr_ax,) = figures["lr_curve.png"].axes
    assert legend_labels(lr_ax) == ["run", "tiny"]
    for name, rows in losses.items():
        assert_drawn(lines_by_label(lr_ax)[name], csv_column(rows, "lr"))
    speed_ax, mfu_ax = figures["throughput_curve.png"].axes
    assert legend_labels(speed_ax) == ["run", "tiny"]
    for name, rows in losses.items():
        assert_drawn(lines_by_label(speed_ax)[name], csv_column(rows, "samples_per_s"))
        assert_drawn(lines_by_label(mfu_ax)[name], csv_column(rows, "mfu", scale=100))
    panels = figures["timing_curve.png"].axes  # one panel per run, titled with its name
    assert [ax.get_title() for ax in panels] == ["run", "tiny"]
    for ax, (name, rows) in zip(panels, timings.items()):
        assert_drawn(lines_by_label(ax)["whole step"], csv_column(rows, "step_s", scale=1000))
    (memory_ax,) = figures["memory_curve.png"].axes
    for name, rows in memory.items():
        assert_drawn(lines_by_label(memory_ax)[f"{name} process RSS"], csv_column(rows, "rss_mib"))


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
        load_config(None, ["train.max_steps=1000", override])


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
