"""The benchmark's dataset families: each writes a seemore CSV that our reader takes whole, with
captions the default model can hold and enough of them to be a task, the same from the same seed."""

from __future__ import annotations

import pytest

from bench.caption_families import FAMILIES, write_family_csv
from seemore_ds.config import load_config
from seemore_ds.data.dataset import load_caption_data


@pytest.mark.parametrize("family", FAMILIES)
def test_family_csv_loads_whole_and_is_a_task(family, tmp_path):
    path = write_family_csv(family, tmp_path / f"{family}.csv", n=60, seed=0)
    data = load_caption_data(load_config(None, []), str(path))
    assert len(data) == 60 and not data.bad_rows  # every caption fits model.max_caption_len
    assert len(set(data.captions)) >= 5  # no caption a model could learn without looking
    assert data.images.float().std() > 10  # images with content, not a flat colour
    assert write_family_csv(family, tmp_path / "again.csv", n=60, seed=0).read_bytes() == path.read_bytes()
