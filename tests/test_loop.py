"""The loop's components as a user meets them: the summary and plots of a run stopped by a signal, a
summary that spans a resume, and a loaded config that training leaves as it was."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

from seemore_ds.config import load_config
from seemore_ds.data.csv_reader import write_caption_csv
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.metrics.plots import PLOT_FILES
from seemore_ds.trainer import train, with_absolute_data
from tests.conftest import TINY, read_csv_rows
from tests.test_reliability import logged_steps, start, wait_for


def numbers(rows: list[dict], column: str) -> list[float]:
    return [float(row[column]) for row in rows if row[column] not in ("", "nan")]


def test_a_run_stopped_by_sigterm_leaves_its_summary_and_plots_beside_the_checkpoint(tiny, tmp_path):
    job = start(["train", *tiny, "train.max_steps=5000", "log.every=1", "eval.every=0", "checkpoint.every=0",
                 "run.output_dir=stopped"], tmp_path)
    wait_for(lambda: logged_steps(tmp_path / "stopped") >= 3, job)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, (out, err)
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    run = tmp_path / "stopped"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == stopped_at < 5000
    assert summary["checkpoint"] == str(Path("stopped", "checkpoints", f"step_{stopped_at:06d}"))
    assert (tmp_path / summary["checkpoint"]).is_dir()
    rows = read_csv_rows(run / "losses_log.csv")
    assert math.isclose(summary["final_train_loss"], float(rows[-1]["train_loss"]), rel_tol=1e-5)  # its last row's
    assert math.isclose(summary["mean_samples_per_s"], sum(numbers(rows, "samples_per_s")) / len(numbers(rows, "samples_per_s")),
                        rel_tol=1e-5)
    for name in PLOT_FILES:
        assert (run / name).stat().st_size > 0, name
    assert "summary (" in out and "done:" not in out  # the table is printed; a stopped run is not done


def test_the_summary_of_a_resumed_run_counts_the_rows_of_its_first_process(tmp_path, one_torch_thread):
    def run(max_steps: int, resume: str):
        cfg = load_config(None, TINY + [f"train.max_steps={max_steps}", "log.every=1", "eval.every=0",
                                        "checkpoint.every=0", f"train.resume={resume}", f"run.output_dir={tmp_path / 'run'}"])
        return train(cfg)

    run(4, "none")
    first = read_csv_rows(tmp_path / "run" / "losses_log.csv")
    run(7, "auto")
    rows = read_csv_rows(tmp_path / "run" / "losses_log.csv")
    assert rows[:4] == first and [int(r["step"]) for r in rows] == list(range(1, 8))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rates, mfus = numbers(rows, "samples_per_s"), numbers(rows, "mfu")
    assert len(rates) == 7
    assert math.isclose(summary["mean_samples_per_s"], sum(rates) / 7, rel_tol=1e-5)
    assert math.isclose(summary["mean_mfu"], sum(mfus) / len(mfus), rel_tol=1e-5)
    memory = read_csv_rows(tmp_path / "run" / "memory_log.csv")
    assert math.isclose(summary["peak_rss_mib"], max(numbers(memory, "max_rss_mib")), rel_tol=1e-5)
    assert summary["steps"] == 7 and summary["samples"] == 7 * 8


def test_training_leaves_the_loaded_config_as_it_was_and_saves_data_paths_that_work_from_anywhere(
        tmp_path, monkeypatch, one_torch_thread):
    work = tmp_path / "work"
    work.mkdir()
    images, captions = synthetic_dataset(24, seed=0, size_px=16)
    write_caption_csv(work / "samples.csv", images, captions)
    monkeypatch.chdir(work)
    cfg = load_config(None, TINY + ["data.csv=samples.csv", "train.max_steps=1", "eval.every=0",
                                    "run.output_dir=run"])
    assert with_absolute_data(cfg).explicit_keys == cfg.explicit_keys  # what the user set, for the JSON's precedence
    train(cfg)
    assert cfg.data.csv == "samples.csv" and cfg.data.val_csv == ""  # as loaded

    monkeypatch.chdir(tmp_path)  # elsewhere: the saved config still finds the data
    saved = load_config(str(work / "run" / "config.yaml"), [f"run.output_dir={tmp_path / 'again'}", "train.max_steps=1"])
    assert saved.data.csv == str(work / "samples.csv")
    assert train(saved).step == 1
