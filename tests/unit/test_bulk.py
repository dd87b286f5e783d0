"""Bulk captioning (captioner.bulk): input streaming, resume, crash recovery, sidecars,
unreadable files and the bounded decode queue, with a fake captioner (and the tiny model
through the CLI)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captioner.api import CaptionResult
from captioner.bulk import AppendFile, Sidecars, caption_bulk, plan
from captioner.bulk import run as bulk
from captioner.errors import DataError


class FakeCaptioner:
    """Captions an image by its top-left red value ("red 7"), recording each decoder call's
    size; "encoding" passes the images through (Captioner's encode_batch / caption_features
    split, which bulk captioning overlaps)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.encode_threads: set[str] = set()

    def encode_batch(self, images):
        self.encode_threads.add(threading.current_thread().name)
        return list(images), None

    def encode_for_caption(self, images):
        features, logits = self.encode_batch(images)
        return {"features": features, "concept_logits": logits}

    def caption_features(self, features, return_attention=True, concept_logits=None, **settings):
        self.calls.append(len(features))
        return [
            CaptionResult(f"red {int(img[0, 0, 0])}", ["red"], -0.5, None, concepts=[("x", 0.5)])
            for img in features
        ]

    def caption(self, images, return_attention=True, **settings):
        features, logits = self.encode_batch(images)
        return self.caption_features(features, return_attention, logits, **settings)


def make_image(path, red: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), (red, 10, 20), np.uint8)).save(path)


@pytest.fixture()
def photos(tmp_path):
    """Five PNGs (red = 1..5), two of them in a nested folder, plus a non-image."""
    root = tmp_path / "photos"
    for name, red in [("a.png", 1), ("b.png", 2), ("sub/c.png", 3), ("sub/deeper/d.png", 4)]:
        make_image(root / name, red)
    make_image(root / "e.png", 5)
    (root / "notes.md").write_text("not an image")
    return root


def run_jsonl(photos, out, batch_size=2, **kwargs):
    fake = FakeCaptioner()
    sink = AppendFile(out, "jsonl")
    try:
        stats = caption_bulk(fake, [str(photos)], sink, batch_size=batch_size, **kwargs)
    finally:
        sink.close()
    return fake, stats


def read_jsonl(out) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def red_of(key: str) -> int:
    return {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}[key.rsplit("/", 1)[-1][0]]


def test_streams_recursively_in_order_in_chunks(photos, tmp_path):
    out = tmp_path / "out" / "captions.jsonl"
    fake, stats = run_jsonl(photos, out)
    records = read_jsonl(out)
    names = [r["path"].removeprefix(str(photos) + "/") for r in records]
    assert names == ["a.png", "b.png", "e.png", "sub/c.png", "sub/deeper/d.png"]
    assert all(r["caption"] == f"red {red_of(r['path'])}" for r in records)  # image <-> caption
    assert records[0]["score"] == -0.5
    assert records[0]["concepts"] == [{"word": "x", "probability": 0.5}]
    assert fake.calls == [2, 2, 1]
    assert fake.encode_threads == {"overlap-stage"}  # encoded beside the beam search
    assert (stats.captioned, stats.failed, stats.skipped) == (5, 0, 0)


