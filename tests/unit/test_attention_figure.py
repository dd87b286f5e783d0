"""The attention figure says what the encoder sees and whether the photo is in domain (issue 22:
the figure run.sh writes showed neither)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from captioner.api import CaptionResult
from captioner.viz.attention import (
    IN_DOMAIN_COLOUR,
    OUT_OF_DOMAIN_COLOUR,
    attention_figure,
    render_attention_figure,
)


def _result(in_domain: float | None, out_of_domain: bool = False, concepts=None) -> CaptionResult:
    words = ["a", "cat", "on", "a", "mug"]
    attention = np.full((len(words), 7, 7), 1 / 49, np.float32)
    return CaptionResult(
        " ".join(words),
        words,
        -0.4,
        attention,
        concepts=[("cat", 0.95), ("cup", 0.3)] if concepts is None else concepts,
        in_domain=in_domain,
        out_of_domain=out_of_domain,
    )


def _texts(result: CaptionResult) -> dict[str, str]:
    """Every text of the figure -> its colour as a hex string."""
    from matplotlib.colors import to_hex

    figure = attention_figure(np.zeros((60, 80, 3), np.uint8), result)
    return {t.get_text(): to_hex(t.get_color()) for t in figure.texts}


def test_figure_shows_concepts_and_the_in_domain_verdict():
    texts = _texts(_result(0.41))
    assert "the encoder sees: cat 0.95, cup 0.30" in texts
    verdict = [t for t in texts if t.startswith("in domain")]
    assert verdict == ["in domain (in-domain score 0.410): like the training photos"]
    assert texts[verdict[0]] == IN_DOMAIN_COLOUR


def test_figure_warns_when_the_photo_is_out_of_domain():
    texts = _texts(_result(0.004, out_of_domain=True, concepts=[]))
    assert "the encoder sees: (no concept above its threshold)" in texts
    warning = " ".join(t for t, colour in texts.items() if colour == OUT_OF_DOMAIN_COLOUR)
    assert warning.startswith("OUT OF DOMAIN (in-domain score 0.004)")
    assert "may well be wrong" in warning
    assert not any(t.startswith("in domain") for t in texts)


def test_figure_of_a_model_without_grounding_has_no_verdict():
    texts = _texts(_result(None, concepts=[]))
    assert not any("encoder sees" in t or "domain" in t.lower() for t in texts)


def test_written_figure_makes_room_for_the_grounding_lines(tmp_path):
    image = np.zeros((60, 80, 3), np.uint8)
    plain = render_attention_figure(image, _result(None, concepts=[]), tmp_path / "plain.png")
    grounded = render_attention_figure(image, _result(0.004, True), tmp_path / "grounded.png")
    with Image.open(plain) as a, Image.open(grounded) as b:
        assert a.format == b.format == "PNG"
        assert a.size[0] == b.size[0] and b.size[1] >= a.size[1] + 40  # two or three lines more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grounded.png", "plain.png"]
