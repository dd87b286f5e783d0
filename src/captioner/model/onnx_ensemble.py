"""An ensemble's fused search step as one ONNX graph, and the stepper that runs it.

Each member keeps its own start graph and memory (:mod:`captioner.model.onnx_decoder`); one
search graph runs every member's step on the same rows, mixes their next-word distributions
(the weighted mean of their softmaxes, as :class:`captioner.model.ensemble.EnsembleStepper`
does in torch), adds the word bias, takes the log-softmax and returns each image's k best
candidates. So an ensemble's beam search is one ONNX Runtime call per step, like a single
model's, instead of one call per member plus the top-k in torch (two members, 20 Flickr8k test
photos, quiet machine: p50 34.2 against 39.1 ms, batched 31.5 against 25.0 img/s; same captions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.features.onnx_export import _quiet_export, cache_root, ort_session
from captioner.io import atomic_path
from captioner.model.decoder import ShowAttendTellDecoder
from captioner.model.ensemble import EnsembleStepper
from captioner.model.onnx_decoder import (
    EXPORT_VERSION,
    SEARCH_AXES,
    OrtStepper,
    _Search,
    _state_names,
    load_stepper,
    quantize_decoder_dir,
    top_candidates,
    weights_digest,
)

SEARCH_GRAPH = "decoder_search.onnx"


class _EnsembleSearch(nn.Module):
    """Inputs: tokens (N,), bias (N, V), cum (n, w), k (), then each member's feats and keys
    (n, P, .), then each member's state (N, H) -> values, index (n, k), alpha (N, P) (the
    members' weighted mean), every member's new state."""

    def __init__(self, decoders: Sequence[ShowAttendTellDecoder]):
        super().__init__()
        self.steps = nn.ModuleList(_Search(d) for d in decoders)
        self.state_counts = [len(_state_names(d)) for d in decoders]
        weight = 1.0 / len(decoders)
        self.log_weight, self.weight = float(np.log(weight)), weight

    def forward(self, tokens, bias, cum, k, *rest):
        M = len(self.steps)
        memory, states = rest[: 2 * M], rest[2 * M :]
        log_probs, alphas, new_states = [], [], []
        at = 0
        for i, (step, count) in enumerate(zip(self.steps, self.state_counts, strict=True)):
            state = states[at : at + count]
            at += count
            logits, alpha, new_state = step.logits(tokens, memory[2 * i], memory[2 * i + 1], *state)
            log_probs.append(torch.log_softmax(logits, dim=1) + self.log_weight)  # (N, V)
            alphas.append(alpha * self.weight)  # (N, P)
            new_states.extend(new_state)
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0)  # (N, V)
        values, index = top_candidates(mixed, bias, cum, k)  # (n, k)
        return (values, index, torch.stack(alphas).sum(0), *new_states)


def _names(decoders: Sequence[ShowAttendTellDecoder]) -> tuple[list[str], list[str], list[str]]:
    """Input names of the members' memory, state in and state out."""
    memory, state_in, state_out = [], [], []
    for i, d in enumerate(decoders):
        memory += [f"feats_{i}", f"keys_{i}"]
        state_in += [f"{s}_in_{i}" for s in _state_names(d)]
        state_out += [f"{s}_out_{i}" for s in _state_names(d)]
    return memory, state_in, state_out


def export_ensemble_search(decoders: Sequence[ShowAttendTellDecoder], path: Path) -> None:
    """Write the ensemble's search graph (images, rows, width and k dynamic) to ``path``."""
    memory_names, in_names, out_names = _names(decoders)
    modes = [d.training for d in decoders]
    for d in decoders:
        d.eval()
    try:
        with torch.no_grad():
            memory, states = [], []
            for d in decoders:
                features = torch.zeros(1, d.config.num_pixels, d.config.feature_dim)
                (feats, keys), state = d.prepare(features)
                memory += [feats, keys]
                states += [s.expand(2, -1).contiguous() for s in state]
            V = decoders[0].config.vocab_size
            tokens, bias, cum = (
                torch.ones(2, dtype=torch.long),
                torch.zeros(2, V),
                torch.zeros(1, 2),
            )
            images = {0: "images"}
            with atomic_path(path) as tmp:
                _quiet_export(
                    _EnsembleSearch(decoders).eval(),
                    (tokens, bias, cum, torch.tensor(3), *memory, *states),
                    tmp,
                    input_names=["tokens", "bias", "cum", "k", *memory_names, *in_names],
                    output_names=["values", "index", "alpha", *out_names],
                    dynamic_axes={
                        **SEARCH_AXES,
                        **{name: images for name in memory_names},
                        **{name: {0: "rows"} for name in [*in_names, *out_names]},
                    },
                )
    finally:
        for d, mode in zip(decoders, modes, strict=True):
            d.train(mode)


