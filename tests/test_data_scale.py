"""Data at scale: parallel decoding into the cache in bounded memory; shards, globs, path columns,
JSONL and Parquet tables; data.val_csv; a killed decode is never trusted; warm starts key on file identity."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from seemore_ds.config import load_config
from seemore_ds.data import image_cache
from seemore_ds.data.augment import ImageShifts
from seemore_ds.data.csv_reader import read_caption_csv, write_bad_rows
from seemore_ds.data.dataset import (BatchPrefetcher, CaptionData, ResumableSampler, TokenizedSplit, load_caption_data,
                                     load_train_val, tokenize_captions)
from seemore_ds.data.decoding import DecodeSettings, decode_tables
from seemore_ds.data.tables import table_files
from seemore_ds.errors import UserError
from seemore_ds.model import IGNORE_INDEX
from seemore_ds.tokenizer import CharTokenizer
from tests.conftest import REPO, TINY

SIZE = 16


def photo(i: int, side: int = 24) -> bytes:
    """A small JPEG with smooth colour and noise, different for every i."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(80, 255, 3)
    pixels = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def rows_with_bad(n: int, seed: int = 0) -> list[tuple[bytes | None, str]]:
    """n rows of (JPEG bytes, caption); every 7th has broken image bytes, every 11th an empty caption."""
    rows = []
    for i in range(n):
        image = b"not an image at all" if i % 7 == 3 else photo(seed * 100_000 + i)
        rows.append((image, "" if i % 11 == 5 else f"photo number {seed}-{i}"))
    return rows


def write_table(path: Path, rows, image_column: str = "b64string_images") -> Path:
    """rows as a CSV, JSONL or Parquet table (by suffix); a path column gets the images as files in
    ``images/`` beside the table (None: a file that is never written)."""
    cells = []
    for i, (image, caption) in enumerate(rows):
        if image_column == "b64string_images":
            cells.append(b64(image))
        else:
            name = f"images/{path.stem}_{i}.jpg"
            if image is not None:
                (path.parent / "images").mkdir(exist_ok=True)
                (path.parent / name).write_bytes(image)
            cells.append(name)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"caption": c, image_column: cell}) + "\n" for cell, (_, c) in zip(cells, rows)))
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({image_column: cells, "caption": [c for _, c in rows]}), path)
    else:
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["", image_column, "caption"])
            writer.writerows([i, cell, c] for i, (cell, (_, c)) in enumerate(zip(cells, rows)))
    return path


def read(spec, **options):
    return read_caption_csv(str(spec), img_size=SIZE, max_caption_len=48, max_pixels=10**6, **options)


def plain_bad(bad) -> list[tuple[int, str]]:
    return [(b.row, b.reason) for b in bad]


def config(*overrides: str):
    return load_config(None, [f"model.img_size={SIZE}", "model.patch_size=8", "log.progress=false", *overrides])


# --- parallel decoding ---------------------------------------------------------------------------

def test_parallel_decoding_gives_the_bytes_captions_and_bad_rows_of_one_worker(tmp_path):
    table = write_table(tmp_path / "d.csv", rows_with_bad(150))
    settings = DecodeSettings(SIZE, 48, 10**6)
    one = decode_tables([table], settings, tmp_path / "one.u8", workers=1)
    many = decode_tables([table], settings, tmp_path / "many.u8", workers=2, chunk_rows=9)  # bad rows in most chunks
    assert (one.workers, many.workers) == (1, 2)
    assert (tmp_path / "many.u8").read_bytes() == (tmp_path / "one.u8").read_bytes()
    assert (tmp_path / "one.u8").stat().st_size == one.n_images * 3 * SIZE * SIZE
    assert many.captions == one.captions and many.bad_rows == one.bad_rows
    expected_bad = [i + 1 for i in range(150) if i % 7 == 3 or i % 11 == 5]
    assert [b.row for b in one.bad_rows] == expected_bad and one.n_images == 150 - len(expected_bad)
    assert one.captions[:2] == ["photo number 0-0", "photo number 0-1"]


def test_with_on_bad_row_error_parallel_decoding_stops_at_the_first_bad_row_in_file_order(tmp_path):
    rows = [(photo(i), f"photo {i}") for i in range(60)]
    rows[41] = (b"broken", "photo 41")
    rows[17] = (photo(17), "")
    table = write_table(tmp_path / "d.csv", rows)
    with pytest.raises(UserError, match=r"d\.csv row 18: empty caption \(set data.on_bad_row=skip"):
        decode_tables([table], DecodeSettings(SIZE, 48, 10**6), tmp_path / "x.u8", "error", workers=2, chunk_rows=5)


