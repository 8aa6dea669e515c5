"""Reading seemore CSVs: layouts and encodings, every image mode, bad rows (skipped or fatal), the CLI's report."""

from __future__ import annotations

import base64
import csv
import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seemore_ds.data.csv_reader import read_caption_csv, summarize_bad_rows, write_caption_csv
from seemore_ds.data.images import read_image_file
from seemore_ds.data.synthetic import synthetic_dataset
from seemore_ds.errors import UserError

SIZE = 16
MAX_CAPTION = 48


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def png_b64(color=(220, 30, 30), size=(SIZE, SIZE)) -> str:
    return b64(encode(Image.new("RGB", size, color)))


def noise_png() -> bytes:
    """A PNG whose pixel data is long enough that cutting it in half leaves a readable header."""
    return encode(Image.effect_noise((48, 48), 60).convert("RGB"))


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels: a decompression bomb, cheaply."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_csv(path, header, rows, encoding="utf-8", newline="\n", quoting=csv.QUOTE_MINIMAL):
    with open(path, "w", encoding=encoding, newline="") as handle:
        writer = csv.writer(handle, lineterminator=newline, quoting=quoting)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read(path, **options):
    options = {"img_size": SIZE, "max_caption_len": MAX_CAPTION, "max_pixels": 1_000_000, **options}
    return read_caption_csv(str(path), **options)


def assert_red(image: np.ndarray):
    red, green, blue = (image[c].astype(int).mean() for c in range(3))
    assert red > 180 and green < 80 and blue < 80, (red, green, blue)


# --- layouts and encodings -------------------------------------------------------------------

def test_columns_in_any_order_with_extra_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["caption", "source", "b64string_images", "license"], [
        ["a red square", "camera 1", png_b64((220, 30, 30)), "cc-by"],
        ["a blue square", "camera 2", png_b64((30, 30, 220)), "cc0"],
    ])
    images, captions, bad = read(path)
    assert captions == ["a red square", "a blue square"]
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == np.uint8
    assert_red(images[0])
    assert bad == []


def test_seemore_layout_with_leading_unnamed_index_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["", "b64string_images", "caption"],
                     [[0, png_b64(), "a red square"], [1, png_b64(), "another red square"]])
    images, captions, bad = read(path)
    assert captions == ["a red square", "another red square"]
    assert len(images) == 2 and bad == []


def test_files_written_by_write_caption_csv_read_back(tmp_path):
    pil_images, captions = synthetic_dataset(5, seed=0, size_px=32)
    write_caption_csv(str(tmp_path / "d.csv"), pil_images, captions)
    images, read_captions, bad = read(tmp_path / "d.csv")
    assert read_captions == captions and images.shape == (5, 3, SIZE, SIZE) and bad == []


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"], ids=["utf8", "utf8-bom"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_utf8_with_or_without_bom_and_any_line_ending(tmp_path, encoding, newline):
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"],
                     [[png_b64(), "un carré rouge"], [png_b64(), "a red square"]], encoding=encoding, newline=newline)
    if encoding == "utf-8-sig":
        assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    _, captions, bad = read(path)
    assert captions == ["un carré rouge", "a red square"]  # no BOM glued to a column name, no stray \r
    assert bad == []


def test_quoted_commas_quotes_newlines_and_non_ascii_in_captions(tmp_path):
    wanted = ['a red, round "ball", left', "un café crème, 赤い円 🟥", "two\nlines"]
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[png_b64(), c] for c in wanted])
    _, captions, bad = read(path)
    assert captions == wanted and bad == []


def test_data_uri_and_line_wrapped_base64_are_accepted(tmp_path):
    raw = b64(encode(Image.new("RGB", (40, 40), (220, 30, 30))))
    wrapped = "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"],
                     [["data:image/png;base64," + raw, "from a data URI"], [wrapped, "wrapped at 76"]])
    images, captions, bad = read(path)
    assert captions == ["from a data URI", "wrapped at 76"] and bad == []
    assert_red(images[1])


# --- image modes and formats -------------------------------------------------------------------

def p_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([10, 20, 30] * 256)
    img.info["transparency"] = 0
    return img


