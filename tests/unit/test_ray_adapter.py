"""Ray Data adapter (captioner.distributed.ray_data): CaptionBatch alone, then a local two-CPU
Ray cluster (loopback only, no dashboard, no usage stats) with two captioning actors, the tiny
model and a handful of synthetic images. Skipped where Ray is not installed (the ``ray``
extra), except the test that a missing Ray gives the install hint."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captioner.errors import ConfigError

N_GOOD = 5


def png_bytes(red: int, size: tuple[int, int] = (24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), (red, 10, 20), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def photos(tmp_path):
    """Five PNGs of different sizes (one in a sub-folder) and one corrupt JPEG."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(N_GOOD):
        where = root / "sub" if i == 0 else root
        (where / f"p{i}.png").write_bytes(png_bytes(40 * i, (20 + i, 24)))
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def cluster():
    """A fresh local Ray cluster for this module, always shut down."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def test_missing_ray_names_the_extra_to_install(monkeypatch, tmp_path):
    from captioner.distributed.ray_data import caption_dataset

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'captioner\[ray\]'"):
        caption_dataset([str(tmp_path)], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_caption_batch_captions_images_and_bytes_and_reports_bad_rows(tiny_model_dir):
    pytest.importorskip("ray")
    from captioner.distributed.ray_data import COLUMNS, CaptionBatch

    fn = CaptionBatch(str(tiny_model_dir), beam_size=2, backend="torch")
    images = np.empty(2, dtype=object)  # ragged, as Ray hands images of different sizes
    images[:] = [np.full((20, 24, 3), 7, np.uint8), np.full((30, 16, 3), (9, 10, 20), np.uint8)]
    out = fn({"image": images, "path": np.array(["a.png", "b.png"])})
    assert tuple(out) == COLUMNS and list(out["path"]) == ["a.png", "b.png"]
    assert all(out["caption"]) and not any(out["error"])
    assert np.isnan(out["in_domain"]).all()  # the tiny model has no grounding
    alone = fn.captioner.caption([images[1]], beam_size=2, return_attention=False)[0]
    assert out["caption"][1] == alone.caption  # the batch changes nothing

    raw = np.array([png_bytes(9, (30, 16)), b"junk"], dtype=object)
    out = fn({"bytes": raw, "path": np.array(["b.png", "junk.jpg"])})
    assert out["caption"][0] == alone.caption
    assert out["caption"][1] == "" and "junk.jpg" in out["error"][1]
    assert json.loads(out["concepts"][1]) == []


def test_ray_rows_write_the_bulk_record_shape(tmp_path):
    """Without Ray: a row as CaptionBatch builds it, written by the --ray JSONL output, is the
    record single-machine bulk captioning writes ({"path"}, concepts as {"word",
    "probability"}); the rows said [word, p] pairs before."""
    from captioner.api import CaptionResult
    from captioner.bulk.writers import result_record
    from captioner.distributed.ray_data import COLUMNS, _add_row, as_columns
    from captioner.distributed.ray_output import JsonlOutput, concepts_json, parse_concepts

    result = CaptionResult(
        caption="a dog runs",
        tokens=["a", "dog", "runs"],
        score=-0.51234,
        attention=None,
        concepts=[("dog", 0.912345), ("grass", float("nan"))],
        in_domain=0.25,
        out_of_domain=False,
    )
    rows = {k: [] for k in COLUMNS}
    _add_row(rows, "/photos/a.png", result)
    _add_row(rows, "/photos/b.png", "/photos/b.png: not an image")
    expected = [{"word": "dog", "probability": 0.9123}, {"word": "grass", "probability": 0.0}]
    assert json.loads(rows["concepts"][0]) == expected and rows["concepts"][1] == "[]"
    assert parse_concepts(concepts_json(result.concepts)) == [("dog", 0.9123), ("grass", 0.0)]

    out = tmp_path / "captions.jsonl"
    writer = JsonlOutput(out, overwrite=False)
    assert writer.write(as_columns(rows)) == 1  # the unreadable image is reported, not written
    writer.close()
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record == result_record("/photos/a.png", result)
    assert record["path"] == "/photos/a.png" and record["concepts"] == expected


@pytest.mark.slow
def test_two_actors_caption_every_image_once_then_resume(cluster, tiny_model_dir, photos, tmp_path):
    """`caption --ray` on the running cluster: JSONL, the broken photo reported, a rerun resumes."""
    from captioner.cli.main import app

    out = tmp_path / "captions.jsonl"
    args = ["caption", str(photos), "-m", str(tiny_model_dir), "--backend", "torch"]
    args += ["--beam-size", "2", "--batch-size", "2", "--ray", "local", "--ray-workers", "2"]
    run = CliRunner().invoke(app, [*args, "-f", "jsonl", "-o", str(out)])
    assert run.exit_code == 1, run.output  # the broken photo: reported, the rest written
    assert "broken.jpg" in run.stderr and f"wrote {N_GOOD} captions" in run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = sorted(r["path"] for r in records)
    assert keys == sorted(str(p) for p in photos.rglob("*.png"))  # each once, absolute
    assert all(r["caption"] for r in records)

    again = CliRunner().invoke(app, [*args, "-f", "jsonl", "-o", str(out)])
    assert f"{N_GOOD} already there" in again.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    no_ray = CliRunner().invoke(app, [*args[:6], "-f", "parquet", "-o", str(tmp_path / "x.pq")])
    assert no_ray.exit_code == 2 and "needs --ray" in no_ray.stderr
    no_output = CliRunner().invoke(app, [*args, "-f", "jsonl"])
    assert no_output.exit_code == 2 and "--output" in no_output.stderr


@pytest.mark.slow
def test_read_images_then_map_batches_caption_batch(cluster, tiny_model_dir, photos):
    """The issue's spelling: ray.data.read_images(...).map_batches(CaptionBatch, ...)."""
    from captioner.distributed.ray_data import CaptionBatch

    # read_images decodes in its read tasks: num_cpus=0 here because both CPUs of this tiny
    # cluster belong to the actors (a real cluster leaves CPUs for decoding)
    files = sorted(str(p) for p in photos.rglob("*.png"))
    ds = cluster.data.read_images(
        files, include_paths=True, mode="RGB", num_cpus=0, override_num_blocks=N_GOOD
    )
    rows = ds.map_batches(
        CaptionBatch,
        fn_constructor_kwargs={"model": str(tiny_model_dir), "backend": "torch"},
        compute=cluster.data.ActorPoolStrategy(size=2),
        num_cpus=1,
        batch_size=2,
    ).take_all()
    assert sorted(r["path"] for r in rows) == files
    assert all(r["caption"] and not r["error"] for r in rows)


