"""The decoder as ONNX graphs (start: image grid -> memory + state; step: one token; search: one
token plus the search's scoring) and a Stepper that runs them in ONNX Runtime, so greedy and
beam search need no change to use it.

The attention keys are part of the memory that ``start`` returns: they are computed once per
image, not at every step, exactly as in the PyTorch decoder.

The search graph (``decoder_search.onnx``) is one beam-search step for n images x w rows each:
it attends over each image's memory without copying it to the image's beams (broadcast), adds
each row's word bias (banned ids at -inf), takes the log-softmax, adds each row's summed
log-prob and returns each image's k best candidates (ONNX TopK: ties go to the lower index,
the order beam search needs). So decoding never handles (N, V) tensors in Python and the memory
is never expanded to the beams; its cost is close to the step's arithmetic.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.features.onnx_export import _quiet_export, cache_root, load_failure, ort_session
from captioner.io import atomic_path
from captioner.model.decoder import ShowAttendTellDecoder

EXPORT_VERSION = 4  # bump when the exported graphs change
GRAPH_NAMES = ("decoder_start.onnx", "decoder_step.onnx", "decoder_search.onnx")
DECODER_PRECISIONS = ("fp32", "int8")
# int8 decoder graphs: ORT dynamic quantisation of the fp32 ones (int8 per-channel weights,
# activations quantised per call) of every MatMul/Gemm with a weight. A beam step reads ~15 MB
# of fp32 weights for a few rows of arithmetic, so one image's decoding is memory-bound; int8
# weights are a quarter of the bytes. The embedding tables are row lookups (Gather) and stay fp32.
DYNAMIC_QUANT_VERSION = 1  # bump when the int8 recipe changes (a new directory, fp32 untouched)


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


def _gates(cell: str, gx: torch.Tensor, gh: torch.Tensor, state: tuple) -> tuple:
    """The GRU/LSTM update of ``ShowAttendTellDecoder._cell`` from its input (gx) and
    recurrent (gh) pre-activations (N, G*H)."""
    if cell == "gru":
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * state[0],)
    i, f, g, o = (gx + gh).chunk(4, dim=1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c), c)


class _Search(_Step):
    """One search step for n images x w rows (N = n*w, an image's rows adjacent): the step of
    ``_Step`` (same folded embedding table) with the attention broadcast over each image's
    unexpanded memory, then the masked, biased log-softmax, the candidates' summed log-probs
    and their top k per image."""

    def forward(self, tokens, feats, keys, bias, cum, k, *state):
        """tokens (N,), feats (n, P, D), keys (n, P, A), bias (N, V) each row's word bias with
        -inf on the banned ids, cum (n, w) summed log-prob per row, k () -> values, index
        (n, k) into the image's w*V candidates (row * V + word), alpha (N, P), new state."""
        logits, alpha, new_state = self.logits(tokens, feats, keys, *state)  # (N, V), (N, P)
        values, index = top_candidates(logits, bias, cum, k)  # (n, k)
        return (values, index, alpha, *new_state)

    def logits(self, tokens, feats, keys, *state):
        """The step with the attention broadcast over each image's memory: tokens (N,), feats
        (n, P, D), keys (n, P, A) -> logits (N, V), alpha (N, P), new state."""
        d = self.decoder
        n, N = feats.size(0), tokens.size(0)
        gh, query, beta = d.w_hidden(state[0]).split(d.hidden_splits, dim=1)  # (N, .)
        q = query.reshape(n, -1, 1, query.size(1))  # (n, w, 1, A)
        scores = d.attention.score(torch.tanh(keys.unsqueeze(1) + q)).squeeze(3)  # (n, w, P)
        alpha = torch.softmax(scores, dim=2)  # (n, w, P)
        context = torch.matmul(alpha, feats).reshape(N, -1)  # (N, D)
        context = torch.sigmoid(beta) * context  # (N, D)
        gx = self.embed_gates[tokens] + d.w_context(context)  # (N, G*H)
        new_state = _gates(d.config.cell, gx, gh, tuple(state))
        logits = d._output(d.embedding(tokens), new_state[0], context)  # (N, V)
        return logits, alpha.reshape(N, -1), new_state


def top_candidates(logits, bias, cum, k):
    """logits (N, V) + bias (N, V), cum (n, w) -> each image's k best summed log-probs and their
    index into its w*V candidates (n, k), best first."""
    n = cum.size(0)
    logits = (logits + bias).reshape(n, -1, logits.size(1))  # (n, w, V)
    cand = (cum.unsqueeze(2) + torch.log_softmax(logits, dim=2)).reshape(n, -1)  # (n, w*V)
    return torch.topk(cand, k, dim=1)  # (n, k), best first


# the search graph's dynamic axes: n images, N = n*w rows, w rows per image, k candidates
SEARCH_AXES = {
    "tokens": {0: "rows"},
    "bias": {0: "rows"},
    "cum": {0: "images", 1: "width"},
    "values": {0: "images", 1: "k"},
    "index": {0: "images", 1: "k"},
    "alpha": {0: "rows"},
}


def _state_names(decoder: ShowAttendTellDecoder) -> list[str]:
    return ["h"] if decoder.config.cell == "gru" else ["h", "c"]


def export_decoder(decoder: ShowAttendTellDecoder, out_dir: Path) -> tuple[Path, Path]:
    """Write decoder_start.onnx, decoder_step.onnx and decoder_search.onnx (dynamic batch) into
    ``out_dir``; returns the first two (the search graph is optional for ``OrtStepper``).

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
        bias = torch.zeros(2, cfg.vocab_size)
        cum = torch.zeros(1, 2)
        with atomic_path(out_dir / "decoder_search.onnx") as tmp:
            _quiet_export(
                _Search(decoder).eval(),
                (tokens, feats[:1], keys[:1], bias, cum, torch.tensor(3), *state),
                tmp,
                input_names=["tokens", "feats", "keys", "bias", "cum", "k", *in_state],
                output_names=["values", "index", "alpha", *out_state],
                dynamic_axes={
                    **SEARCH_AXES,
                    "feats": {0: "images"},
                    "keys": {0: "images"},
                    **{name: {0: "rows"} for name in [*in_state, *out_state]},
                },
            )


def weights_digest(decoder: ShowAttendTellDecoder) -> str:
    digest = hashlib.sha256(repr(decoder.config.to_json()).encode())
    for key, value in decoder.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def exported_decoder_dir(decoder: ShowAttendTellDecoder, precision: str = "fp32") -> Path:
    """Where the ONNX files of these exact weights live (export on first use); ``precision``
    "int8" is the dynamically quantised copy of them, in a directory beside the fp32 one."""
    if precision not in DECODER_PRECISIONS:
        raise ConfigError(f"decoder precision must be fp32 or int8, not {precision!r}")
    out_dir = (
        cache_root()
        / "onnx"
        / (f"decoder-v{EXPORT_VERSION}-{weights_digest(decoder)}-torch{torch.__version__}")
    )
    if not all((out_dir / name).is_file() for name in GRAPH_NAMES):
        out_dir.mkdir(parents=True, exist_ok=True)
        export_decoder(decoder, out_dir)
    return out_dir if precision == "fp32" else quantize_decoder_dir(out_dir)


@contextmanager
def _no_preprocess_hint():
    """quantize_dynamic logs "consider pre-processing" on the root logger for every graph:
    advice for static quantisation of conv nets, noise here."""

    def drop(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def int8_decoder_dir(fp32_dir: Path) -> Path:
    """<fp32 dir>-int8-dq<version>-ort<version>: the quantiser's output depends on both."""
    import onnxruntime

    return fp32_dir.with_name(
        f"{fp32_dir.name}-int8-dq{DYNAMIC_QUANT_VERSION}-ort{onnxruntime.__version__}"
    )


def quantize_decoder_dir(fp32_dir: Path) -> Path:
    """The int8 copies of ``fp32_dir``'s graphs (quantised on first use, each file atomically;
    a graph the fp32 directory lacks, e.g. a ``captioner export`` dir's search, is skipped)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = int8_decoder_dir(fp32_dir)
    for name in GRAPH_NAMES:
        source, target = fp32_dir / name, out_dir / name
        if target.is_file() or not source.is_file():
            continue
        with atomic_path(target) as tmp, _no_preprocess_hint():
            quantize_dynamic(
                str(source),
                str(tmp),
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                weight_type=QuantType.QInt8,
            )
    return out_dir


class OrtStepper:
    """The Stepper protocol over ONNX Runtime sessions (tensors in and out are torch, CPU)."""

    def __init__(self, onnx_dir: Path, cell: str, threads: int | None = None):
        self.onnx_dir = onnx_dir  # which graphs (fp32 or int8) this stepper runs
        self.start_session = ort_session(onnx_dir / "decoder_start.onnx", threads)
        self.step_session = ort_session(onnx_dir / "decoder_step.onnx", threads)
        self.num_state = 1 if cell == "gru" else 2
        self.state_in = ["h_in"] if cell == "gru" else ["h_in", "c_in"]
        # the fused search step (exports from before it, or `captioner export` dirs, lack it:
        # decoding then drives ``step``)
        search = onnx_dir / "decoder_search.onnx"
        self.search_session = ort_session(search, threads) if search.is_file() else None
        self.vocab_size = 0  # V, from the search graph's ``bias`` input (N, V)
        if self.search_session is not None:
            (bias,) = [i for i in self.search_session.get_inputs() if i.name == "bias"]
            self.vocab_size = int(bias.shape[1])
        self._search_outputs = [
            "values",
            "index",
            "alpha",
            *[f"{n[:-3]}_out" for n in self.state_in],
        ]

    @property
    def fused(self) -> bool:
        """Whether :meth:`search_step` is available (decoding checks this)."""
        return self.search_session is not None

    def search_start(self, features: torch.Tensor) -> tuple[tuple[np.ndarray, ...], tuple]:
        """features (B, P, C) -> memory (feats, keys) and state as numpy arrays, batch first."""
        feats, keys, *state = self.start_session.run(None, {"features": features.float().numpy()})
        return (feats, keys), tuple(state)

    def search_step(
        self,
        tokens: np.ndarray,
        state: tuple[np.ndarray, ...],
        memory: tuple[np.ndarray, ...],
        bias: np.ndarray,
        cum: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        """One fused search step for n images x w rows (see the module doc): tokens (n*w,)
        int64, memory per image (n, P, .), bias (n*w, V) float32, -inf on banned ids, cum
        (n, w) float32 -> (values (n, k), index (n, k) int64 into w*V, alpha (n*w, P), state)."""
        feed = {
            "tokens": tokens,
            "feats": memory[0],
            "keys": memory[1],
            "bias": bias,
            "cum": cum,
            "k": np.asarray(k, dtype=np.int64),
        }
        feed.update(zip(self.state_in, state))
        values, index, alpha, *new_state = self.search_session.run(self._search_outputs, feed)
        return values, index, alpha, tuple(new_state)

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


def load_stepper(decoder: ShowAttendTellDecoder, precision: str, threads: int = 1) -> OrtStepper:
    """An OrtStepper over these weights' exported graphs. Graphs ONNX Runtime cannot load (a
    cut or emptied cache file) are exported again, once, with a warning, instead of the
    decoder falling back to PyTorch (slower) on every run from then on."""
    onnx_dir = exported_decoder_dir(decoder, precision)
    try:
        return OrtStepper(onnx_dir, decoder.config.cell, threads=threads)
    except ImportError:
        raise  # no ONNX Runtime: nothing to repair
    except Exception as exc:  # noqa: BLE001 - any unreadable graph is repaired the same way
        warnings.warn(
            f"the cached ONNX decoder in {onnx_dir} could not be loaded ({load_failure(exc)}); "
            "exporting it again",
            stacklevel=2,
        )
    fp32_dir = exported_decoder_dir(decoder, "fp32") if precision != "fp32" else onnx_dir
    for folder in {onnx_dir, fp32_dir}:
        shutil.rmtree(folder, ignore_errors=True)
    onnx_dir = exported_decoder_dir(decoder, precision)
    return OrtStepper(onnx_dir, decoder.config.cell, threads=threads)