IMAGES = {
    "RGB png": lambda: encode(Image.new("RGB", (SIZE, SIZE), (220, 30, 30))),
    "RGB jpeg": lambda: encode(Image.new("RGB", (SIZE, SIZE), (220, 30, 30)), "JPEG"),
    "L png": lambda: encode(Image.new("L", (20, 20), 100)),
    "L jpeg": lambda: encode(Image.new("L", (20, 20), 100), "JPEG"),
    "1 png": lambda: encode(Image.new("1", (20, 20), 1)),
    "RGBA png": lambda: encode(Image.new("RGBA", (20, 20), (220, 30, 30, 255))),
    "P png": lambda: encode(Image.new("RGB", (20, 20), (220, 30, 30)).convert("P")),
    "P png with transparency": lambda: encode(p_with_transparency(), transparency=0),
    "LA png": lambda: encode(Image.new("LA", (20, 20), (100, 128))),
    "CMYK jpeg": lambda: encode(Image.new("CMYK", (20, 20), (255, 0, 0, 0)), "JPEG"),
    "I;16 png": lambda: encode(Image.new("I;16", (20, 20), 1000)),
    "wide png": lambda: encode(Image.new("RGB", (64, 10), (220, 30, 30))),
    "tall jpeg": lambda: encode(Image.new("RGB", (12, 50), (220, 30, 30)), "JPEG"),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_every_image_mode_and_size_becomes_uint8_rgb_of_the_model_size(tmp_path, kind):
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[b64(IMAGES[kind]()), "an image"]])
    images, _, bad = read(path)
    assert bad == []
    assert images.shape == (1, 3, SIZE, SIZE) and images.dtype == np.uint8


def decode_one(tmp_path, raw: bytes) -> np.ndarray:
    images, _, bad = read(write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[b64(raw), "x"]]))
    assert bad == []
    return images[0].astype(int)


def test_colours_survive_decoding(tmp_path):
    assert_red(decode_one(tmp_path, IMAGES["RGB jpeg"]()))
    assert_red(decode_one(tmp_path, IMAGES["P png"]()))
    assert_red(decode_one(tmp_path, IMAGES["wide png"]()))
    assert np.all(decode_one(tmp_path, IMAGES["L png"]()) == 100)  # grey stays grey
    cyan = decode_one(tmp_path, IMAGES["CMYK jpeg"]())
    assert cyan[0].mean() < 40 and cyan[1].mean() > 215 and cyan[2].mean() > 215


def test_transparency_is_composited_on_white(tmp_path):
    assert np.all(decode_one(tmp_path, encode(Image.new("RGBA", (20, 20), (220, 30, 30, 0)))) == 255)
    assert np.all(decode_one(tmp_path, IMAGES["P png with transparency"]()) == 255)
    assert np.all(decode_one(tmp_path, encode(Image.new("LA", (20, 20), (0, 0)))) == 255)


def test_16_bit_grey_keeps_its_grey_levels(tmp_path):
    """A 16-bit greyscale PNG at half intensity should look mid-grey, not white."""
    grey = float(decode_one(tmp_path, encode(Image.new("I;16", (20, 20), 32768))).mean())
    assert abs(grey - 128) <= 2, f"got grey level {grey:.0f} for a 50% grey 16-bit image"


# --- bad rows ---------------------------------------------------------------------------------

BAD_CELLS = {  # kind -> (image cell, caption, reason reported)
    "not base64": ("@@@ this is not base64 @@@", "a caption", "not valid base64"),
    "not an image": (b64(b"hello, I am a text file and not a picture"), "a caption", "not an image"),
    "truncated image": (b64(noise_png()[:800]), "a caption", "truncated image"),
    "empty image cell": ("", "a caption", "empty image cell"),
    "empty caption": (png_b64(), "   ", "empty caption"),
    "caption too long": (png_b64(), "x" * (MAX_CAPTION + 1),
                         f"caption of {MAX_CAPTION + 1} characters exceeds model.max_caption_len={MAX_CAPTION}"),
    "decompression bomb": (b64(png_declaring(100_000, 100_000)), "a caption",
                           "image of more than 178956970 pixels exceeds data.max_image_pixels=1000000 (refused as a possible decompression bomb)"),
}