def test_parquet_output_columns_nulls_and_all_or_nothing(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from captioner.distributed.ray_output import PARQUET_COLUMNS, ParquetOutput
    from captioner.errors import DataError

    batch = {
        "path": np.array(["/a.png", "/b.png", "/c.png"], dtype=object),
        "caption": np.array(["a dog", "", "a cat"], dtype=object),
        "score": np.array([-0.51234, np.nan, -0.7]),
        "concepts": np.array(['[{"word": "dog", "probability": 0.9}]', "[]", "[]"], dtype=object),
        "in_domain": np.array([0.25, np.nan, np.nan]),
        "out_of_domain": np.array([False, False, False]),
        "error": np.array(["", "/b.png: not an image", ""], dtype=object),
    }
    out = tmp_path / "captions.parquet"
    writer = ParquetOutput(out, overwrite=False)
    assert writer.write(batch) == 2
    writer.close()  # no finish: an interrupted run leaves no file
    assert not out.exists() and not list(tmp_path.iterdir())

    writer = ParquetOutput(out, overwrite=False)
    writer.write(batch)
    writer.finish()
    writer.close()
    table = pq.read_table(out)
    assert tuple(table.column_names) == PARQUET_COLUMNS
    assert table.to_pylist() == [
        {
            "path": "/a.png",
            "caption": "a dog",
            "score": -0.5123,
            "concepts": '[{"word": "dog", "probability": 0.9}]',
            "in_domain": 0.25,
            "out_of_domain": False,
        },
        {
            "path": "/c.png",
            "caption": "a cat",
            "score": -0.7,
            "concepts": "[]",
            "in_domain": None,
            "out_of_domain": None,
        },
    ]
    with pytest.raises(DataError, match="--overwrite"):
        ParquetOutput(out, overwrite=False)
    assert pq.read_table(out).num_rows == 2


def test_a_missing_model_fails_before_a_local_cluster_starts(photos, tmp_path):
    pytest.importorskip("ray")
    from captioner.distributed.ray_data import caption_dataset
    from captioner.errors import CheckpointError

    with pytest.raises(CheckpointError, match="model directory not found"):
        caption_dataset([str(photos)], tmp_path / "o.jsonl", model=str(tmp_path / "none"))
    assert not (tmp_path / "o.jsonl").exists()
