"""The decoder as two ONNX graphs (start: image grid -> memory + state; step: one token) and a
Stepper that runs them in ONNX Runtime, so greedy and beam search need no change to use it.

The attention keys are part of the memory that ``start`` returns: they are computed once per
image, not at every step, exactly as in the PyTorch decoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.features.onnx import _quiet_export, cache_root, ort_session
from captioner.io import atomic_path
from captioner.model.decoder import ShowAttendTellDecoder

EXPORT_VERSION = 2  # bump when the exported graphs change


class _Start(nn.Module):
    def __init__(self, decoder: ShowAttendTellDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        (feats, keys), state = self.decoder.prepare(features)
        return (feats, keys, *state)


class _Step(nn.Module):
    """decoder.step(), with the embedding's input projection folded into a (V, G*H) table:
    a row lookup replaces a matmul whose cost at beam sizes is reading its weights."""

    def __init__(self, decoder: ShowAttendTellDecoder):
        super().__init__()
        self.decoder = decoder
        with torch.no_grad():
            table = decoder.w_embed(decoder.embedding.weight)  # (V, G*H)
        self.register_buffer("embed_gates", table)

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, keys: torch.Tensor, *state):
        d = self.decoder
        embedded = d.embedding(tokens)  # (B, E)
        new_state, context, alpha = d._cell(self.embed_gates[tokens], tuple(state), (feats, keys))
        logits = d._output(embedded, new_state[0], context)  # (B, V)
        return (logits, alpha, *new_state)


def _state_names(decoder: ShowAttendTellDecoder) -> list[str]:
    return ["h"] if decoder.config.cell == "gru" else ["h", "c"]


def export_decoder(decoder: ShowAttendTellDecoder, out_dir: Path) -> tuple[Path, Path]:
    """Write decoder_start.onnx and decoder_step.onnx (dynamic batch) into ``out_dir``.

    The graphs are the eval-mode decoder (dropout off), and ``decoder`` is left in the mode it
    came in: ``torch.onnx.export`` restores the mode of the module it exports onto all of its
    submodules, so the wrappers are put in eval mode too, else they switch the shared decoder's
    dropout back on (a Captioner or parity check would then decode with dropout).
    """
    was_training = decoder.training
    decoder.eval()
    try:
        _export_graphs(decoder, out_dir)
    finally:
        decoder.train(was_training)
    return out_dir / "decoder_start.onnx", out_dir / "decoder_step.onnx"


def _export_graphs(decoder: ShowAttendTellDecoder, out_dir: Path) -> None:
    cfg = decoder.config
    states = _state_names(decoder)
    batch = {0: "batch"}
    start_path, step_path = out_dir / "decoder_start.onnx", out_dir / "decoder_step.onnx"
    with torch.no_grad():
        features = torch.zeros(2, cfg.num_pixels, cfg.feature_dim)
        with atomic_path(start_path) as tmp:
            _quiet_export(
                _Start(decoder).eval(),
                (features,),
                tmp,
                input_names=["features"],
                output_names=["feats", "keys", *states],
                dynamic_axes={n: batch for n in ["features", "feats", "keys", *states]},
            )
        (feats, keys), state = decoder.prepare(features)
        tokens = torch.ones(2, dtype=torch.long)
        in_state = [f"{n}_in" for n in states]
        out_state = [f"{n}_out" for n in states]
        with atomic_path(step_path) as tmp:
            _quiet_export(
                _Step(decoder).eval(),
                (tokens, feats, keys, *state),
                tmp,
                input_names=["tokens", "feats", "keys", *in_state],
                output_names=["logits", "alpha", *out_state],
                dynamic_axes={
                    n: batch
                    for n in ["tokens", "feats", "keys", "logits", "alpha", *in_state, *out_state]
                },
            )


def weights_digest(decoder: ShowAttendTellDecoder) -> str:
    digest = hashlib.sha256(repr(decoder.config.to_json()).encode())
    for key, value in decoder.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def exported_decoder_dir(decoder: ShowAttendTellDecoder) -> Path:
    """Where the ONNX files of these exact weights live (export on first use)."""
    out_dir = (
        cache_root()
        / "onnx"
        / (f"decoder-v{EXPORT_VERSION}-{weights_digest(decoder)}-torch{torch.__version__}")
    )
    if not (
        (out_dir / "decoder_start.onnx").is_file() and (out_dir / "decoder_step.onnx").is_file()
    ):
        out_dir.mkdir(parents=True, exist_ok=True)
        export_decoder(decoder, out_dir)
    return out_dir


class OrtStepper:
    """The Stepper protocol over ONNX Runtime sessions (tensors in and out are torch, CPU)."""

    def __init__(self, onnx_dir: Path, cell: str, threads: int | None = None):
        self.start_session = ort_session(onnx_dir / "decoder_start.onnx", threads)
        self.step_session = ort_session(onnx_dir / "decoder_step.onnx", threads)
        self.num_state = 1 if cell == "gru" else 2
        self.state_in = ["h_in"] if cell == "gru" else ["h_in", "c_in"]

    def start(self, features: torch.Tensor):
        feats, keys, *state = self.start_session.run(None, {"features": features.float().numpy()})
        return (torch.from_numpy(feats), torch.from_numpy(keys)), tuple(
            map(torch.from_numpy, state)
        )

    def step(self, tokens: torch.Tensor, state, memory):
        feed = {
            "tokens": tokens.to(torch.long).numpy(),
            "feats": memory[0].numpy(),
            "keys": memory[1].numpy(),
        }
        feed.update(
            {name: np.ascontiguousarray(s.numpy()) for name, s in zip(self.state_in, state)}
        )
        logits, alpha, *new_state = self.step_session.run(None, feed)
        return (
            torch.from_numpy(logits),
            tuple(map(torch.from_numpy, new_state)),
            torch.from_numpy(alpha),
        )