def test_bad_rows_are_skipped_with_row_number_and_reason(tmp_path):
    rows = [[png_b64(), "good one"]]
    rows += [[cell, caption] for cell, caption, _ in BAD_CELLS.values()]
    rows += [[png_b64(), "good two"]]
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], rows)

    images, captions, bad = read(path, on_bad_row="skip")

    assert captions == ["good one", "good two"] and len(images) == 2
    # Row numbers count data rows from 1, the header excluded.
    assert [(b.row, b.reason) for b in bad] == [(i, reason) for i, (_, _, reason) in enumerate(BAD_CELLS.values(), start=2)]
    assert summarize_bad_rows(bad).startswith(f"{len(BAD_CELLS)} rows skipped (")


@pytest.mark.parametrize("kind", list(BAD_CELLS))
def test_with_on_bad_row_error_a_bad_row_stops_the_read_naming_it(tmp_path, kind):
    cell, caption, reason = BAD_CELLS[kind]
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"],
                     [[png_b64(), "good"], [png_b64(), "good"], [cell, caption], [png_b64(), "good"]])
    with pytest.raises(UserError) as err:
        read(path, on_bad_row="error")
    message = str(err.value)
    assert "row 3" in message and reason in message and "data.on_bad_row=skip" in message


def test_an_image_over_max_image_pixels_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"],
                     [[png_b64(size=(64, 64)), "too big"], [png_b64(size=(16, 16)), "fine"]])
    _, captions, bad = read(path, max_pixels=1000)
    assert captions == ["fine"]
    assert [(b.row, b.reason) for b in bad] == [(1, "image of 64x64 pixels exceeds data.max_image_pixels=1000 (refused as a possible decompression bomb)")]


def test_declared_dimensions_are_checked_before_decoding(tmp_path):
    """9000 x 9000 is under PIL's own bomb limit but over a 64M-pixel data.max_image_pixels."""
    bomb = b64(png_declaring(9000, 9000))
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[bomb, "bomb"], [png_b64(), "fine"]])
    _, captions, bad = read(path, max_pixels=64_000_000)
    assert captions == ["fine"]
    assert [(b.row, b.reason) for b in bad] == [(1, "image of 9000x9000 pixels exceeds data.max_image_pixels=64000000 (refused as a possible decompression bomb)")]


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_raising_max_image_pixels_lets_larger_images_through(tmp_path):
    """95M pixels is over PIL's own bomb warning (~89M) but under data.max_image_pixels=100M: the config decides,
    and Pillow's warning is not raised."""
    big = b64(png_declaring(10_000, 9_500))  # declared only; its pixel data is missing, so decoding fails later
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[big, "big"], [png_b64(), "fine"]])
    _, _, bad = read(path, max_pixels=100_000_000)
    assert [b.row for b in bad] == [1]
    assert "bomb" not in bad[0].reason and "exceeds" not in bad[0].reason, bad[0].reason


def test_pillows_own_limit_still_holds_above_a_larger_max_image_pixels_and_is_left_as_it_is(tmp_path):
    """Over twice PIL.Image.MAX_IMAGE_PIXELS Pillow refuses to open an image; the reason says whose limit that is,
    and Pillow's setting stays as Pillow set it (no process-wide switch-off for whoever imports seemore_ds)."""
    pillow_default = Image.MAX_IMAGE_PIXELS
    bomb = b64(png_declaring(100_000, 100_000))
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[bomb, "bomb"], [png_b64(), "fine"]])
    _, captions, bad = read(path, max_pixels=10**12)
    assert captions == ["fine"]
    assert [(b.row, b.reason) for b in bad] == [(1, f"image of more than {2 * pillow_default} pixels exceeds Pillow's "
                                                   f"decompression-bomb limit (twice PIL.Image.MAX_IMAGE_PIXELS), "
                                                   f"which data.max_image_pixels=1000000000000 does not raise")]
    assert Image.MAX_IMAGE_PIXELS == pillow_default


# --- files that cannot be used at all ----------------------------------------------------------

