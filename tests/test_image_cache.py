"""The image cache: decoded once per node into a uint8 file every rank maps; never stale, never half-written."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from seemore_ds.__main__ import main
from seemore_ds.config import load_config
from seemore_ds.data import image_cache
from seemore_ds.data.csv_reader import encode_png_base64
from seemore_ds.data.dataset import load_caption_data
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.errors import UserError
from tests.conftest import REPO, TINY, read_csv_rows
from tests.test_deepspeed import TINY as DS_TINY
from tests.test_deepspeed import launch

BAD_ROWS = [["not base64 !!", "a caption"], ["", "an empty image cell"], [None, ""], [None, "x" * 60]]


def write_tiny_csv(path: Path, n: int = 20, seed: int = 0, first_caption: str | None = None) -> Path:
    """n captioned 32 px images with four bad rows among them (rows 3, 8, 13, 18)."""
    images, captions = synthetic_dataset(n, seed=seed, size_px=32)
    if first_caption:
        captions[0] = first_caption
    rows = [[encode_png_base64(img), caption] for img, caption in zip(images, captions)]
    for i, (image, caption) in enumerate(BAD_ROWS):
        rows.insert(2 + 5 * i, [encode_png_base64(images[0]) if image is None else image, caption])
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["b64string_images", "caption"])
        writer.writerows(rows)
    return path


def config(*overrides: str):
    return load_config(None, ["model.img_size=16", "model.patch_size=8", "data.synth_n=12", *overrides])


def as_plain(data) -> tuple:
    return data.images.clone(), data.captions, [(b.row, b.reason) for b in data.bad_rows]


def assert_same_data(ours, theirs) -> None:
    (images, captions, bad), (their_images, their_captions, their_bad) = as_plain(ours), as_plain(theirs)
    assert images.dtype == their_images.dtype == torch.uint8 and torch.equal(images, their_images)
    assert captions == their_captions and bad == their_bad


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_tiny_csv(tmp_path / "tiny.csv")


@pytest.mark.parametrize("source", ["csv", "built-in"])
def test_a_cache_hit_gives_what_decoding_gives(tmp_path, tiny_csv, source):
    cfg = config(f"data.csv={tiny_csv}" if source == "csv" else "data.csv=")
    decoded = load_caption_data(cfg)
    built = load_caption_data(cfg, cache_dir=tmp_path / "cache")
    mapped = load_caption_data(cfg, cache_dir=tmp_path / "cache")
    assert (decoded.decoded, built.decoded, mapped.decoded) == (True, True, False)
    assert_same_data(built, decoded)
    assert_same_data(mapped, decoded)
    assert mapped.source == decoded.source and mapped.cache_file == built.cache_file
    if source == "csv":
        assert [b.row for b in mapped.bad_rows] == [3, 8, 13, 18]
    assert built.cache_file.stat().st_size == decoded.images.nbytes
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".u8"]


@pytest.mark.parametrize("change, refusal", [
    ("model.img_size=32", None), ("model.max_caption_len=38", None),
    ("data.max_image_pixels=1000", "has no usable rows"),  # every image is 32x32
    ("data.on_bad_row=error", "row 3: not valid base64"),
])
def test_a_changed_setting_never_reuses_the_entry(tmp_path, tiny_csv, change, refusal):
    before = config(f"data.csv={tiny_csv}")
    after = config(f"data.csv={tiny_csv}", change)
    assert image_cache.cache_key(before, str(tiny_csv)) != image_cache.cache_key(after, str(tiny_csv))
    load_caption_data(before, cache_dir=tmp_path / "cache")
    if refusal:  # the setting's own verdict, not the cached rows
        with pytest.raises(UserError, match=refusal):
            load_caption_data(after, cache_dir=tmp_path / "cache")
        return
    reloaded = load_caption_data(after, cache_dir=tmp_path / "cache")
    assert reloaded.decoded
    assert_same_data(reloaded, load_caption_data(after))


def test_a_changed_csv_or_built_in_dataset_never_reuses_the_entry(tmp_path, tiny_csv):
    cfg = config(f"data.csv={tiny_csv}")
    load_caption_data(cfg, cache_dir=tmp_path / "cache")
    write_tiny_csv(tiny_csv, first_caption="an edited caption")  # same path, new bytes
    edited = load_caption_data(cfg, cache_dir=tmp_path / "cache")
    assert edited.decoded and edited.captions[0] == "an edited caption"
    assert_same_data(edited, load_caption_data(cfg))

    built_in = config()
    for change in ("data.synth_n=13", "train.seed=1", "model.max_caption_len=38", "data.on_bad_row=error"):
        assert image_cache.cache_key(built_in, "") != image_cache.cache_key(config(change), "")


@pytest.mark.parametrize("damage", ["truncated image file", "garbage metadata", "no metadata (killed between the files)"])
def test_a_damaged_or_half_written_entry_is_decoded_again(tmp_path, tiny_csv, damage):
    cfg = config(f"data.csv={tiny_csv}")
    image_file = load_caption_data(cfg, cache_dir=tmp_path / "cache").cache_file
    metadata = image_file.with_suffix(".json")
    if damage == "truncated image file":
        with open(image_file, "r+b") as handle:
            handle.truncate(image_file.stat().st_size // 2)
    elif damage == "garbage metadata":
        metadata.write_text('{"format": 1, "shape": [')
    else:
        metadata.unlink()
    again = load_caption_data(cfg, cache_dir=tmp_path / "cache")
    assert again.decoded
    assert_same_data(again, load_caption_data(cfg))
    assert not load_caption_data(cfg, cache_dir=tmp_path / "cache").decoded  # and whole again


def test_a_build_killed_while_writing_leaves_nothing_trusted(tmp_path, tiny_csv, monkeypatch):
    cfg = config(f"data.csv={tiny_csv}")
    write = image_cache.write_atomically

    def killed_after_the_image_file(path, data):
        if path.suffix == ".json":  # the image file is in place: killed, as a signal would, between the two files
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(image_cache, "write_atomically", killed_after_the_image_file)
    with pytest.raises(KeyboardInterrupt):
        load_caption_data(cfg, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert not list((tmp_path / "cache").glob("*.json")) and not list((tmp_path / "cache").glob(".*.tmp"))
    assert load_caption_data(cfg, cache_dir=tmp_path / "cache").decoded


LOADER = """
import fcntl, hashlib, json, sys, time
from pathlib import Path
from seemore_ds.config import load_config
from seemore_ds.data import dataset