def test_peak_anonymous_memory_does_not_grow_with_the_rows_decoded(tmp_path):
    """Measured by the decoder itself after every chunk: RssAnon of this process plus its workers'."""
    n, side = 3000, 64
    images = [b64(photo(i, side=32)) for i in range(20)]
    with open(tmp_path / "big.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["b64string_images", "caption"])
        writer.writerows([images[i % 20], f"photo {i}"] for i in range(n))
    cache_bytes = n * 3 * side * side  # 35 MiB
    result = decode_tables([tmp_path / "big.csv"], DecodeSettings(side, 48, 10**6), tmp_path / "big.u8", workers=2,
                           chunk_rows=50)
    assert result.n_images == n and (tmp_path / "big.u8").stat().st_size == cache_bytes
    samples = result.rss_samples
    assert len(samples) == n // 50 and min(samples) > 0
    settled = samples[len(samples) // 2 :]  # both workers have reported long before half the chunks are done
    growth = max(settled) - settled[0]  # a leak of the pixels would grow by half the cache over these rows
    assert growth < cache_bytes / 4, f"anonymous memory grew {growth / 2**20:.1f} MiB over a {cache_bytes / 2**20:.0f} MiB decode"
    assert result.peak_rss_anon <= 600 * 2**20 + 0.05 * cache_bytes  # the bound


KILLED_BUILD = """
import signal, sys
from pathlib import Path
from seemore_ds.config import load_config
from seemore_ds.data import dataset, decoding, tables

decoding.CHUNK_BYTES = 1  # chunks of 16 rows: several of them written before the stop
read_rows = tables.TableReader.rows

def rows_then_stop(self):
    for i, row in enumerate(read_rows(self)):
        if i == 120:
            print("midway", flush=True)
            signal.pause()  # killed here, with chunks written and more in flight
        yield row

tables.TableReader.rows = rows_then_stop
cfg = load_config(None, ["model.img_size=16", "model.patch_size=8", f"data.csv={sys.argv[1]}", "data.decode_workers=2"])
dataset.load_caption_data(cfg, cache_dir=Path(sys.argv[2]))
"""


def test_a_decode_killed_midway_is_never_trusted(tmp_path):
    table = write_table(tmp_path / "d.csv", rows_with_bad(200))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    semaphores_before = set(Path("/dev/shm").glob("sem.mp-*"))
    build = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(table), str(cache)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert build.stdout.readline().strip() == "midway", build.stderr.read()
        partial = list(cache.glob(".*.u8.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # grown for the chunks handed out before the stop (not a timing matter)
    finally:
        os.killpg(build.pid, signal.SIGKILL)  # the builder and its decode workers, mid-write
        build.wait(timeout=60)
        # The kill took multiprocessing's resource tracker with it, so nothing unlinked the named
        # semaphores the workers shared; remove them, as the tracker would have.
        for leftover in set(Path("/dev/shm").glob("sem.mp-*")) - semaphores_before:
            leftover.unlink(missing_ok=True)
    assert not list(cache.glob("*.json")) and not list(cache.glob("*.u8"))
    cfg = config(f"data.csv={table}")
    again = load_caption_data(cfg, cache_dir=cache)
    assert again.decoded  # decoded anew, not trusted
    expected = load_caption_data(cfg)
    assert np.array_equal(again.images.numpy(), expected.images.numpy()) and again.captions == expected.captions
    assert plain_bad(again.bad_rows) == plain_bad(expected.bad_rows)
    assert not list(cache.glob(".*.tmp"))  # the killed build's temporary file is cleared by the next build


# --- inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("image_column", ["b64string_images", "image", "file_name", "path"])
def test_every_table_format_with_either_image_column_decodes_alike(tmp_path, suffix, image_column):
    rows = rows_with_bad(30)
    reference = read(write_table(tmp_path / "reference.csv", rows))
    images, captions, bad = read(write_table(tmp_path / f"table{suffix}", rows, image_column))
    assert np.array_equal(images, reference[0]) and captions == reference[1]
    assert plain_bad(bad) == plain_bad(reference[2])


def test_parquet_image_bytes_and_hugging_face_image_structs_decode(tmp_path):
    rows = [(photo(i), f"photo {i}") for i in range(5)]
    reference = read(write_table(tmp_path / "reference.csv", rows))
    raw = pa.table({"image": [image for image, _ in rows], "caption": [c for _, c in rows]})
    pq.write_table(raw, tmp_path / "bytes.parquet")
    structs = pa.table({"image": [{"bytes": image, "path": None} for image, _ in rows], "caption": [c for _, c in rows]})
    pq.write_table(structs, tmp_path / "structs.parquet")
    for name in ("bytes.parquet", "structs.parquet"):
        images, captions, bad = read(tmp_path / name)
        assert np.array_equal(images, reference[0]) and captions == reference[1] and bad == []


def test_a_path_column_naming_missing_files_counts_them_as_bad_rows(tmp_path):
    rows = [(photo(i), f"photo {i}") for i in range(6)]
    rows[2] = (None, "photo 2")  # never written
    (tmp_path / "data").mkdir()
    table = write_table(tmp_path / "data" / "captions.csv", rows, "file_name")  # the paths are relative to data/
    _, captions, bad = read(table)
    assert captions == [f"photo {i}" for i in (0, 1, 3, 4, 5)]
    assert [(b.row, b.reason, b.file) for b in bad] == [(3, "image file not found", str(table))]


def test_shards_and_globs_read_in_a_stable_order_and_bad_rows_are_named_by_file(tmp_path):
    shards = [write_table(tmp_path / f"part-{k}.csv", rows_with_bad(12, seed=k)) for k in (2, 0, 1)]
    listed = read(",".join(str(tmp_path / f"part-{k}.csv") for k in (0, 1, 2)))
    globbed = read(tmp_path / "part-*.csv")
    assert np.array_equal(globbed[0], listed[0]) and globbed[1] == listed[1]
    assert [(b.file, b.row) for b in globbed[2]] == [(b.file, b.row) for b in listed[2]]
    assert globbed[1][0] == "photo number 0-0" and globbed[1][-1] == "photo number 2-11"
    assert [(Path(b.file).name, b.row) for b in globbed[2]][:3] == [("part-0.csv", 4), ("part-0.csv", 6), ("part-0.csv", 11)]
    assert {Path(b.file).name for b in globbed[2]} == {s.name for s in shards}
    write_bad_rows(globbed[2], tmp_path / "bad_rows.csv")
    with open(tmp_path / "bad_rows.csv", newline="") as handle:
        reported = list(csv.DictReader(handle))
    assert reported[0] == {"file": str(tmp_path / "part-0.csv"), "row": "4", "reason": "not an image"}


def test_a_yaml_list_of_tables_is_accepted(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  csv: [a.csv, 'b/*.parquet']\n")
    assert load_config(str(tmp_path / "run.yaml")).data.csv == "a.csv,b/*.parquet"


@pytest.mark.parametrize("make, message", [
    (lambda d: "nothing-*.csv", "data.csv: {d}/nothing-*.csv matches no file"),
    (lambda d: write_table(d / "t.jsonl", [(photo(0), "a")], "picture"), "t.jsonl has no 'b64string_images' column"),
    (lambda d: write_table(d / "t.parquet", [(photo(0), "a")], "picture"), "t.parquet has no 'b64string_images' column"),
    (lambda d: write_table(d / "t.csv", [(None, "a")], "path"), "t.csv has no usable rows; 1 row skipped (1 image file not found)"),
])
def test_unusable_inputs_are_one_line_user_errors(tmp_path, make, message):
    spec = make(tmp_path)
    spec = tmp_path / spec if isinstance(spec, str) else spec
    with pytest.raises(UserError) as err:
        read(spec)
    assert message.format(d=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_val_csv_is_the_held_out_set_and_all_of_data_csv_trains(tmp_path):
    train = write_table(tmp_path / "train.csv", rows_with_bad(20))
    val = write_table(tmp_path / "val.jsonl", rows_with_bad(9, seed=1), "image")
    data, train_rows, held_out = load_train_val(config(f"data.csv={train}", f"data.val_csv={val}"), tmp_path / "cache")
    assert len(train_rows) == len(data) == 20 - 5 and held_out.captions[0] == "photo number 1-0"
    assert [(Path(b.file).name, b.row) for b in held_out.bad_rows] == [("val.jsonl", 4), ("val.jsonl", 6)]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2


def test_a_run_on_shards_with_a_val_csv_reports_both_tables_bad_rows(cli, tmp_path):
    for k in (0, 1):
        write_table(tmp_path / f"shard-{k}.csv", rows_with_bad(40, seed=k))
    write_table(tmp_path / "val.parquet", rows_with_bad(12, seed=2), "path")
    result = cli.ok(cli("train", *TINY, "data.csv=shard-*.csv", "data.val_csv=val.parquet", "train.max_steps=1",
                        "data.decode_workers=2", "run.output_dir=run", cwd=tmp_path))
    assert "data: " + str(tmp_path / "shard-*.csv") + ": 62 rows used, 62 train / 9 val (" in result.stdout
    assert "rows/s" in result.stdout and "21 rows skipped" in result.stdout
    with open(tmp_path / "run" / "bad_rows.csv", newline="") as handle:
        files = [Path(r["file"]).name for r in csv.DictReader(handle)]
    assert files == ["shard-0.csv"] * 9 + ["shard-1.csv"] * 9 + ["val.parquet"] * 3


# --- warm starts -----------------------------------------------------------------------------------

def test_the_cache_key_follows_file_identity_not_worker_count(tmp_path):
    table = write_table(tmp_path / "d.csv", rows_with_bad(10))
    cfg = config(f"data.csv={table}")
    key = image_cache.cache_key(cfg, str(table))
    assert image_cache.cache_key(config(f"data.csv={table}", "data.decode_workers=1"), str(table)) == key
    stat = table.stat()
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: same bytes, new mtime
    assert image_cache.cache_key(cfg, str(table)) != key
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image_cache.cache_key(cfg, str(table)) == key
    other = write_table(tmp_path / "e.csv", rows_with_bad(10))
    assert image_cache.cache_key(cfg, f"{table},{other}") != image_cache.cache_key(cfg, f"{other},{table}")


def test_a_warm_load_maps_the_cache_without_reading_the_tables(tmp_path, monkeypatch):
    table = write_table(tmp_path / "d.csv", rows_with_bad(30))
    cfg = config(f"data.csv={table}")
    cold = load_caption_data(cfg, cache_dir=tmp_path / "cache")
    opened = []
    real_open = open

    def watched_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watched_open)
    monkeypatch.setattr(io, "open", watched_open)
    warm = load_caption_data(cfg, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert cold.decoded and not warm.decoded
    assert str(table) not in opened
    assert hashlib.sha256(warm.images.numpy().tobytes()).digest() == hashlib.sha256(cold.images.numpy().tobytes()).digest()
    assert warm.captions == cold.captions and warm.bad_rows == cold.bad_rows
    assert table_files(str(table)) == [table]


# --- prefetching -----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_shift", [0, 2], ids=["still", "moved"])
def test_prefetched_batches_are_the_samplers_own_and_its_state_is_unchanged(max_shift):
    n = 10
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captions = [f"caption {i}" for i in range(n)]
    split = TokenizedSplit(CaptionData(images, captions, "test"), CharTokenizer.from_captions(captions), 12)
    shifts = ImageShifts(max_shift, seed=0, n_rows=n) if max_shift else None
    prefetched, plain = ResumableSampler(n, 3, seed=0), ResumableSampler(n, 3, seed=0)
    batches = BatchPrefetcher(split, prefetched, micro_batches=2, shifts=shifts)
    for step in range(8):  # over several epochs of 3 batches
        if step == 5:  # the sampler moved by someone else, as a loaded state would
            for sampler in (prefetched, plain):
                sampler.load_state_dict({"epoch": 7, "samples_seen_in_epoch": 3})
        got = batches.next_step()
        wanted = []
        for _ in range(2):
            rows = plain.next_indices()
            batch = split.batch(rows)
            if shifts:  # each row moved as the epoch it was drawn in says
                batch.images = shifts(batch.images, rows, plain.epoch)
            wanted.append(batch)
        assert all(torch.equal(g.images, w.images) for g, w in zip(got, wanted)), step
        assert all(torch.equal(g.input_ids, w.input_ids) for g, w in zip(got, wanted))
        assert prefetched.state_dict() == plain.state_dict()


def test_vectorised_tokenisation_matches_the_definition_caption_by_caption():
    captions = ["a red square", "", "x" * 70, "un carré rouge 赤い円 🟥", "chars not in the vocabulary: §¶", "\ud800 lone"]
    tokenizer = CharTokenizer.from_captions(captions[:3])
    text_len = 20
    for dtype in (torch.long, torch.int16):
        input_ids, targets = tokenize_captions(captions, tokenizer, text_len, dtype)
        assert input_ids.dtype == targets.dtype == dtype and input_ids.shape == (len(captions), text_len)
        for row, caption in enumerate(captions):
            ids = tokenizer.encode(caption)[: text_len - 1]
            pad = text_len - len(ids) - 1
            assert input_ids[row].tolist() == [tokenizer.bos_id, *ids] + [tokenizer.pad_id] * pad, caption
            assert targets[row].tolist() == [*ids, tokenizer.eos_id] + [IGNORE_INDEX] * pad, caption