def test_a_file_with_no_usable_rows_is_a_user_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [["", "a"], [png_b64(), ""]])
    with pytest.raises(UserError, match=r"has no usable rows; 2 rows skipped \(1 empty image cell, 1 empty caption\)"):
        read(path)


def test_a_file_with_only_a_header_is_a_user_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [])
    with pytest.raises(UserError, match="has no usable rows"):
        read(path)


@pytest.mark.parametrize("header, missing", [
    (["picture", "caption"], "'b64string_images'"),
    (["b64string_images", "text"], "'caption'"),
    (["a", "b"], "'b64string_images' and no 'caption'"),
])
def test_a_file_without_the_two_columns_is_a_user_error(tmp_path, header, missing):
    path = write_csv(tmp_path / "d.csv", header, [[png_b64(), "a red square"]])
    with pytest.raises(UserError, match=f"has no {missing} column"):
        read(path)


def test_an_empty_file_is_a_user_error(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"")
    with pytest.raises(UserError, match="no header"):
        read(tmp_path / "d.csv")


def test_a_file_that_is_not_utf8_is_a_user_error(tmp_path):
    write_csv(tmp_path / "d.csv", ["b64string_images", "caption"], [[png_b64(), "un carré"]], encoding="latin-1")
    with pytest.raises(UserError, match="not UTF-8"):
        read(tmp_path / "d.csv")


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(tmp_path / "nope.csv")


# --- fuzz: nothing crashes, every row is used or reported ---------------------------------------

GOOD_PNG = encode(Image.new("RGB", (12, 9), (220, 30, 30)))


def flip_byte(raw: bytes, at: int, value: int) -> bytes:
    at %= len(raw)
    return raw[:at] + bytes([value]) + raw[at + 1:]


image_cells = st.one_of(
    st.just(b64(GOOD_PNG)),
    st.text(max_size=40),
    st.binary(max_size=80).map(b64),
    st.tuples(st.integers(0, len(GOOD_PNG)), st.integers(0, 255)).map(lambda t: b64(flip_byte(GOOD_PNG, *t))),
    st.integers(0, len(GOOD_PNG)).map(lambda n: b64(GOOD_PNG[:n])),
)
caption_cells = st.one_of(st.just("a red square"), st.text(max_size=MAX_CAPTION + 10))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(image_cells, caption_cells, st.text(max_size=5)), min_size=1, max_size=6))
def test_fuzzed_rows_never_crash_and_are_used_or_reported(tmp_path, rows):
    # Every field quoted: with minimal quoting and "\n" line ends, a lone "\r" in a caption is
    # written bare, and a bare CR is a record break to any CSV reader.
    path = write_csv(tmp_path / "fuzz.csv", ["b64string_images", "caption", "note"], rows, quoting=csv.QUOTE_ALL)
    try:
        images, captions, bad = read(path)
    except UserError as err:  # only when no row at all could be used
        assert "has no usable rows" in str(err)
        assert f"{len(rows)} row" in str(err)
        return
    assert len(images) == len(captions)
    assert len(images) + len(bad) == len(rows)
    assert sorted(b.row for b in bad) == [b.row for b in bad] and all(1 <= b.row <= len(rows) for b in bad)


def csv_bytes(rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["", "b64string_images", "caption"])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


VALID_CSV = csv_bytes([[i, b64(GOOD_PNG), f"a red square {i}"] for i in range(3)])


def data_records(raw: bytes) -> int:
    """Data rows as any CSV reader sees them, counted apart from the reader under test."""
    return sum(1 for _ in csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID_CSV) - 1), st.integers(0, 255)), max_size=6),
       keep=st.integers(1, len(VALID_CSV)))
def test_mutated_csv_files_never_crash_and_every_row_is_used_or_reported(tmp_path, flips, keep):
    """Whole files damaged byte by byte and cut short: quotes, separators, line ends and encoding break too."""
    raw = VALID_CSV
    for at, value in flips:
        raw = flip_byte(raw, at, value)
    raw = raw[:keep]
    (tmp_path / "mutated.csv").write_bytes(raw)
    try:
        images, captions, bad = read(tmp_path / "mutated.csv")
    except UserError as err:  # a file that cannot be used at all: one line saying why
        assert "\n" not in str(err) and str(tmp_path / "mutated.csv") in str(err)
        return
    assert len(images) == len(captions) >= 1
    assert len(images) + len(bad) == data_records(raw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["RGB png", "RGB jpeg", "P png with transparency", "I;16 png"]),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       keep=st.integers(0, 10_000))