csv_path, cache_dir, locks = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "locks"
if not locks:  # a filesystem without locks
    def no_locks(*args):
        raise OSError(37, "No locks available")
    fcntl.flock = no_locks
decode = dataset.decode_caption_data

def slow_decode(*args):  # keeps the first process inside the build while the second arrives
    time.sleep(1.5)
    return decode(*args)

dataset.decode_caption_data = slow_decode
cfg = load_config(None, ["model.img_size=16", "model.patch_size=8", f"data.csv={csv_path}"])
data = dataset.load_caption_data(cfg, cache_dir=cache_dir)
print(json.dumps({"decoded": data.decoded, "images_sha256": hashlib.sha256(data.images.numpy().tobytes()).hexdigest(),
                  "captions": data.captions, "bad_rows": [[b.row, b.reason] for b in data.bad_rows]}))
"""


@pytest.mark.parametrize("locks", ["locks", "no locks"])
def test_two_processes_loading_at_once_get_the_same_data(tmp_path, tiny_csv, locks):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", LOADER, str(tiny_csv), str(tmp_path / "cache"), locks]
    processes = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    expected = load_caption_data(config(f"data.csv={tiny_csv}"))
    for result in results:
        assert result["images_sha256"] == hashlib.sha256(expected.images.numpy().tobytes()).hexdigest()
        assert result["captions"] == expected.captions
        assert result["bad_rows"] == [[b.row, b.reason] for b in expected.bad_rows]
    decoders = sum(r["decoded"] for r in results)
    assert decoders == 1 if locks == "locks" else decoders in (1, 2)  # without locks: harmlessly twice
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1 and not list((tmp_path / "cache").glob(".*.tmp"))


def test_a_run_has_the_same_losses_and_bad_row_report_with_the_cache_on_or_off(tmp_path, tiny_csv, capsys,
                                                                                one_torch_thread):
    common = [*TINY, f"data.csv={tiny_csv}", "train.max_steps=3", "log.every=1", "eval.every=3", "checkpoint.every=0"]
    outputs = {}
    for name, cache in (("off", "data.cache=false"), ("built", "data.cache=true"), ("mapped", "data.cache=true")):
        assert main(["train", *common, cache, f"data.cache_dir={tmp_path / 'cache'}",
                     f"run.output_dir={tmp_path / name}"]) == 0
        outputs[name] = capsys.readouterr().out
    assert "image cache" not in outputs["off"]
    assert f"data: image cache {tmp_path / 'cache'}" in outputs["built"]
    assert "decoded by 1 of 1 process(es); every rank maps it" in outputs["built"]
    assert "decoded earlier; every rank maps it" in outputs["mapped"]
    for name, out in outputs.items():
        assert out.count("data: 4 rows skipped") == 1, name
    columns = ("step", "train_loss", "val_loss", "grad_norm", "lr", "val_exact_match")
    off = [{k: r[k] for k in columns} for r in read_csv_rows(tmp_path / "off" / "losses_log.csv")]
    for name in ("built", "mapped"):
        assert [{k: r[k] for k in columns} for r in read_csv_rows(tmp_path / name / "losses_log.csv")] == off, name
        assert (tmp_path / name / "bad_rows.csv").read_bytes() == (tmp_path / "off" / "bad_rows.csv").read_bytes()


def test_the_default_cache_lives_in_the_run_folder(cli, tiny, tmp_path):
    cli.ok(cli("train", *tiny, "train.max_steps=1", "run.output_dir=run", cwd=tmp_path))
    assert len(list((tmp_path / "run" / "cache").glob("*.u8"))) == 1


def test_an_unwritable_cache_folder_is_one_line(cli, tiny, tmp_path):
    (tmp_path / "a_file").write_text("")
    cli.user_error(cli("train", *tiny, "train.max_steps=1", "data.cache_dir=a_file", cwd=tmp_path),
                   "cannot write the image cache in a_file", "data.cache=false")


def test_two_deepspeed_ranks_decode_once_and_map_the_file():
    """A real 2-rank launch: one process decodes, the other maps; a second run maps what the first wrote."""
    tmp = Path(tempfile.mkdtemp(prefix="seemore-ds-test-"))  # not under pytest's basetemp, as in test_deepspeed
    try:
        two_ranks_decode_once(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def two_ranks_decode_once(tmp: Path) -> None:
    common = ["train", *DS_TINY, f"data.csv={write_tiny_csv(tmp / 'tiny.csv')}", "train.max_steps=2", "checkpoint.every=0",
              f"data.cache_dir={tmp / 'cache'}", "--deepspeed_config", "ds_configs/zero1.json"]
    result = launch([[*common, f"run.output_dir={tmp / 'first'}"], [*common, f"run.output_dir={tmp / 'second'}"]],
                    tmp, "image_cache")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("decoded by 1 of 2 process(es); every rank maps it") == 1, result.stdout[-3000:]
    assert result.stdout.count("decoded earlier; every rank maps it") == 1
    assert result.stdout.count("data: 4 rows skipped") == 2  # once per run, by rank 0
    assert len(list((tmp / "cache").glob("*.u8"))) == 1 and not list((tmp / "cache").glob(".*.tmp"))
    first, second = read_csv_rows(tmp / "first" / "losses_log.csv"), read_csv_rows(tmp / "second" / "losses_log.csv")
    assert [r["train_loss"] for r in first] == [r["train_loss"] for r in second]
