"""Splits (official lists, Karpathy JSON, seeded random by image), the vocabulary, and
`prepare` (writes the work dir once, refuses to mix settings, builds the vocab from train only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.captions import CaptionSet
from captioner.data.prepare import PreparedData, PrepareSettings, find_images_dir, prepare
from captioner.data.splits import (
    OFFICIAL_LIST_FILES,
    Splits,
    SplitSettings,
    make_splits,
    random_split,
    read_official_lists,
)
from captioner.data.vocab import SPECIAL_TOKENS, Vocabulary, tokenize
from captioner.errors import DataError, VocabularyError


def caption_set(n: int, per_image: int = 2) -> CaptionSet:
    return CaptionSet(
        {
            f"img_{i:03d}.jpg": [f"caption {j} of image {i}" for j in range(per_image)]
            for i in range(n)
        }
    )


def write_official(data_dir: Path, train, val, test) -> None:
    for name, images in (("train", train), ("val", val), ("test", test)):
        (data_dir / OFFICIAL_LIST_FILES[name]).write_text("\n".join(images) + "\n\n")


# ---- splits --------------------------------------------------------------------------------
def test_official_lists_are_used_when_present(tmp_path, capsys):
    captions = caption_set(10)
    names = list(captions.captions)
    write_official(tmp_path, names[:6] + ["no_caption.jpg"], names[6:8], names[8:])
    splits = make_splits(captions, tmp_path, test_size=0.5, val_size=0.3, seed=3)
    assert splits.settings == SplitSettings("official")
    assert splits.train == names[:6]  # images without captions are left out
    assert splits.val == names[6:8]
    assert splits.test == names[8:]
    assert "1 images in the official lists have no captions" in capsys.readouterr().out


def test_official_lists_win_over_karpathy_split(tmp_path):
    captions = caption_set(4)
    names = list(captions.captions)
    captions.splits = {"train": names[2:], "val": names[:1], "test": names[1:2]}
    write_official(tmp_path, names[:2], names[2:3], names[3:])
    splits = make_splits(captions, tmp_path)
    assert splits.settings.method == "official"
    assert (splits.train, splits.val, splits.test) == (names[:2], names[2:3], names[3:])


def test_official_lists_need_all_three_files(tmp_path):
    captions = caption_set(6)
    names = list(captions.captions)
    write_official(tmp_path, names[:4], names[4:5], names[5:])
    (tmp_path / OFFICIAL_LIST_FILES["val"]).unlink()
    assert read_official_lists(tmp_path) is None
    assert make_splits(captions, tmp_path, seed=0).settings.method == "random"


def test_read_official_lists_strips_blank_lines(tmp_path):
    write_official(tmp_path, ["a.jpg", " b.jpg "], ["c.jpg"], [])
    assert read_official_lists(tmp_path) == {
        "train": ["a.jpg", "b.jpg"],
        "val": ["c.jpg"],
        "test": [],
    }


def test_official_lists_without_any_captioned_train_image(tmp_path):
    captions = caption_set(3)
    write_official(tmp_path, ["other.jpg"], list(captions.captions)[:1], [])
    with pytest.raises(DataError, match="official training images") as info:
        make_splits(captions, tmp_path)
    assert str(tmp_path) in str(info.value)


def test_use_official_false_ignores_lists_and_karpathy(tmp_path):
    captions = caption_set(10)
    names = list(captions.captions)
    captions.splits = {"train": names[:8], "val": names[8:9], "test": names[9:]}
    write_official(tmp_path, names[:8], names[8:9], names[9:])
    splits = make_splits(
        captions, tmp_path, test_size=0.2, val_size=0.2, seed=5, use_official=False
    )
    assert splits.settings == SplitSettings("random", 0.2, 0.2, 5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)


def test_karpathy_split_used_from_caption_file(tmp_path):
    captions = caption_set(5)
    names = list(captions.captions)
    captions.splits = {"train": names[:3], "test": names[3:]}
    splits = make_splits(captions, tmp_path, test_size=0.5, seed=9)
    assert splits.settings == SplitSettings("karpathy")
    assert splits.train == names[:3]
    assert splits.val == []
    assert splits.test == names[3:]


def test_random_split_is_seeded_and_by_image(tmp_path):
    captions = caption_set(50, per_image=5)
    a = make_splits(captions, tmp_path, test_size=0.2, val_size=0.1, seed=1)
    b = make_splits(captions, tmp_path, test_size=0.2, val_size=0.1, seed=1)
    c = make_splits(captions, tmp_path, test_size=0.2, val_size=0.1, seed=2)
    assert a.settings == SplitSettings("random", 0.2, 0.1, 1)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert (a.train, a.val, a.test) != (c.train, c.val, c.test)
    for s in (a, c):
        assert (len(s.train), len(s.val), len(s.test)) == (35, 5, 10)
        sets = [set(s.train), set(s.val), set(s.test)]
        # each image in exactly one split, so all its captions are in that split
        assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
        assert sets[1].isdisjoint(sets[2])
        assert sets[0] | sets[1] | sets[2] == set(captions.captions)
        assert len(s.train) == len(sets[0])  # no duplicates
    # the order of the input does not matter, only the set of images and the seed
    assert random_split(list(reversed(list(captions.captions))), 0.2, 0.1, 1) == (
        a.train,
        a.val,
        a.test,
    )


@pytest.mark.parametrize(
    "n, test_size, val_size, sizes",
    [
        (10, 0.1, 0.1, (8, 1, 1)),
        (7, 0.0, 0.0, (7, 0, 0)),
        (20, 0.25, 0.0, (15, 0, 5)),
        (9, 0.3, 0.2, (4, 2, 3)),
    ],
)
def test_random_split_sizes(n, test_size, val_size, sizes):
    images = [f"{i}.jpg" for i in range(n)]
    train, val, test = random_split(images, test_size, val_size, seed=0)
    assert len(test) == round(n * test_size)
    assert len(val) == round(n * val_size)
    assert len(train) == n - len(test) - len(val)
    assert (len(train), len(val), len(test)) == sizes
    assert sorted(train + val + test) == sorted(images)


@pytest.mark.parametrize(
    "test_size, val_size",
    [(-0.1, 0.1), (0.1, -0.1), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.7, 0.4)],
)
def test_random_split_invalid_sizes(test_size, val_size):
    with pytest.raises(DataError, match="test_size"):
        random_split(["a", "b", "c"], test_size, val_size, seed=0)


def test_make_splits_invalid_sizes(tmp_path):
    with pytest.raises(DataError):
        make_splits(caption_set(5), tmp_path, test_size=0.6, val_size=0.6)


def test_splits_getitem_and_json_round_trip():
    splits = Splits(SplitSettings("random", 0.2, 0.1, 4), ["a", "b"], ["c"], ["d"])
    assert splits["train"] == ["a", "b"] and splits["val"] == ["c"] and splits["test"] == ["d"]
    with pytest.raises(DataError, match="unknown split 'dev'"):
        splits["dev"]
    data = json.loads(json.dumps(splits.to_json()))
    assert data["settings"] == {"method": "random", "test_size": 0.2, "val_size": 0.1, "seed": 4}
    assert Splits.from_json(data) == splits


# ---- vocabulary ----------------------------------------------------------------------------
def test_tokenize():
    assert tokenize("A Dog's  ball, RED!") == ["a", "dogs", "ball", "red"]
    assert tokenize("two-dogs run 3 times.") == ["two", "dogs", "run", "3", "times"]
    assert tokenize("  ...  ") == []


def test_specials_come_first_in_order():
    vocab = Vocabulary.build(["a dog", "a cat"])
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert list(SPECIAL_TOKENS) == vocab.itos[:4]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.stoi[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_build_orders_by_frequency_then_alphabet():
    captions = ["b a c", "a b", "a d", "z y"]  # a:3, b:2, c:1, d:1, y:1, z:1
    vocab = Vocabulary.build(captions, num_words=None, min_count=1)
    assert vocab.itos[4:] == ["a", "b", "c", "d", "y", "z"]
    assert len(vocab) == 10
    # the same captions in another order give the same ids
    assert Vocabulary.build(list(reversed(captions)), num_words=None).itos == vocab.itos


def test_build_top_k_and_min_count():
    captions = ["a a a a b b b c c d", "e"]
    assert Vocabulary.build(captions, num_words=2, min_count=1).itos[4:] == ["a", "b"]
    assert Vocabulary.build(captions, num_words=None, min_count=2).itos[4:] == ["a", "b", "c"]
    assert Vocabulary.build(captions, num_words=1, min_count=3).itos[4:] == ["a"]
    assert Vocabulary.build(captions, num_words=0).itos == list(SPECIAL_TOKENS)
    assert Vocabulary.build(captions, num_words=-5).itos == list(SPECIAL_TOKENS)
    assert Vocabulary.build(captions, num_words=None, min_count=100).itos == list(SPECIAL_TOKENS)


def test_build_never_duplicates_special_words():
    vocab = Vocabulary.build(["<unk> a", "unk pad start"], num_words=None)
    assert len(set(vocab.itos)) == len(vocab.itos)
    assert vocab.itos[:4] == list(SPECIAL_TOKENS)


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(["a dog runs on the grass", "a cat sleeps"], num_words=None)
    ids = vocab.encode("A dog runs on the grass.")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert all(4 <= i < len(vocab) for i in ids[1:-1])
    assert vocab.decode(ids) == "a dog runs on the grass"
    assert vocab.decode_ids(ids) == ["a", "dog", "runs", "on", "the", "grass"]
    assert vocab.encode("a cat", add_special=False) == [vocab.stoi["a"], vocab.stoi["cat"]]


def test_unknown_words_encode_to_unk():
    vocab = Vocabulary.build(["a dog"], num_words=None)
    assert vocab.encode("a zebra dog", add_special=False) == [
        vocab.stoi["a"],
        vocab.unk_id,
        vocab.stoi["dog"],
    ]
    assert vocab.decode(vocab.encode("a zebra")) == "a <unk>"
    assert "zebra" not in vocab and "dog" in vocab


def test_decode_stops_at_end_and_skips_pad_and_start():
    vocab = Vocabulary.build(["a dog runs"], num_words=None)
    a, dog, runs = (vocab.stoi[w] for w in ("a", "dog", "runs"))
    assert vocab.decode([1, a, 0, dog, 1, runs, 2, a, dog]) == "a dog runs"
    assert vocab.decode([2, a]) == ""
    assert vocab.decode([]) == ""
    assert vocab.decode(np.array([1, a, 2])) == "a"  # numpy ints work too


@pytest.mark.parametrize("bad", [-1, 7, 1000])
def test_decode_out_of_range(bad):
    vocab = Vocabulary.build(["a dog runs"], num_words=None)  # 7 words
    assert len(vocab) == 7
    with pytest.raises(VocabularyError, match=f"token id {bad} is out of range"):
        vocab.decode([1, 4, bad])


def test_constructor_rejects_bad_word_lists():
    with pytest.raises(VocabularyError, match="must start with"):
        Vocabulary(["<start>", "<pad>", "<end>", "<unk>", "a"])
    with pytest.raises(VocabularyError, match="must start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(VocabularyError, match="duplicate"):
        Vocabulary([*SPECIAL_TOKENS, "a", "b", "a"])


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(["the quick brown fox", "the lazy dog"], num_words=None)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert data["special_tokens"] == list(SPECIAL_TOKENS)
    assert data["itos"] == vocab.itos
    loaded = Vocabulary.load(path)
    assert loaded.itos == vocab.itos and loaded.stoi == vocab.stoi
    assert loaded.encode("the brown cat") == vocab.encode("the brown cat")
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary behind


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[1, 2, 3]",
        '{"words": ["<pad>"]}',
        '{"itos": null}',
        '{"itos": ["a", "b"]}',
        '{"itos": ["<pad>", "<start>", "<end>", "<unk>", "x", "x"]}',
        '{"itos": {"<pad>": 0}}',
    ],
)
def test_load_malformed_vocab(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(VocabularyError) as info:
        Vocabulary.load(path)
    assert "vocabulary" in str(info.value)


def test_load_missing_vocab(tmp_path):
    with pytest.raises(VocabularyError, match="not found") as info:
        Vocabulary.load(tmp_path / "missing.json")
    assert "missing.json" in str(info.value)


# ---- prepare -------------------------------------------------------------------------------
def make_dataset(root: Path, captions: dict[str, list[str]], present=None, official=None) -> Path:
    """A tiny Flickr-style dataset: images/*.png (those in ``present``) and captions.txt."""
    images = root / "images"
    images.mkdir(parents=True)
    present = list(captions) if present is None else present
    for i, name in enumerate(present):
        Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(images / name)
    lines = ["image,caption"] + [f"{n},{c}" for n, caps in captions.items() for c in caps]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    if official:
        write_official(root, *official)
    return root


SMALL = {
    "a.png": ["a red dog runs", "a dog is red"],
    "b.png": ["a blue cat sleeps", "a cat on a mat"],
    "c.png": ["a green bird flies", "a bird in the sky"],
    "d.png": ["a zebra eats grass", "the zebra grazes"],  # only in the test split
}


def test_prepare_writes_work_dir_and_builds_vocab_from_train_only(tmp_path, capsys):
    data = make_dataset(
        tmp_path / "data", SMALL, official=(["a.png", "b.png"], ["c.png"], ["d.png"])
    )
    work = tmp_path / "work"
    settings = PrepareSettings(num_words=None, min_count=1)
    prepared = prepare(data, work, settings)
    for name in ("dataset.json", "captions.json", "splits.json", "vocab.json"):
        assert (work / name).is_file(), name
    assert prepared.work_dir == work
    assert prepared.images_dir == (data / "images").resolve()
    assert prepared.captions == SMALL
    assert prepared.splits.settings.method == "official"
    assert prepared.splits.train == ["a.png", "b.png"]
    assert prepared.splits.val == ["c.png"] and prepared.splits.test == ["d.png"]
    vocab = prepared.vocab
    train_words = {w for n in ("a.png", "b.png") for c in SMALL[n] for w in tokenize(c)}
    assert set(vocab.itos[4:]) == train_words
    for word in ("zebra", "grazes", "bird", "green"):  # val/test-only words are not in it
        assert word not in vocab
    assert vocab.itos[4] == "a"  # the most frequent training word
    info = json.loads((work / "dataset.json").read_text())
    assert info["settings"] == {
        "num_words": None,
        "min_count": 1,
        "test_size": 0.1,
        "val_size": 0.1,
        "seed": 0,
        "use_official_split": True,
    }
    assert info["caption_file"] == str((data / "captions.txt").resolve())
    assert info["images_dir"] == str((data / "images").resolve())
    assert json.loads((work / "captions.json").read_text()) == SMALL
    assert Splits.from_json(json.loads((work / "splits.json").read_text())) == prepared.splits
    assert Vocabulary.load(work / "vocab.json").itos == vocab.itos
    loaded = PreparedData.load(work)
    assert loaded.captions == prepared.captions and loaded.splits == prepared.splits
    assert loaded.vocab.itos == vocab.itos and loaded.images_dir == prepared.images_dir


def test_prepare_rerun_same_settings_reuses(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", SMALL)
    work = tmp_path / "work"
    settings = PrepareSettings(num_words=None, min_count=1, test_size=0.25, val_size=0.25)
    first = prepare(data, work, settings)
    stamps = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("captions re-read on a rerun with the same settings")

    monkeypatch.setattr("captioner.data.prepare.read_captions", boom)
    again = prepare(data, work, settings)
    assert again.splits == first.splits
    assert again.captions == first.captions
    assert again.vocab.itos == first.vocab.itos
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == stamps


def test_prepare_rerun_with_other_settings_refuses_then_force_redoes(tmp_path):
    data = make_dataset(tmp_path / "data", SMALL)
    work = tmp_path / "work"
    first = prepare(
        data,
        work,
        PrepareSettings(num_words=None, min_count=1, test_size=0.25, val_size=0.25, seed=0),
    )
    other = PrepareSettings(num_words=None, min_count=1, test_size=0.25, val_size=0.25, seed=1)
    with pytest.raises(DataError, match="--force") as info:
        prepare(data, work, other)
    assert "settings" in str(info.value)
    saved = json.loads((work / "dataset.json").read_text())
    assert saved["settings"]["seed"] == 0  # untouched
    redone = prepare(
        data,
        work,
        PrepareSettings(num_words=3, min_count=1, test_size=0.5, val_size=0.25, seed=1),
        force=True,
    )
    assert len(redone.splits.test) == 2 and len(redone.splits.val) == 1
    assert len(redone.vocab) == 4 + 3
    assert json.loads((work / "dataset.json").read_text())["settings"]["num_words"] == 3
    assert PreparedData.load(work).splits == redone.splits
    assert first.splits.settings.seed == 0 and redone.splits.settings.seed == 1


def test_prepare_leaves_out_images_missing_on_disk(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", SMALL, present=["a.png", "b.png", "d.png"])
    prepared = prepare(
        data,
        tmp_path / "work",
        PrepareSettings(num_words=None, min_count=1, test_size=0.0, val_size=0.0),
    )
    assert set(prepared.captions) == {"a.png", "b.png", "d.png"}
    assert sorted(prepared.splits.train) == ["a.png", "b.png", "d.png"]
    assert "bird" not in prepared.vocab and "zebra" in prepared.vocab
    assert "1 captioned images are not in" in capsys.readouterr().out


def test_prepare_no_captioned_image_on_disk(tmp_path):
    data = make_dataset(tmp_path / "data", SMALL, present=["other.png"])
    with pytest.raises(DataError, match="none of the 4 captioned images"):
        prepare(data, tmp_path / "work")
    assert not (tmp_path / "work" / "dataset.json").exists()


def test_prepare_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="data directory not found") as info:
        prepare(tmp_path / "nope", tmp_path / "work")
    assert str(tmp_path / "nope") in str(info.value)


def test_prepare_without_caption_file_or_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no caption file"):
        prepare(tmp_path / "empty", tmp_path / "work")
    (tmp_path / "empty" / "captions.txt").write_text("image,caption\na.png,x\n")
    with pytest.raises(DataError, match="no image folder"):
        prepare(tmp_path / "empty", tmp_path / "work")


def test_prepared_data_load_requires_dataset_json(tmp_path):
    with pytest.raises(DataError, match="not a prepared work directory"):
        PreparedData.load(tmp_path)


def test_find_images_dir_prefers_images_folder(tmp_path):
    (tmp_path / "Images").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "Images" / "x.jpg")
    assert find_images_dir(tmp_path) == (tmp_path / "Images").resolve()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here")
    assert find_images_dir(tmp_path) == (tmp_path / "Images").resolve()


def test_prepare_shapes_random_split(shapes_dir, tmp_path):
    settings = PrepareSettings(num_words=None, min_count=1, test_size=0.2, val_size=0.1, seed=3)
    prepared = prepare(shapes_dir, tmp_path / "work", settings)
    splits = prepared.splits
    assert splits.settings == SplitSettings("random", 0.2, 0.1, 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (42, 6, 12)
    assert set(splits.train) | set(splits.val) | set(splits.test) == set(prepared.captions)
    assert len(set(splits.train + splits.val + splits.test)) == 60
    again = prepare(shapes_dir, tmp_path / "work2", settings)
    assert again.splits == splits  # same seed, same split
    other = prepare(
        shapes_dir,
        tmp_path / "work3",
        PrepareSettings(num_words=None, min_count=1, test_size=0.2, val_size=0.1, seed=4),
    )
    assert other.splits.test != splits.test
    train_words = {w for n in splits.train for c in prepared.captions[n] for w in tokenize(c)}
    assert set(prepared.vocab.itos[4:]) == train_words
