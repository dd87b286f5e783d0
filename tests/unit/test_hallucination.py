"""Hallucination measures (word matching, invented_rate) and the out-of-domain check set's file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path, PurePosixPath

import pytest

from captioner.evaluation.hallucination import (
    DOG_WORDS,
    PERSON_WORDS,
    invented_rate,
    mentions,
    share,
    subject_named,
)

REPO = Path(__file__).resolve().parents[2]
PHOTOS_JSON = REPO / "bench" / "ood" / "photos.json"
HELDOUT_JSON = REPO / "bench" / "ood" / "photos_heldout.json"
HELDOUT2_JSON = REPO / "bench" / "ood" / "photos_heldout2.json"
FOURTH_JSON = REPO / "bench" / "ood" / "photos_fourth.json"


def _bench_ood():
    """bench/bench_ood.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_ood", REPO / "bench" / "bench_ood.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_ood", module)
    spec.loader.exec_module(module)
    return module


# --- word matching -------------------------------------------------------------------------


def test_mentions_matches_whole_tokens_not_substrings():
    assert not mentions("a manhole cover in the street", PERSON_WORDS)
    assert not mentions("a hotdog stand", DOG_WORDS)
    assert not mentions("a woodland path", {"wood"})
    assert mentions("A MAN, in a hat.", PERSON_WORDS)
    assert mentions("two dogs' toys", DOG_WORDS)


def test_mentions_accepts_tokens_and_ignores_case_of_words():
    assert mentions(["a", "Puppy", "sleeps"], DOG_WORDS)
    assert mentions("a tabby sleeps", ["Tabby"])
    assert not mentions([], PERSON_WORDS)


def test_subject_named():
    assert subject_named("a cat sits on a mug", ["cat", "cats", "kitten"])
    assert not subject_named("a brown and white dog is in the water", ["cat", "cats", "kitten"])
    assert not subject_named("a category of things", ["cat"])


def test_word_lists_keep_out_ambiguous_words():
    for word in ("he", "her", "his", "boxer", "couple", "group", "male"):
        assert word not in PERSON_WORDS and word not in DOG_WORDS
    assert not PERSON_WORDS & DOG_WORDS
    assert all(w == w.lower() and " " not in w for w in PERSON_WORDS | DOG_WORDS)


# --- invented_rate ---------------------------------------------------------------------------


def test_invented_rate_counts_only_images_no_reference_mentions():
    references = {
        "a.jpg": ["a dog runs", "a brown dog on grass"],  # no person: counted
        "b.jpg": ["a dog runs", "a man throws a ball to a dog"],  # one ref has a person: skipped
        "c.jpg": ["a boat on a lake", "a lake at sunset"],  # no person: counted
        "d.jpg": ["a manhole cover"],  # "manhole" is not a person: counted
    }
    captions = {
        "a.jpg": "a man and his dog",  # invented
        "b.jpg": "a man plays with a dog",  # not invented: a reference has a man
        "c.jpg": "a boat on the water",
        "d.jpg": "a surfer rides a wave",  # invented: surfer is a person word
        "e.jpg": "a woman",  # no references at all: skipped
    }
    assert invented_rate(captions, references, PERSON_WORDS) == (2, 3)
    assert invented_rate(captions, references, DOG_WORDS) == (0, 2)  # c.jpg and d.jpg


def test_invented_rate_empty_and_share_text():
    assert invented_rate({}, {}, PERSON_WORDS) == (0, 0)
    assert share(0, 0) == "0/0"
    assert share(12, 226) == "12/226 (5.3%)"


# --- the check set's file ------------------------------------------------------------------


def _check_set_schema(photos_json: Path) -> list[dict]:
    photos = json.loads(photos_json.read_text(encoding="utf-8"))["photos"]
    ids = [p["id"] for p in photos]
    assert len(set(ids)) == len(ids)
    for photo in photos:
        assert set(photo) >= {
            "id",
            "package",
            "version",
            "path",
            "subject_words",
            "has_person",
            "has_dog",
            "description",
        }, photo
        assert photo["package"] and photo["version"] and photo["description"].strip()
        path = photo["path"]
        assert "\\" not in path and not PurePosixPath(path).is_absolute() and ":" not in path
        assert Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"), path
        words = photo["subject_words"]
        assert words and all(isinstance(w, str) and w == w.lower() and w.strip() for w in words)
        assert isinstance(photo["has_person"], bool) and isinstance(photo["has_dog"], bool)
    # not one-sided: some photos show people or dogs, most show neither
    with_people = sum(p["has_person"] or p["has_dog"] for p in photos)
    assert 3 <= with_people < len(photos) / 2
    # never Flickr8k's own images
    assert not any("flickr" in p["path"].lower() for p in photos)
    return photos


