"""Caption file readers (Flickr8k CSV and token file, Karpathy JSON, COCO JSON), format
auto-detection, errors that name the file, and finding a dataset's caption file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from captioner.data.captions import (
    CaptionSet,
    find_caption_file,
    read_captions,
    read_coco_json,
    read_flickr_csv,
    read_flickr_token,
    read_karpathy_json,
)
from captioner.errors import CaptionerError, DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, data) -> Path:
    return write(path, json.dumps(data))


# ---- Flickr8k CSV (Kaggle captions.txt) ----------------------------------------------------
CSV_TEXT = (
    "image,caption\n"
    "1000_a.jpg,A child in a pink dress .\n"
    '1000_a.jpg,"A girl, going into a building ."\n'
    "2000_b.jpg,  A black dog and a spotted dog are fighting  \n"
    "\n"
    "1000_a.jpg,A little girl climbing .\n"
)


def test_flickr_csv_groups_captions_by_image_in_file_order(tmp_path):
    result = read_captions(write(tmp_path / "captions.txt", CSV_TEXT))
    assert isinstance(result, CaptionSet)
    assert list(result.captions) == ["1000_a.jpg", "2000_b.jpg"]
    assert result.captions["1000_a.jpg"] == [
        "A child in a pink dress .",
        "A girl, going into a building .",  # csv-quoted comma kept inside the caption
        "A little girl climbing .",
    ]
    # surrounding whitespace is stripped
    assert result.captions["2000_b.jpg"] == ["A black dog and a spotted dog are fighting"]
    assert result.num_captions == 4
    assert result.splits == {}  # the CSV carries no split
    assert result.source == str(tmp_path / "captions.txt")


def test_flickr_csv_written_by_csv_module_round_trips(tmp_path):
    rows = [
        ("x.jpg", 'He said "hi", then left'),
        ("y.jpg", "plain caption"),
        ("x.jpg", "a, b, and c"),
    ]
    path = tmp_path / "captions.txt"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    result = read_flickr_csv(path)
    assert result.captions == {
        "x.jpg": ['He said "hi", then left', "a, b, and c"],
        "y.jpg": ["plain caption"],
    }


def test_flickr_csv_unquoted_comma_is_rejoined(tmp_path):
    result = read_captions(write(tmp_path / "captions.txt", "image,caption\na.jpg,one, two\n"))
    assert result.captions == {"a.jpg": ["one, two"]}


def test_flickr_csv_header_is_case_and_space_insensitive(tmp_path):
    result = read_captions(write(tmp_path / "captions.txt", " Image , Caption \na.jpg,hello\n"))
    assert result.captions == {"a.jpg": ["hello"]}


def test_flickr_csv_skips_empty_captions(tmp_path):
    result = read_captions(
        write(tmp_path / "captions.txt", "image,caption\na.jpg,   \na.jpg,kept\n,no image\n")
    )
    assert result.captions == {"a.jpg": ["kept"]}


@pytest.mark.parametrize("header", ["file,caption", "image,text", "a.jpg,a dog runs"])
def test_flickr_csv_bad_header_names_the_file(tmp_path, header):
    path = write(tmp_path / "captions.txt", f"{header}\nb.jpg,a cat\n")
    with pytest.raises(DataError, match="expected a header") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_flickr_csv_row_without_caption_names_file_and_line(tmp_path):
    path = write(tmp_path / "captions.txt", "image,caption\na.jpg,ok\nlonely_field\n")
    with pytest.raises(DataError) as info:
        read_captions(path)
    assert f"{path}:3" in str(info.value)


def test_flickr_csv_header_only_has_no_captions(tmp_path):
    path = write(tmp_path / "captions.txt", "image,caption\n")
    with pytest.raises(DataError, match="no captions found") as info:
        read_captions(path)
    assert str(path) in str(info.value)


# ---- Flickr8k token file -------------------------------------------------------------------
TOKEN_TEXT = (
    "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up stairs .\n"
    "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
    "\n"
    "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
    "2258277193_586949ec62.jpg.1#0\tA man in a red jacket .\n"  # the file's malformed id
    "2258277193_586949ec62.jpg.1#1\tSkiers on a slope .\n"
)


def test_flickr_token_file(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", TOKEN_TEXT)
    result = read_captions(path)
    assert list(result.captions) == [
        "1000268201_693b08cb0e.jpg",
        "1001773457_577c3a7d70.jpg",
        "2258277193_586949ec62.jpg",  # 'x.jpg.1#0' maps to the real file name
    ]
    assert result.captions["1000268201_693b08cb0e.jpg"] == [
        "A child in a pink dress is climbing up stairs .",
        "A girl going into a wooden building .",
    ]
    assert result.captions["2258277193_586949ec62.jpg"] == [
        "A man in a red jacket .",
        "Skiers on a slope .",
    ]
    assert result.num_captions == 5
    assert result.splits == {}
    assert read_flickr_token(path).captions == result.captions


def test_flickr_token_detected_regardless_of_file_name(tmp_path):
    result = read_captions(write(tmp_path / "whatever.txt", "a.jpg#0\tone\nb.jpg#0\ttwo\n"))
    assert result.captions == {"a.jpg": ["one"], "b.jpg": ["two"]}


def test_flickr_token_hash_inside_name_uses_last_hash(tmp_path):
    result = read_captions(write(tmp_path / "t.txt", "we#ird.jpg#3\tcaption here\n"))
    assert result.captions == {"we#ird.jpg": ["caption here"]}


def test_flickr_token_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", "a.jpg#0\tfine\nb.jpg no tab here\n")
    with pytest.raises(DataError, match="image#n<TAB>caption") as info:
        read_captions(path)
    assert f"{path}:2" in str(info.value)


def test_flickr_token_line_without_hash_is_rejected(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt", "a.jpg#0\tfine\nb.jpg\tno hash\n")
    with pytest.raises(DataError) as info:
        read_flickr_token(path)
    assert f"{path}:2" in str(info.value)


# ---- Karpathy JSON -------------------------------------------------------------------------
KARPATHY = {
    "dataset": "flickr8k",
    "images": [
        {
            "filename": "a.jpg",
            "split": "train",
            "sentences": [
                {"raw": "A dog runs .", "tokens": ["a", "dog", "runs"]},
                {"raw": "", "tokens": ["a", "brown", "dog"]},
            ],
        },
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A cat sits ."}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"tokens": ["two", "birds"]}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A tree ."}]},
        {"filename": "e.jpg", "sentences": [{"raw": "No split given ."}]},
        {"filename": "f.jpg", "split": "test", "sentences": []},
        {"filename": "g.jpg", "split": "odd", "sentences": [{"raw": "Unknown split ."}]},
    ],
}


def test_karpathy_json(tmp_path):
    path = write_json(tmp_path / "dataset_flickr8k.json", KARPATHY)
    result = read_captions(path)
    assert result.captions == {
        "a.jpg": ["A dog runs .", "a brown dog"],  # empty raw falls back to the tokens
        "b.jpg": ["A cat sits ."],
        "c.jpg": ["two birds"],
        "d.jpg": ["A tree ."],
        "e.jpg": ["No split given ."],
        "g.jpg": ["Unknown split ."],
    }
    assert result.splits == {
        "train": ["a.jpg", "b.jpg", "e.jpg"],  # restval and a missing split count as train
        "val": ["c.jpg"],
        "test": ["d.jpg", "f.jpg"],
    }
    assert "g.jpg" not in sum(result.splits.values(), [])
    assert result.source == str(path)


def test_karpathy_json_filepath_is_prefixed(tmp_path):
    data = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_1.jpg",
                "split": "val",
                "sentences": [{"raw": "A bus ."}],
            },
            {
                "filepath": "",
                "filename": "plain.jpg",
                "split": "train",
                "sentences": [{"raw": "A car ."}],
            },
        ]
    }
    result = read_captions(write_json(tmp_path / "dataset_coco.json", data))
    assert result.captions == {"val2014/COCO_1.jpg": ["A bus ."], "plain.jpg": ["A car ."]}
    assert result.splits == {"val": ["val2014/COCO_1.jpg"], "train": ["plain.jpg"]}


def test_karpathy_json_empty_splits_are_dropped(tmp_path):
    data = {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]}]}
    result = read_karpathy_json(tmp_path / "d.json", data)
    assert result.splits == {"train": ["a.jpg"]}


def test_karpathy_json_entry_without_filename(tmp_path):
    path = write_json(
        tmp_path / "dataset_x.json", {"images": [{"split": "train", "sentences": [{"raw": "x"}]}]}
    )
    with pytest.raises(DataError, match="filename") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_karpathy_json_without_any_caption(tmp_path):
    path = write_json(tmp_path / "dataset_x.json", {"images": []})
    with pytest.raises(DataError, match="no captions found") as info:
        read_captions(path)
    assert str(path) in str(info.value)


# ---- COCO JSON -----------------------------------------------------------------------------
COCO = {
    "info": {},
    "images": [
        {"id": 42, "file_name": "COCO_42.jpg"},
        {"id": 7, "file_name": "COCO_7.jpg"},
        {"id": 9, "file_name": "COCO_9.jpg"},  # no annotation: left out
    ],
    "annotations": [
        {"id": 1, "image_id": 7, "caption": "A man rides a horse."},
        {"id": 2, "image_id": 42, "caption": " A plate of food. "},
        {"id": 3, "image_id": 7, "caption": "Someone on horseback."},
        {"id": 4, "image_id": 42, "caption": "   "},
    ],
}


def test_coco_json(tmp_path):
    path = write_json(tmp_path / "captions_val2014.json", COCO)
    result = read_captions(path)
    # ordered like the images list, not like the annotations
    assert list(result.captions) == ["COCO_42.jpg", "COCO_7.jpg"]
    assert result.captions["COCO_7.jpg"] == ["A man rides a horse.", "Someone on horseback."]
    assert result.captions["COCO_42.jpg"] == ["A plate of food."]
    assert result.splits == {}
    assert result.num_captions == 3
    assert read_coco_json(path, COCO).captions == result.captions


def test_coco_json_unknown_image_id(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 2, "caption": "x"}],
    }
    path = write_json(tmp_path / "captions_x.json", data)
    with pytest.raises(DataError, match="unknown image_id 2") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_coco_json_annotation_without_caption_is_a_data_error(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}
    path = write_json(tmp_path / "captions_x.json", data)
    with pytest.raises(DataError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


# ---- auto-detection and errors -------------------------------------------------------------
def test_read_captions_accepts_str_path(tmp_path):
    path = write(tmp_path / "captions.txt", "image,caption\na.jpg,x\n")
    assert read_captions(str(path)).captions == {"a.jpg": ["x"]}


def test_json_suffix_is_case_insensitive(tmp_path):
    result = read_captions(write_json(tmp_path / "CAPTIONS.JSON", COCO))
    assert list(result.captions) == ["COCO_42.jpg", "COCO_7.jpg"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="not found") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_caption_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_captions(tmp_path)


@pytest.mark.parametrize("text", ["", "{not json", '{"images": [1, 2]'])
def test_bad_json(tmp_path, text):
    path = write(tmp_path / "dataset_x.json", text)
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_captions(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [[1, 2, 3], {"annotations": []}, {"foo": "bar"}, "text", 5])
def test_json_of_unknown_layout(tmp_path, data):
    path = write_json(tmp_path / "captions_x.json", data)
    with pytest.raises(DataError, match="neither a COCO nor a Karpathy") as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_empty_text_file(tmp_path):
    path = write(tmp_path / "captions.txt", "")
    with pytest.raises(DataError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


def test_non_utf8_caption_file_is_a_data_error(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"image,caption\na.jpg,caf\xe9 au lait\n")  # latin-1
    with pytest.raises(CaptionerError) as info:
        read_captions(path)
    assert str(path) in str(info.value)


# ---- find_caption_file ---------------------------------------------------------------------
def test_find_caption_file_preference_order(tmp_path):
    for name in (
        "captions_train2014.json",
        "dataset_flickr8k.json",
        "dataset_coco.json",
        "Flickr8k.token.txt",
        "captions.txt",
    ):
        (tmp_path / name).write_text("x")
    assert find_caption_file(tmp_path) == tmp_path / "captions.txt"
    (tmp_path / "captions.txt").unlink()
    assert find_caption_file(tmp_path) == tmp_path / "Flickr8k.token.txt"
    (tmp_path / "Flickr8k.token.txt").unlink()
    assert find_caption_file(tmp_path) == tmp_path / "dataset_coco.json"  # sorted: first
    (tmp_path / "dataset_coco.json").unlink()
    (tmp_path / "dataset_flickr8k.json").unlink()
    assert find_caption_file(tmp_path) == tmp_path / "captions_train2014.json"


def test_find_caption_file_none(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(DataError, match="no caption file") as info:
        find_caption_file(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_find_caption_file_in_shapes_dataset(shapes_dir):
    path = find_caption_file(shapes_dir)
    assert path == shapes_dir / "captions.txt"
    result = read_captions(path)
    assert len(result.captions) == 60
    assert all(len(c) == 5 for c in result.captions.values())
    assert all(name.endswith(".png") for name in result.captions)
