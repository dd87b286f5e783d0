"""Web-scale dataset layouts: WebDataset tar shards (read in place), CSV/TSV/JSONL manifests and
sidecar-caption folders; bad rows are counted and left out, never fatal."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from webdataset import TarWriter

from captioner.data.images import load_image
from captioner.data.prepare import PreparedData, PrepareSettings, prepare
from captioner.data.synthetic import make_shapes_dataset
from captioner.data.webdataset_source import ShardSource
from captioner.errors import DataError

SETTINGS = PrepareSettings(num_words=None, min_count=1, test_size=0.2, val_size=0.2, seed=0)
JPEG_START = b"\xff\xd8\xff\xe0"


def _shapes(root: Path, num_images: int = 24) -> tuple[Path, dict[str, list[str]]]:
    """A one-object shapes dataset: images folder and {file name: captions}."""
    data = make_shapes_dataset(root, num_images=num_images, seed=2, objects=1)
    captions: dict[str, list[str]] = {}
    with open(data / "captions.txt", encoding="utf-8", newline="") as handle:
        for name, caption in list(csv.reader(handle))[1:]:
            captions.setdefault(name, []).append(caption)
    return data / "images", captions


def _write_shards(out: Path, images: Path, captions: dict, per_shard: int, bad: bool) -> Path:
    """img2dataset-style shards (KEY.png + KEY.txt [+ KEY.json]); with ``bad``, the last shard
    also holds a sample with an empty caption, one with a corrupt image, one with no caption."""
    out.mkdir(parents=True)
    names = sorted(captions)
    chunks = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    for s, chunk in enumerate(chunks):
        with TarWriter(str(out / f"{s:05d}.tar")) as sink:
            for name in chunk:
                sample = {"__key__": Path(name).stem, "png": (images / name).read_bytes()}
                if s % 2:  # captions from .json in odd shards, from .txt in even ones
                    sample["json"] = json.dumps({"caption": captions[name][0]}).encode()
                else:
                    sample["txt"] = "\n".join(captions[name]).encode()
                sink.write(sample)
            if bad and s == len(chunks) - 1:
                png = (images / chunk[0]).read_bytes()
                sink.write({"__key__": "empty_caption", "png": png, "txt": b"  \n"})
                sink.write({"__key__": "corrupt", "jpg": JPEG_START + b"junk" * 50, "txt": b"x"})
                sink.write({"__key__": "no_caption", "png": png, "json": b"{}"})
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return _shapes(tmp_path_factory.mktemp("ds-shapes"))


def test_webdataset_prepare_features_train_evaluate(shapes, tmp_path):
    """End to end on tar shards, nothing unpacked: prepare (bad samples counted), features read
    from the shards (identical to encoding the original files), one epoch, evaluate."""
    from captioner.evaluation.evaluate import evaluate
    from captioner.features.cache import load_cache
    from captioner.features.encoders import preprocess
    from captioner.features.onnx import FeatureExtractor
    from captioner.features.pipeline import ensure_features
    from captioner.training.config import TrainConfig
    from captioner.training.loop import train

    images, captions = shapes
    data = _write_shards(tmp_path / "shards", images, captions, per_shard=10, bad=True)
    work = tmp_path / "work"
    prepared = prepare(data, work, SETTINGS)
    assert prepared.format == "webdataset"
    assert len(prepared.captions) == len(captions)
    assert prepared.bad == {"empty caption": 2, "corrupt image": 1}
    name = sorted(captions)[0]
    assert prepared.captions[f"00000.tar/{name}"] == captions[name]
    assert (
        prepared.captions[f"00001.tar/{sorted(captions)[10]}"] == captions[sorted(captions)[10]][:1]
    )
    assert isinstance(PreparedData.load(work).image_source, ShardSource)
    assert prepare(data, work, SETTINGS).bad == prepared.bad  # rerun: reused, same report

    extractor = FeatureExtractor("efficientnet-lite0", "auto", threads=1)
    dirs = ensure_features(PreparedData.load(work), progress=False, batch_size=8)
    names, features = load_cache(dirs[0])  # (N, P, C)
    assert sorted(names) == sorted(prepared.captions)
    first = [n for n in names[:3]]
    originals = [load_image(images / n.split("/", 1)[1]) for n in first]
    direct = extractor(preprocess(originals, extractor.spec)).astype(np.float16)
    np.testing.assert_allclose(features[:3].float().numpy(), direct.astype(np.float32), atol=1e-2)
    assert sorted(p.suffix for p in data.iterdir()) == [".tar"] * 3  # nothing unpacked

    cfg = TrainConfig(
        work_dir=str(work),
        run_dir=str(tmp_path / "run"),
        num_words=0,
        min_count=1,
        embed_dim=16,
        hidden_dim=24,
        attention_dim=16,
        context_dim=16,
        epochs=1,
        batch_size=8,
        threads=1,
        val_images=4,
        patience=0,
    )
    best = train(cfg)
    report = evaluate(
        best,
        work,
        split="test",
        beam_size=1,
        use_java=False,
        out_dir=tmp_path / "eval",
        progress=False,
    )
    assert report["n_images"] == len(prepared.splits.test) > 0
    cold = evaluate(  # without the cache: images decoded straight from the shards
        best,
        work,
        split="test",
        beam_size=1,
        use_java=False,
        out_dir=tmp_path / "eval-cold",
        use_cache=False,
        progress=False,
    )
    assert cold["n_images"] == report["n_images"]


def test_truncated_shard_keeps_the_samples_before_the_damage(shapes, tmp_path):
    images, captions = shapes
    data = _write_shards(tmp_path / "shards", images, captions, per_shard=12, bad=False)
    shard = data / "00001.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])  # cut in the middle of a member
    (data / "00002.tar").write_bytes(b"not a tar file at all" * 30)
    prepared = prepare(data, tmp_path / "work", SETTINGS)
    from_first = [n for n in prepared.captions if n.startswith("00000.tar/")]
    from_cut = [n for n in prepared.captions if n.startswith("00001.tar/")]
    assert len(from_first) == 12 and 0 < len(from_cut) < 12
    assert prepared.bad.get("unreadable shard") == 1
    source = prepared.image_source
    assert all(load_image(source.locate(n)).shape == (96, 96, 3) for n in from_cut)


def test_shard_source_reads_members_in_place(shapes, tmp_path):
    images, captions = shapes
    data = _write_shards(tmp_path / "shards", images, captions, per_shard=30, bad=False)
    source = prepare(data, tmp_path / "work", SETTINGS).image_source
    name = sorted(captions)[5]
    assert source.read(f"00000.tar/{name}") == (images / name).read_bytes()
    assert source.size(f"00000.tar/{name}") == (images / name).stat().st_size
    assert not source.exists("00000.tar/nothing.png")
    with pytest.raises(FileNotFoundError):
        source.read("00000.tar/nothing.png")


def _manifest_dir(root: Path, images: Path, captions: dict) -> Path:
    """A folder with imgs/ (every image, plus one corrupt), for manifests to point into."""
    root.mkdir(parents=True)
    shutil.copytree(images, root / "imgs")
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_manifests_count_bad_rows(shapes, tmp_path, kind):
    images, captions = shapes
    root = _manifest_dir(tmp_path / "data", images, captions)
    good = sorted(captions)[:10]
    rows = [(f"imgs/{n}", c) for n in good for c in captions[n]]
    rows += [("imgs/missing.png", "a lost shape"), ("imgs/broken.png", "a broken shape")]
    rows += [(f"imgs/{good[0]}", "   ")]  # empty caption
    path = root / f"pairs.{kind}"
    if kind == "jsonl":
        lines = [json.dumps({"image": i, "caption": c}) for i, c in rows]
        lines += ["{not json", json.dumps({"image": "imgs/x.png"})]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        delimiter = "\t" if kind == "tsv" else ","
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter=delimiter)
            writer.writerow(["filepath", "caption"])
            writer.writerows(rows)
            writer.writerow(["too", "many", "cells"])
    prepared = prepare(root, tmp_path / "work", SETTINGS)
    assert prepared.format == "manifest"
    assert sorted(prepared.captions) == [f"imgs/{n}" for n in good]
    assert prepared.captions[f"imgs/{good[1]}"] == captions[good[1]]
    assert prepared.bad["missing image"] == 1
    assert prepared.bad["empty caption"] == 1
    assert prepared.bad["malformed row"] == (2 if kind == "jsonl" else 1)
    assert prepared.bad["corrupt image"] == 1
    assert prepare(root, tmp_path / "work", SETTINGS).captions == prepared.captions  # reused


def test_manifest_of_bare_names_finds_the_images_folder(shapes, tmp_path):
    images, captions = shapes
    root = tmp_path / "data"
    root.mkdir()
    shutil.copytree(images, root / "images")
    with open(root / "list.jsonl", "w", encoding="utf-8") as handle:
        for name in sorted(captions)[:6]:
            handle.write(json.dumps({"file_name": name, "captions": captions[name]}) + "\n")
    prepared = prepare(root, tmp_path / "work", SETTINGS)
    assert prepared.images_dir == (root / "images").resolve()
    assert len(prepared.captions) == 6 and prepared.bad == {}


def test_sidecar_folder(shapes, tmp_path):
    images, captions = shapes
    root = tmp_path / "files"
    names = sorted(captions)[:8]
    for i, name in enumerate(names):
        folder = root / f"{i // 4:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / name, folder / name)
        if i == 0:
            continue  # no sidecar
        text = "" if i == 1 else "\n".join(captions[name])
        (folder / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    prepared = prepare(root, tmp_path / "work", SETTINGS)
    assert prepared.format == "sidecar"
    assert len(prepared.captions) == 6
    assert prepared.captions[f"00001/{names[5]}"] == captions[names[5]]
    assert prepared.bad == {"no caption file": 1, "empty caption": 1}


def test_nothing_usable_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.csv").write_text("image,caption\nnope.png,a shape\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable image with a caption.*1 missing image"):
        prepare(data, tmp_path / "work", SETTINGS)
    assert not (tmp_path / "work" / "dataset.json").exists()
    (data / "pairs.csv").unlink()
    with pytest.raises(DataError, match="no dataset found"):
        prepare(data, tmp_path / "work", SETTINGS)


def test_prepare_cli_reports_bad_rows(shapes, tmp_path):
    from captioner.cli.main import app

    images, captions = shapes
    data = _write_shards(tmp_path / "shards", images, captions, per_shard=30, bad=True)
    args = ["prepare", "--data-dir", data, "--work-dir", tmp_path / "work", "--min-count", "1"]
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"webdataset: {len(captions)} images" in result.output
    assert "left out 3 bad rows: " in result.output
    assert "2 empty caption" in result.output
    assert "00000.tar/corrupt:" in result.output


def test_image_problem_finds_truncated_and_corrupt_images(shapes, tmp_path):
    import io

    from PIL import Image

    from captioner.data.image_source import image_problem

    images, captions = shapes
    buffer = io.BytesIO()
    Image.open(images / sorted(captions)[0]).convert("RGB").save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    assert image_problem(jpeg) is None
    assert image_problem(jpeg[: len(jpeg) // 2]) == "truncated image"
    assert image_problem(b"hello") == "corrupt image"
    assert image_problem(b"") == "empty image"
    assert image_problem((images / sorted(captions)[0]).read_bytes()) is None


def test_shard_fingerprint_follows_member_content(shapes, tmp_path):
    from captioner.features.cache import dataset_fingerprint

    images, captions = shapes
    data = _write_shards(tmp_path / "shards", images, captions, per_shard=30, bad=False)
    prepared = prepare(data, tmp_path / "work", SETTINGS)
    names = sorted(prepared.captions)
    before = dataset_fingerprint(prepared.image_source, names)
    assert before == dataset_fingerprint(ShardSource.load(tmp_path / "work"), names)
    shard = data / "00000.tar"
    raw = bytearray(shard.read_bytes())
    offset = prepared.image_source.members[names[0]][1]
    raw[offset + 100] ^= 0xFF  # one byte of the first image, same size
    shard.write_bytes(bytes(raw))
    assert dataset_fingerprint(ShardSource.load(tmp_path / "work"), names) != before
