"""Bulk captioning against bad inputs (issue 22): a decoder that raises anything, non-UTF-8
file names and file lists, binary lists, sidecar name clashes, CSV paths with newlines, a full
disk and a tar member that would expand to gigabytes. Every case is reported and skipped or is
one clear line, the run finishes, and the output stays valid UTF-8 that a rerun resumes."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.api import CaptionResult
from captioner.bulk import AppendFile, Collect, Sidecars, Stream, caption_bulk, plan
from captioner.bulk import inputs as bulk_inputs
from captioner.bulk import run as bulk_run
from captioner.bulk import writers as bulk_writers
from captioner.errors import DataError, ImageLoadError


class Fake:
    """Captions an image by its top-left red value; every photo with red >= 200 is called
    out of domain (as a grounded model would)."""

    def encode_batch(self, images):
        return list(images), None

    def encode_for_caption(self, images):
        features, logits = self.encode_batch(images)
        return {"features": features, "concept_logits": logits}

    def caption_features(self, features, return_attention=True, concept_logits=None, **settings):
        self.settings = settings
        return [
            CaptionResult(
                f"red {int(img[0, 0, 0])}",
                ["red"],
                -0.5,
                None,
                concepts=[("dog", 0.75)],
                in_domain=0.01 if img[0, 0, 0] >= 200 else 0.5,
                out_of_domain=bool(img[0, 0, 0] >= 200),
            )
            for img in features
        ]

    def caption(self, images, return_attention=True, **settings):
        return self.caption_features(list(images), return_attention, None, **settings)


def png(path, red: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), (red, 10, 20), np.uint8)).save(path, format="PNG")


def png_bytes(red: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (red, 10, 20), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def run_to(sink, inputs, **kwargs):
    reported: list[str] = []
    try:
        stats = caption_bulk(
            Fake(), [str(i) for i in inputs], sink, report=reported.append, **kwargs
        )
    finally:
        sink.close()
    return stats, reported


def cli(*args):
    from typer.testing import CliRunner

    from captioner.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


# ------------------------------------------------------------------------------------------
# item 1: whatever a decoder raises for one file, that file is reported and the run finishes
# ------------------------------------------------------------------------------------------


def test_a_decoder_raising_an_unexpected_exception_is_reported_and_skipped(tmp_path, monkeypatch):
    for name, red in [("a.png", 1), ("b.gif", 2), ("c.png", 3)]:
        png(tmp_path / "photos" / name, red)
    real = bulk_run.load_image

    def load(source, name=None):
        if str(source).endswith(".gif"):  # Pillow counting the frames of a truncated GIF
            raise IndexError("list index out of range")
        return real(source, name=name)

    monkeypatch.setattr(bulk_run, "load_image", load)
    out = tmp_path / "captions.jsonl"
    stats, reported = run_to(AppendFile(out, "jsonl"), [tmp_path / "photos"], batch_size=8)
    assert (stats.captioned, stats.failed) == (2, 1)
    assert len(reported) == 1 and "b.gif" in reported[0] and "IndexError" in reported[0]
    assert [json.loads(x)["caption"] for x in out.read_text().splitlines()] == ["red 1", "red 3"]


def test_mutated_images_never_stop_a_bulk_run(tmp_path):
    """A small image-mutation fuzz: 150 seeded byte mutations (some truncated) of an animated
    GIF, a PNG and a JPEG (Pillow raised IndexError on one of these GIFs). Each file is either
    captioned or reported; nothing escapes and the run finishes."""
    rng = np.random.default_rng(22)

    def pixels():
        return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))

    seeds = {}
    for fmt, suffix in (("GIF", ".gif"), ("PNG", ".png"), ("JPEG", ".jpg")):
        buffer = io.BytesIO()
        extra = {"save_all": True, "append_images": [pixels(), pixels()]} if fmt == "GIF" else {}
        pixels().save(buffer, format=fmt, **extra)
        seeds[suffix] = buffer.getvalue()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for i in range(150):
        suffix = list(seeds)[i % 3]
        data = bytearray(seeds[suffix])
        if i % 4 == 0:
            data = data[: int(rng.integers(len(data) // 2, len(data)))]
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(8, len(data)))] = int(rng.integers(0, 256))
        (folder / f"{i:03d}{suffix}").write_bytes(bytes(data))
    sink = Collect()
    stats, reported = run_to(sink, [folder], batch_size=16)
    assert stats.captioned + stats.failed == 150
    assert len(reported) == stats.failed and len(sink.records) == stats.captioned


# ------------------------------------------------------------------------------------------
# item 2: non-UTF-8 names
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def latin1_folder(tmp_path):
    """Two photos, one named in Latin-1 (b"caf\\xe9.png": not UTF-8)."""
    folder = tmp_path / "photos"
    png(folder / "plain.png", 1)
    png(Path(os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")), 2)
    return folder


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_non_utf8_file_name_is_captioned_written_as_utf8_and_resumed(
    latin1_folder, tmp_path, fmt
):
    out = tmp_path / f"captions.{fmt}"
    stats, reported = run_to(AppendFile(out, fmt), [latin1_folder])
    assert (stats.captioned, stats.failed, reported) == (2, 0, [])
    text = out.read_bytes().decode("utf-8")  # valid UTF-8
    if fmt == "jsonl":
        paths = [json.loads(line)["path"] for line in text.splitlines()]
    else:
        paths = [r["path"] for r in csv.DictReader(io.StringIO(text, newline=""))]
    assert paths == [f"{latin1_folder}/caf\\xe9.png", f"{latin1_folder}/plain.png"]
    again, _ = run_to(AppendFile(out, fmt), [latin1_folder])
    assert (again.captioned, again.skipped) == (0, 2)  # resumed: the escaped name matched


def test_text_stream_and_json_carry_a_non_utf8_name(latin1_folder):
    stream = io.StringIO()
    run_to(Stream(stream, "text"), [latin1_folder])
    assert stream.getvalue().encode("utf-8")  # no lone surrogate left in the text
    assert "caf\\xe9.png\tred 2" in stream.getvalue()
    collected = Collect()
    run_to(collected, [latin1_folder])
    assert json.dumps(collected.records, ensure_ascii=False).encode("utf-8")


def test_a_latin1_files_from_list_reaches_its_files(latin1_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"# Latin-1 names\n" + os.fsencode(str(latin1_folder)) + b"/caf\xe9.png\n")
    sink = Collect()
    stats, reported = run_to(sink, [], files_from=[listing])
    assert (stats.captioned, reported) == (1, [])
    assert sink.records[0]["caption"] == "red 2"


def test_a_binary_files_from_is_one_clear_line(tmp_path):
    binary = tmp_path / "list.bin"
    binary.write_bytes(png_bytes(3) + b"\x00\xff\xfe\n\x00")
    with pytest.raises(ImageLoadError, match="NUL byte"):
        plan([], Collect(), [binary])
    result = cli("caption", "--files-from", binary, "-m", tmp_path / "no-model")
    assert result.exit_code == 2 and "NUL byte" in result.stderr
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------
# item 6: lost outputs
# ------------------------------------------------------------------------------------------


def test_images_sharing_a_name_get_their_own_sidecars(tmp_path):
    folder = tmp_path / "photos"
    png(folder / "a.jpg", 1)  # PNG bytes under a .jpg name decode all the same
    png(folder / "a.png", 2)
    png(folder / "b.png", 3)
    stats, _ = run_to(Sidecars(), [folder])
    assert stats.captioned == 3
    assert (folder / "a.jpg.txt").read_text() == "red 1\n"
    assert (folder / "a.png.txt").read_text() == "red 2\n"
    assert (folder / "b.txt").read_text() == "red 3\n"  # no clash: the usual name
    assert not (folder / "a.txt").exists()
    again, _ = run_to(Sidecars(), [folder])
    assert (again.captioned, again.skipped) == (0, 3)


def test_csv_resume_reads_records_so_a_path_with_a_newline_is_not_repeated(tmp_path):
    folder = tmp_path / "photos"
    png(folder / "line\nbreak.png", 1)
    png(folder / "plain.png", 2)
    out = tmp_path / "captions.csv"
    first, _ = run_to(AppendFile(out, "csv"), [folder])
    assert first.captioned == 2
    again, _ = run_to(AppendFile(out, "csv"), [folder])
    assert (again.captioned, again.skipped) == (0, 2)
    rows = list(csv.DictReader(io.StringIO(out.read_text(), newline="")))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.iterdir())


def test_a_csv_record_torn_inside_a_quoted_newline_is_cut(tmp_path):
    folder = tmp_path / "photos"
    png(folder / "a.png", 1)
    png(folder / "b\nc.png", 2)
    out = tmp_path / "captions.csv"
    run_to(AppendFile(out, "csv"), [folder], batch_size=1)
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.index(b"\nc.png") + 1])  # killed right after the newline
    sink = AppendFile(out, "csv")
    assert sink.torn and len(sink.done) == 1
    stats, _ = run_to(sink, [folder])
    assert (stats.captioned, stats.skipped) == (1, 1)
    assert out.read_bytes() == whole


def test_an_old_jsonl_with_image_keys_is_still_resumed(tmp_path):
    png(tmp_path / "photos" / "a.png", 1)
    out = tmp_path / "old.jsonl"
    key = str(tmp_path / "photos" / "a.png")
    out.write_text(json.dumps({"image": key, "caption": "x", "score": -1.0}) + "\n")
    stats, _ = run_to(AppendFile(out, "jsonl"), [tmp_path / "photos"])
    assert (stats.captioned, stats.skipped) == (0, 1)


# ------------------------------------------------------------------------------------------
# item 8: a full disk is one line and leaves whole chunks only
# ------------------------------------------------------------------------------------------


def test_disk_full_is_one_error_and_leaves_only_whole_chunks(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    for i in range(4):
        png(folder / f"{i}.png", i)
    out = tmp_path / "captions.jsonl"
    real_write = os.write
    writes = []

    def write(fd, data):
        writes.append(len(data))
        if len(writes) == 2:  # the second chunk: half of it lands, then the disk is full
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(bulk_writers.os, "write", write)
    with pytest.raises(DataError, match="No space left"):
        run_to(AppendFile(out, "jsonl"), [folder], batch_size=2)
    monkeypatch.setattr(bulk_writers.os, "write", real_write)
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith("\n") for line in lines)  # the first chunk
    stats, _ = run_to(AppendFile(out, "jsonl"), [folder], batch_size=2)
    assert (stats.captioned, stats.skipped) == (2, 2)


# ------------------------------------------------------------------------------------------
# item 12: a tar member's size is checked before it is read
# ------------------------------------------------------------------------------------------


def test_an_oversized_tar_member_is_reported_without_being_read(tmp_path, monkeypatch):
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in [("big.png", b"\0" * 4096), ("small.png", png_bytes(7))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(bulk_inputs, "MAX_MEMBER_BYTES", 1024)
    extracted: list[str] = []
    real_extract = tarfile.TarFile.extractfile

    def extractfile(self, member):
        extracted.append(getattr(member, "name", member))
        return real_extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    sink = Collect()
    stats, reported = run_to(sink, [shard])
    assert (stats.captioned, stats.failed) == (1, 1)
    assert "big.png" in reported[0] and "over the limit" in reported[0]
    assert extracted == ["small.png"]  # the big member was never read


def test_a_damaged_tar_shard_is_reported_and_the_other_inputs_go_on(tmp_path):
    png(tmp_path / "photos" / "a.png", 1)
    (tmp_path / "photos" / "junk.tar").write_bytes(b"not a tar at all" * 100)
    stats, reported = run_to(Collect(), [tmp_path / "photos", tmp_path / "photos" / "junk.tar"])
    assert (stats.captioned, stats.failed) == (1, 1) and "junk.tar" in reported[0]


def test_read_shards_leaves_out_an_oversized_member_unread(tmp_path, monkeypatch):
    from captioner.data import webdataset_source

    shard = tmp_path / "data" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as archive:
        for name, data in [
            ("0001.png", png_bytes(1)),
            ("0001.txt", b"a red square"),
            ("0002.png", b"\0" * 8192),
            ("0002.txt", b"a huge thing"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(webdataset_source, "MAX_MEMBER_BYTES", 4096)
    captions, index = webdataset_source.read_shards([shard], shard.parent)
    assert list(captions.captions) == ["00000.tar/0001.png"]
    assert any("over" in reason for reason in captions.bad)


# ------------------------------------------------------------------------------------------
# one vocabulary: the text format marks out-of-domain photos; concepts as REST writes them
# ------------------------------------------------------------------------------------------


def test_text_marks_out_of_domain_and_records_use_path_and_rest_concepts(tmp_path):
    png(tmp_path / "photos" / "a.png", 1)
    png(tmp_path / "photos" / "b.png", 250)  # out of domain for Fake
    stream = io.StringIO()
    run_to(Stream(stream, "text"), [tmp_path / "photos"])
    first, second = stream.getvalue().splitlines()
    assert first.endswith("\tred 1") and second.endswith("\tred 250  [out of domain]")
    collected = Collect()
    run_to(collected, [tmp_path / "photos"])
    record = collected.records[1]
    assert record["path"].endswith("b.png") and "image" not in record
    assert record["concepts"] == [{"word": "dog", "probability": 0.75}]
    assert record["out_of_domain"] is True


def test_a_listed_name_too_long_for_the_system_is_reported_not_a_traceback(tmp_path):
    png(tmp_path / "a.png", 1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.png'}\n{tmp_path / ('x' * 5000)}.png\n")
    for sink in (Sidecars(), Collect()):
        stats, reported = run_to(sink, [], files_from=[listing])
        assert (stats.captioned, stats.failed) == (1, 1) and len(reported) == 1