def test_mutated_image_files_are_read_or_refused_in_one_line(tmp_path, kind, flips, keep):
    """``generate --image`` reads files from disk: damaged ones are a UserError naming the file."""
    raw = IMAGES[kind]()
    for at, value in flips:
        raw = flip_byte(raw, at, value)
    path = tmp_path / "mutated.img"
    path.write_bytes(raw[:keep])
    try:
        image = read_image_file(str(path), SIZE, 1_000_000)
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert image.shape == (3, SIZE, SIZE) and image.dtype == np.uint8


# --- through the CLI --------------------------------------------------------------------------

def csv_with_bad_rows(path, n_good: int = 24):
    pil_images, captions = synthetic_dataset(n_good, seed=0, size_px=SIZE)
    rows = [[i, b64(encode(img)), caption] for i, (img, caption) in enumerate(zip(pil_images, captions))]
    rows.insert(3, [100, "@@@", "a caption"])  # data row 4
    rows.insert(7, [101, png_b64(), ""])  # data row 8
    rows.insert(9, [102, "@@@", "a caption"])  # data row 10
    return write_csv(path, ["", "b64string_images", "caption"], rows)


@pytest.fixture(scope="module")
def csv_run(cli, tiny, tmp_path_factory):
    """One training step on a CSV with three bad rows, from the folder that holds the CSV."""
    work = tmp_path_factory.mktemp("csv_user")
    csv_with_bad_rows(work / "captions.csv")
    result = cli.ok(cli("train", *tiny, "data.csv=captions.csv", "train.max_steps=1", "run.output_dir=runs/csv", cwd=work))
    return work / "runs" / "csv", result


def test_training_on_a_csv_reports_bad_rows_on_the_console_and_in_bad_rows_csv(csv_run):
    run, result = csv_run
    assert "3 rows skipped (2 not valid base64, 1 empty caption)" in result.stdout
    assert "24 rows used" in result.stdout
    with open(run / "bad_rows.csv", newline="", encoding="utf-8") as handle:
        reported = list(csv.DictReader(handle))
    assert reported == [
        {"row": "4", "reason": "not valid base64"},
        {"row": "8", "reason": "empty caption"},
        {"row": "10", "reason": "not valid base64"},
    ]


def test_a_csv_trained_run_can_be_evaluated_from_another_folder(cli, csv_run, tmp_path):
    """The run folder's config.yaml must still find the training CSV when the user has moved on."""
    run, _ = csv_run
    result = cli.ok(cli("eval", "--checkpoint", run, "--json", cwd=tmp_path))
    assert json.loads(result.stdout)["n"] == 2  # round(24 x 0.1) held-out rows


def test_on_bad_row_error_stops_the_cli_with_one_line(cli, tiny, tmp_path):
    csv_with_bad_rows(tmp_path / "captions.csv")
    result = cli("train", *tiny, "data.csv=captions.csv", "data.on_bad_row=error", "run.output_dir=runs/csv",
                 cwd=tmp_path)
    cli.user_error(result, "captions.csv row 4: not valid base64")
    assert not (tmp_path / "runs" / "csv").exists()


def test_a_csv_without_the_columns_stops_the_cli_with_one_line(cli, tiny, tmp_path):
    write_csv(tmp_path / "captions.csv", ["picture", "text"], [["x", "y"]])
    result = cli("train", *tiny, "data.csv=captions.csv", "run.output_dir=runs/csv", cwd=tmp_path)
    cli.user_error(result, "captions.csv has no 'b64string_images' and no 'caption' column")