def test_photos_json_schema():
    assert len(_check_set_schema(PHOTOS_JSON)) >= 25


def test_heldout_photos_json_schema_and_no_photo_shared_with_photos_json():
    heldout = _check_set_schema(HELDOUT_JSON)
    assert len(heldout) >= 15
    used = json.loads(PHOTOS_JSON.read_text(encoding="utf-8"))["photos"]
    shared = {(p["package"], p["path"]) for p in heldout} & {
        (p["package"], p["path"]) for p in used
    }
    assert not shared
    assert not {p["path"] for p in heldout} & {p["path"] for p in used}
    assert not {p["id"] for p in heldout} & {p["id"] for p in used}


def test_second_heldout_photos_json_schema_and_nothing_shared_with_the_other_sets():
    heldout2 = _check_set_schema(HELDOUT2_JSON)
    assert len(heldout2) >= 30
    # at most a third show a person or a dog
    assert 3 * sum(p["has_person"] or p["has_dog"] for p in heldout2) <= len(heldout2)
    for other_json in (PHOTOS_JSON, HELDOUT_JSON):
        used = json.loads(other_json.read_text(encoding="utf-8"))["photos"]
        assert not {p["path"] for p in heldout2} & {p["path"] for p in used}, other_json
        assert not {p["id"] for p in heldout2} & {p["id"] for p in used}, other_json
        # new packages only: a package already in a set could ship the same photo twice
        packages = {p["package"].lower().replace("_", "-") for p in used}
        assert not {p["package"].lower().replace("_", "-") for p in heldout2} & packages