def test_rerun_resumes_skipping_images_already_written(photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    run_jsonl(photos, out)
    make_image(photos / "sub" / "a2.png", 1)
    make_image(photos / "f.png", 2)
    fake, stats = run_jsonl(photos, out)
    assert fake.calls == [2]  # only the two new images
    assert (stats.captioned, stats.skipped) == (2, 5)
    keys = [r["path"] for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) == 7


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_kill_mid_chunk_recovers_with_every_image_exactly_once(photos, tmp_path, fmt):
    """A run killed while appending: one chunk never written, the next torn mid-line."""
    out = tmp_path / f"captions.{fmt}"
    sink = AppendFile(out, fmt)
    caption_bulk(FakeCaptioner(), [str(photos)], sink, batch_size=2)
    sink.close()
    lines = out.read_bytes().splitlines(keepends=True)
    keep = 3 if fmt == "csv" else 2  # header + two records, or two records
    out.write_bytes(b"".join(lines[:keep]) + lines[keep][:9])  # a torn record, no newline

    sink = AppendFile(out, fmt)
    assert sink.torn and len(sink.done) == 2
    fake = FakeCaptioner()
    stats = caption_bulk(fake, [str(photos)], sink, batch_size=2)
    sink.close()
    assert (stats.captioned, stats.skipped, fake.calls) == (3, 2, [2, 1])
    if fmt == "jsonl":
        records = read_jsonl(out)  # every line parses: the torn one is gone
        keys = [r["path"] for r in records]
    else:
        records = list(csv.DictReader(io.StringIO(out.read_text())))
        keys = [r["path"] for r in records]
    assert sorted(keys) == sorted(str(p) for p in photos.rglob("*.png"))
    assert all(r["caption"] == f"red {red_of(k)}" for r, k in zip(records, keys, strict=True))


def test_a_file_that_is_not_ours_is_refused_and_left_alone(photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text("hello\n{}\n")
    with pytest.raises(DataError, match="line 1"):
        AppendFile(out, "jsonl")
    assert out.read_text() == "hello\n{}\n"
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="header"):
        AppendFile(other, "csv")


def test_a_second_writer_on_the_same_file_is_refused(photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    run_jsonl(photos, out)
    first = AppendFile(out, "jsonl")
    try:
        with pytest.raises(DataError, match="another run"):
            AppendFile(out, "jsonl")
    finally:
        first.close()


def test_sidecar_txt_beside_each_image_and_resume(photos):
    fake = FakeCaptioner()
    stats = caption_bulk(fake, [str(photos)], Sidecars(), batch_size=4)
    assert stats.captioned == 5
    assert (photos / "sub" / "deeper" / "d.txt").read_text() == "red 4\n"
    assert (photos / "a.txt").read_text() == "red 1\n"
    again = FakeCaptioner()
    assert caption_bulk(again, [str(photos)], Sidecars()).skipped == 5 and again.calls == []
    redo = FakeCaptioner()
    assert caption_bulk(redo, [str(photos)], Sidecars(overwrite=True)).captioned == 5


def test_tiff_photos_are_captioned_like_the_rest(tmp_path):
    """The loader and REST take TIFF; a bulk run over a folder skipped .tif/.tiff before."""
    from captioner.bulk import inputs
    from captioner.data import image_source

    assert inputs.IMAGE_SUFFIXES is image_source.IMAGE_SUFFIXES  # one list, in the data layer
    root = tmp_path / "scans"
    make_image(root / "a.tif", 1)
    make_image(root / "b.TIFF", 2)
    make_image(root / "c.png", 3)
    out = tmp_path / "captions.jsonl"
    _, stats = run_jsonl(root, out)
    records = read_jsonl(out)
    assert [r["path"].removeprefix(f"{root}/") for r in records] == ["a.tif", "b.TIFF", "c.png"]
    assert [r["caption"] for r in records] == ["red 1", "red 2", "red 3"]
    assert (stats.captioned, stats.failed) == (3, 0)


def test_unreadable_images_are_reported_counted_and_skipped(photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{photos / 'a.png'}\n\n{tmp_path / 'missing.png'}\n")
    reported: list[str] = []
    out = tmp_path / "captions.jsonl"
    fake, stats = run_jsonl(photos, out, report=reported.append, files_from=[listing])
    assert stats.failed == 2 and stats.captioned == 5  # a.png from the list is a repeat
    assert any("broken.jpg" in m for m in reported) and any("missing.png" in m for m in reported)
    assert len(read_jsonl(out)) == 5


def test_plan_counts_and_reports_inputs_that_find_nothing(photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    run_jsonl(photos, out)
    make_image(photos / "z.png", 9)
    sink = AppendFile(out, "jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    work = plan([str(photos), str(photos / "*.png"), str(empty), "nope/*.jpg"], sink)
    sink.close()
    assert (work.total, work.todo) == (6, 1)  # the glob's images are repeats
    assert len(work.problems) == 2


def test_tar_shards_are_streamed(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        for name, red in [("0001.png", 7), ("0002.png", 8)]:
            make_image(tmp_path / name, red)
            archive.add(tmp_path / name, arcname=name)
        (tmp_path / "0001.json").write_text("{}")
        archive.add(tmp_path / "0001.json", arcname="0001.json")
    out = tmp_path / "captions.jsonl"
    sink = AppendFile(out, "jsonl")
    assert plan([str(shard)], sink).total == 2
    caption_bulk(FakeCaptioner(), [str(shard)], sink)
    sink.close()
    assert [(r["path"], r["caption"]) for r in read_jsonl(out)] == [
        (f"{shard}/0001.png", "red 7"),
        (f"{shard}/0002.png", "red 8"),
    ]
    with pytest.raises(DataError, match="tar members"):
        plan([str(shard)], Sidecars())


def test_decode_queue_is_bounded(tmp_path, monkeypatch):
    """The decoder stops prefetch (+1 in hand) images ahead of the encoder thread, which holds
    at most two encoded chunks ahead of the beam search (one queued, one waiting to be), however
    slow that is."""
    for i in range(40):
        make_image(tmp_path / "many" / f"{i:03d}.png", i)
    decoded = []
    real_load = bulk.load_image
    monkeypatch.setattr(bulk, "load_image", lambda *a, **k: decoded.append(1) or real_load(*a, **k))
    taken = 0
    ahead: list[int] = []

    class SlowCaptioner(FakeCaptioner):
        def caption_features(self, images, return_attention=True, concept_logits=None, **settings):
            nonlocal taken
            taken += len(images)
            deadline = time.monotonic() + 10
            while len(decoded) < min(40, taken + 6) and time.monotonic() < deadline:
                time.sleep(0.01)  # let the decoder fill the queue
            time.sleep(0.05)
            ahead.append(len(decoded) - taken)
            return super().caption_features(images, return_attention, concept_logits, **settings)

    sink = AppendFile(tmp_path / "out.jsonl", "jsonl")
    stats = caption_bulk(SlowCaptioner(), [str(tmp_path / "many")], sink, batch_size=4, prefetch=6)
    sink.close()
    assert stats.captioned == 40
    assert max(ahead) <= 6 + 1 + 2 * 4 and ahead[0] >= 6
    assert all(t.name != "bulk-decode" for t in threading.enumerate())  # the decoder ended


# ------------------------------------------------------------------------------------------
# the CLI, with the tiny model
# ------------------------------------------------------------------------------------------


def run_cli(*args):
    from captioner.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_cli_jsonl_output_resumes_and_refuses_bad_combinations(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    first = run_cli("caption", photos, "-m", tiny_model_dir, "-f", "jsonl", "-o", out)
    assert first.exit_code == 0, first.output
    records = read_jsonl(out)
    assert len(records) == 5 and all({"path", "caption", "score"} <= set(r) for r in records)
    assert "wrote 5 captions" in first.stderr

    again = run_cli("caption", photos, "-m", tiny_model_dir, "-f", "jsonl", "-o", out)
    assert again.exit_code == 0 and "5 already there" in again.stderr
    assert read_jsonl(out) == records

    bad = run_cli("caption", photos, "-f", "txt", "-o", tmp_path / "x.txt")
    assert bad.exit_code == 2 and "leave out --output" in bad.stderr
    nothing = run_cli("caption", tmp_path / "missing", "-f", "jsonl", "-o", tmp_path / "n.jsonl")
    assert nothing.exit_code == 2 and not (tmp_path / "n.jsonl").exists()

    streamed = run_cli("caption", photos, "-m", tiny_model_dir, "-f", "jsonl")
    assert [json.loads(x) for x in streamed.stdout.splitlines()] == records


def test_an_error_in_the_model_stops_the_decode_thread(photos, tmp_path):
    class Broken(FakeCaptioner):
        def caption_features(self, images, return_attention=True, concept_logits=None, **settings):
            raise RuntimeError("model fell over")

    sink = AppendFile(tmp_path / "out.jsonl", "jsonl")
    with pytest.raises(RuntimeError, match="fell over"):
        caption_bulk(Broken(), [str(photos)], sink, batch_size=1, prefetch=1)
    sink.close()
    assert not any(t.name == "bulk-decode" and t.is_alive() for t in threading.enumerate())
    assert not (tmp_path / "out.jsonl").exists()  # nothing was written