def exported_ensemble_dir(decoders: Sequence[ShowAttendTellDecoder], precision: str) -> Path:
    """Where these exact members' search graph lives (exported on first use; "int8": its
    dynamically quantised copy, as for a single decoder)."""
    digest = hashlib.sha256("".join(weights_digest(d) for d in decoders).encode()).hexdigest()
    out_dir = (
        cache_root() / "onnx" / f"ensemble-v{EXPORT_VERSION}-{digest[:16]}-torch{torch.__version__}"
    )
    if not (out_dir / SEARCH_GRAPH).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        export_ensemble_search(decoders, out_dir / SEARCH_GRAPH)
    return out_dir if precision == "fp32" else quantize_decoder_dir(out_dir)


class OrtEnsembleStepper:
    """The members' own start graphs and one fused search graph over all of them; the plain
    Stepper protocol (start/step) goes through :class:`EnsembleStepper` over the members."""

    fused = True

    def __init__(self, members: Sequence[OrtStepper], search: Path, threads: int | None = None):
        self.members = list(members)
        self.plain = EnsembleStepper(self.members)
        self.session = ort_session(search, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.vocab_size = int(inputs["bias"].shape[1])
        self.state_in = [name for name in inputs if "_in_" in name]
        self.memory_in = [name for name in inputs if name.startswith(("feats_", "keys_"))]
        self.outputs = [
            "values",
            "index",
            "alpha",
            *[n.replace("_in_", "_out_") for n in self.state_in],
        ]
        if len(self.memory_in) != 2 * len(self.members):
            raise ValueError(
                f"{search}: a search graph for {len(self.memory_in) // 2} members, "
                f"given {len(self.members)}"
            )

    def search_start(self, features: torch.Tensor) -> tuple[tuple[np.ndarray, ...], tuple]:
        """features (B, P, C) -> every member's memory and state, concatenated."""
        memory: list[np.ndarray] = []
        state: list[np.ndarray] = []
        for member in self.members:
            m, s = member.search_start(features)
            memory.extend(m)
            state.extend(s)
        return tuple(memory), tuple(state)

    def search_step(self, tokens, state, memory, bias, cum, k):
        """As :meth:`OrtStepper.search_step`, over every member at once."""
        feed = {"tokens": tokens, "bias": bias, "cum": cum, "k": np.asarray(k, dtype=np.int64)}
        feed.update(zip(self.memory_in, memory, strict=True))
        feed.update(zip(self.state_in, state, strict=True))
        values, index, alpha, *new_state = self.session.run(self.outputs, feed)
        return values, index, alpha, tuple(new_state)

    def start(self, features: torch.Tensor):
        return self.plain.start(features)

    def step(self, tokens: torch.Tensor, state, memory):
        return self.plain.step(tokens, state, memory)


def load_steppers(
    decoders: Sequence[ShowAttendTellDecoder], precision: str, threads: int = 1
) -> OrtStepper | OrtEnsembleStepper:
    """One decoder's OrtStepper, or an ensemble's: each member's graphs plus the fused search."""
    members = [load_stepper(d, precision, threads=threads) for d in decoders]
    if len(members) == 1:
        return members[0]
    search = exported_ensemble_dir(decoders, precision) / SEARCH_GRAPH
    return OrtEnsembleStepper(members, search, threads=threads)