def _package_key(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_fourth_photos_json_schema_nothing_shared_and_pinned_in_the_ood_extra():
    import tomllib

    fourth = _check_set_schema(FOURTH_JSON)
    assert len(fourth) >= 32
    # about a third show a person or a dog, and at least 12 show neither
    assert 3 * sum(p["has_person"] or p["has_dog"] for p in fourth) <= len(fourth)
    assert sum(not p["has_person"] and not p["has_dog"] for p in fourth) >= 12
    assert all(p["licence"].strip() for p in fourth)
    for other_json in (PHOTOS_JSON, HELDOUT_JSON, HELDOUT2_JSON):
        used = json.loads(other_json.read_text(encoding="utf-8"))["photos"]
        assert not {p["path"] for p in fourth} & {p["path"] for p in used}, other_json
        assert not {p["id"] for p in fourth} & {p["id"] for p in used}, other_json
        # new packages only: a package already in a set could ship the same photo twice
        packages = {_package_key(p["package"]) for p in used}
        assert not {_package_key(p["package"]) for p in fourth} & packages, other_json
    # every package is pinned, at the labelled version, in the `ood` extra
    extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for requirement in extra["project"]["optional-dependencies"]["ood"]:
        name, _, version = requirement.partition("==")
        pins[_package_key(name)] = version
    for photo in fourth:
        assert pins.get(_package_key(photo["package"])) == photo["version"], photo["id"]


# --- bench_ood.py without the optional packages --------------------------------------------


def _photo(bench, **overrides):
    fields = dict(
        id="x",
        package="pytest",
        version="0",
        path="pytest/__init__.py",
        subject_words=["cat"],
        has_person=False,
        has_dog=False,
        description="d",
    )
    fields.update(overrides)
    return bench.Photo(**fields)


def test_resolve_names_the_pip_install_for_missing_packages():
    bench = _bench_ood()
    photos = [_photo(bench, package="no-such-package-for-captioner", version="1.2")]
    problems = bench.resolve(photos)
    assert len(problems) == 1
    assert "no-such-package-for-captioner" in problems[0]
    assert "pip install --no-deps 'no-such-package-for-captioner==1.2'" in problems[0]
    assert photos[0].file is None


def test_resolve_finds_files_in_installed_packages(capsys):
    import pytest as pytest_module

    bench = _bench_ood()
    found = _photo(bench)
    absent = _photo(bench, id="y", path="pytest/no_such_photo.jpg")
    problems = bench.resolve([found, absent])
    assert found.file is not None and found.file.samefile(pytest_module.__file__)
    assert problems == ["y: pytest/no_such_photo.jpg not found in pytest"]
    assert "labelled on 0" in capsys.readouterr().err  # version differs: a warning only


def test_score_counts_inventions_among_photos_with_neither():
    bench = _bench_ood()
    photos = [
        _photo(bench, id="cat", subject_words=["cat"]),
        _photo(bench, id="flower", subject_words=["flower"]),
        _photo(bench, id="man", subject_words=["man"], has_person=True),
        _photo(bench, id="puppy", subject_words=["puppy"], has_dog=True),
    ]
    captions = ["a dog on a mat", "a red flower", "a man", "a man and a puppy"]
    result = bench.score(photos, captions)
    assert result["subject_named"] == [3, 4]
    assert result["invented_person_or_dog"] == [1, 2]
    assert result["invented_dog"] == [1, 2] and result["invented_person"] == [0, 2]
    assert "concepts_name_subject" not in result  # a plain model reports no concepts


def test_score_bounds_what_the_concepts_can_name():
    bench = _bench_ood()
    photos = [
        _photo(bench, id="cat", subject_words=["cat"]),
        _photo(bench, id="moon", subject_words=["moon"]),
        _photo(bench, id="mug", subject_words=["mug", "cup"]),
    ]
    concepts = [
        [("cat", 0.9)],
        [("bubble", 0.2), ("roundworm", 0.1)],
        [("vessel", 0.5), ("mouse", 0.1), ("cup", 0.07), ("mug", 0.06)],  # third counts
    ]
    result = bench.score(photos, ["a cat", "a ball", "a dog"], concepts)
    assert result["concepts_name_subject"] == [2, 3]
    assert [r["concepts_name_subject"] for r in result["photos"]] == [True, False, True]
    assert result["photos"][2]["concepts"] == [["vessel", 0.5], ["mouse", 0.1], ["cup", 0.07]]
    assert not bench.concepts_name_subject(photos[2], concepts[2], top=2)


def test_caption_photos_passes_extra_options_through():
    bench = _bench_ood()
    calls = []

    class FakeCaptioner:
        def caption(self, images, **kwargs):
            calls.append((images, kwargs))
            return [type("R", (), {"caption": f"c{i}"})() for i in range(len(images))]

    out = bench.caption_photos(FakeCaptioner(), [Path("a.png"), Path("b.png")], 3, grounding=True)
    assert [r.caption for r in out] == ["c0", "c1"]
    assert calls[0][0] == ["a.png", "b.png"]
    assert calls[0][1] == {"beam_size": 3, "return_attention": False, "grounding": True}


@pytest.mark.parametrize("content", ["not json", '{"photos": [{"id": "x"}]}'])
def test_load_photos_rejects_malformed_files(tmp_path, content):
    bench = _bench_ood()
    bad = tmp_path / "photos.json"
    bad.write_text(content)
    with pytest.raises(SystemExit, match="cannot read the check set"):
        bench.load_photos(bad)


@pytest.mark.parametrize(("flags", "grounding"), [([], True), (["--no-grounding"], False)])
def test_main_passes_no_grounding_to_the_captioner(tmp_path, monkeypatch, flags, grounding):
    import captioner.api

    bench = _bench_ood()
    photos = tmp_path / "photos.json"
    entry = {f: getattr(_photo(bench), f) for f in (*bench.FIELDS, "description")}
    photos.write_text(json.dumps({"photos": [entry]}))
    calls = []

    class FakeCaptioner:
        def caption(self, images, **kwargs):
            calls.append(kwargs)
            return [type("R", (), {"caption": "a cat"})() for _ in images]

    monkeypatch.setattr(
        captioner.api.Captioner, "from_pretrained", classmethod(lambda cls, d: FakeCaptioner())
    )
    out = tmp_path / "out.json"
    bench.main(["--photos", str(photos), "--json", str(out), *flags])
    assert calls == [{"beam_size": 3, "return_attention": False, "grounding": grounding}]
    result = json.loads(out.read_text())
    assert result["settings"]["grounding"] is grounding
    assert result["subject_named"] == [1, 1]
