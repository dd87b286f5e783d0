"""A damaged ONNX cache is exported again with a warning, not used as a reason to run PyTorch
(3.7x slower for the encoder) on every run from then on (issue: "Fixes from a second
reliability probe", item 7)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from captioner.features.onnx import FeatureExtractor
from captioner.model.captioning_model import CaptioningModel
from captioner.model.onnx_decoder import GRAPH_NAMES, load_stepper


def test_a_cut_encoder_export_is_exported_again():
    extractor = FeatureExtractor("efficientnet-lite0", backend="auto")
    assert extractor.backend == "onnx"
    batch = np.zeros((1, 3, 224, 224), np.float32)
    expected = extractor(batch)
    path = extractor.encoder_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.warns(UserWarning, match="exporting it again"):
        repaired = FeatureExtractor("efficientnet-lite0", backend="auto")
    assert repaired.backend == "onnx" and repaired.encoder_file == path
    np.testing.assert_allclose(repaired(batch), expected, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: the next run says nothing
        assert FeatureExtractor("efficientnet-lite0", backend="auto").backend == "onnx"


@pytest.mark.parametrize("damage", ["empty", "cut"])
def test_a_damaged_decoder_graph_is_exported_again(tiny_model_dir, damage):
    decoder = CaptioningModel.from_pretrained(tiny_model_dir).decoder
    stepper = load_stepper(decoder, "fp32")
    graph = stepper.onnx_dir / GRAPH_NAMES[0]
    data = graph.read_bytes()
    graph.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.warns(UserWarning, match="exporting it again"):
        repaired = load_stepper(decoder, "fp32")
    assert graph.read_bytes() == data  # the same export, byte for byte
    assert repaired.onnx_dir == stepper.onnx_dir
