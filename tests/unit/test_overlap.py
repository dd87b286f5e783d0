"""Pipelined captioning: overlapped() and Captioner.caption_batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from captioner.api import Captioner
from captioner.errors import ImageLoadError
from captioner.overlap import Failed, overlapped


def test_overlapped_keeps_order_and_runs_the_stage_in_another_thread():
    seen: list[str] = []

    def stage(x: int) -> int:
        seen.append(threading.current_thread().name)
        return x * x

    out = list(overlapped(range(6), stage))
    assert out == [(i, i * i) for i in range(6)]
    assert set(seen) == {"overlap-stage"}


def test_the_stage_works_on_the_next_item_while_the_caller_holds_this_one():
    started = [threading.Event() for _ in range(3)]

    def stage(i: int) -> int:
        started[i].set()
        return i

    stream = overlapped(range(3), stage)
    first, _ = next(stream)
    # while the caller is still on item 0, item 1 gets staged without any further next()
    assert first == 0 and started[1].wait(timeout=5)
    assert [i for i, _ in stream] == [1, 2]


def test_a_failing_stage_comes_back_in_order_and_later_items_still_run():
    def stage(i: int) -> int:
        if i == 1:
            raise ValueError("bad item")
        return i

    out = list(overlapped(range(3), stage))
    assert [i for i, _ in out] == [0, 1, 2]
    assert isinstance(out[1][1], Failed) and "bad item" in str(out[1][1].error)
    assert out[0][1] == 0 and out[2][1] == 2


def test_an_error_in_the_input_is_raised_to_the_caller():
    def items():
        yield 1
        raise OSError("disk gone")

    stream = overlapped(items(), lambda x: x)
    assert next(stream) == (1, 1)
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_closing_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    stream = overlapped(endless(), lambda x: x, depth=2)
    assert next(stream) == (0, 0)
    stream.close()
    assert not any(t.name == "overlap-stage" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth"):
        next(overlapped([1], lambda x: x, depth=0))


def _photos(tmp_path, n: int) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_caption_batches_equals_caption_batch_by_batch(tiny_model_dir, tmp_path):
    captioner = Captioner.from_pretrained(tiny_model_dir, threads=1)
    photos = _photos(tmp_path, 5)
    batches = [photos[:2], photos[2:4], [], photos[4:]]
    options = dict(beam_size=2, max_length=6, return_attention=False)
    got = list(captioner.caption_batches(batches, **options))
    assert [len(b) for b in got] == [2, 2, 0, 1]
    for batch, results in zip(batches, got, strict=True):
        expected = captioner.caption(batch, **options) if batch else []
        assert [(r.caption, r.score) for r in results] == [(e.caption, e.score) for e in expected]


def test_caption_batches_raises_at_the_batch_with_an_unreadable_image(tiny_model_dir, tmp_path):
    captioner = Captioner.from_pretrained(tiny_model_dir, threads=1)
    photos = _photos(tmp_path, 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    stream = captioner.caption_batches([[photos[0]], [broken], [photos[1]]], max_length=4)
    assert len(next(stream)) == 1  # the good batch before it is delivered
    with pytest.raises(ImageLoadError):
        next(stream)
    stream.close()
    assert not any(t.name == "overlap-stage" and t.is_alive() for t in threading.enumerate())