def test_too_few_rows_for_a_batch_are_refused_before_the_backend_times_a_step_and_name_the_skipped_rows(
        tiny, tmp_path, monkeypatch):
    """train.precision=auto times training steps at train.batch_size when the backend is built: a batch larger
    than the data must be refused before, and the rows the data lost be counted there."""
    from seemore_ds import trainer
    from seemore_ds.config import load_config

    def no_backend(*args):
        raise AssertionError("the backend was built for a batch the data cannot fill")

    monkeypatch.setattr(trainer, "build_backend", no_backend)
    csv_with_bad_rows(tmp_path / "captions.csv", n_good=5)
    cfg = load_config(None, [*tiny, f"data.csv={tmp_path / 'captions.csv'}", "train.precision=auto",
                             "train.batch_size=100000", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError) as err:
        trainer.train(cfg)
    assert "fewer than train.batch_size=100000" in str(err.value)
    assert "3 rows skipped (2 not valid base64, 1 empty caption)" in str(err.value)


def test_the_built_in_dataset_skips_and_reports_captions_longer_than_max_caption_len_as_a_table_does(tiny):
    """Never cut: a caption cut short would teach the model a caption the image does not show."""
    from seemore_ds.config import load_config
    from seemore_ds.data.dataset import load_caption_data

    data = load_caption_data(load_config(None, [*tiny, "data.synth_n=64", "model.max_caption_len=40"]))
    assert data.bad_rows and len(data) + len(data.bad_rows) == 64
    assert all(len(caption) <= 40 for caption in data.captions)
    assert all(b.reason.startswith("caption of ") and b.reason.endswith("exceeds model.max_caption_len=40")
               for b in data.bad_rows)
    assert {b.file for b in data.bad_rows} == {"built-in synthetic (64 images)"}
    with pytest.raises(UserError, match=r"built-in synthetic \(64 images\) row \d+: caption of .* \(set data.on_bad_row=skip"):
        load_caption_data(load_config(None, [*tiny, "data.synth_n=64", "model.max_caption_len=40", "data.on_bad_row=error"]))
    with pytest.raises(UserError, match=r"built-in synthetic \(64 images\) has no usable rows; 64 rows skipped"):
        load_caption_data(load_config(None, [*tiny, "data.synth_n=64", "model.max_caption_len=5"]))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_naming_a_column_twice_is_a_user_error(tmp_path, suffix):
    """Which of two 'caption' columns is meant cannot be told: never train on one of them silently."""
    rows = [[png_b64(), "the first caption", "the second caption"]] * 3
    header = ["b64string_images", "caption", "caption"]
    if suffix == ".csv":
        path = write_csv(tmp_path / "d.csv", header, rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_arrays([pa.array(column) for column in zip(*rows)], names=header), path)
    with pytest.raises(UserError, match="has more than one column named 'caption'; rename or remove"):
        read(path)


def test_eval_names_its_data_argument_and_reports_the_rows_it_skipped(cli, tiny_run, tmp_path):
    """As training does: every skipped row counted with its reason (on stderr, so that --json stays JSON),
    and a missing table or a folder named by the argument the user gave."""
    csv_with_bad_rows(tmp_path / "captions.csv")
    result = cli.ok(cli("eval", "--checkpoint", tiny_run.run_dir, "--data", "captions.csv", "--json", cwd=tmp_path))
    assert json.loads(result.stdout)["bad_rows"] == [
        {"file": "captions.csv", "row": 4, "reason": "not valid base64"},
        {"file": "captions.csv", "row": 8, "reason": "empty caption"},
        {"file": "captions.csv", "row": 10, "reason": "not valid base64"},
    ]
    assert ("data: 3 rows skipped (2 not valid base64, 1 empty caption); first: captions.csv row 4: not valid base64, "
            "captions.csv row 8: empty caption, captions.csv row 10: not valid base64") in result.stderr
    cli.user_error(cli("eval", "--checkpoint", tiny_run.run_dir, "--data", "nope.csv", cwd=tmp_path),
                   "--data: nope.csv does not exist")
    cli.user_error(cli("eval", "--checkpoint", tiny_run.run_dir, "--data", ".", cwd=tmp_path),
                   "--data: . is a folder; name a table file, or a glob such as ./*.csv")


def test_a_folder_as_data_csv_is_named_a_folder(tmp_path):
    with pytest.raises(UserError, match=r"data.csv: .* is a folder; name a table file, or a glob such as .*\*\.csv"):
        read(tmp_path)
