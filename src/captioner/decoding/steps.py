"""The pieces greedy decoding and beam search share: the Stepper protocol, results, masks.

Conventions shared with :func:`captioner.decoding.beam.beam_search` (so that beam search with
``beam_size=1`` returns exactly greedy's tokens and score):

- ``<pad>`` and ``<start>`` (and ``<unk>`` with ``suppress_unk``) are never emitted: their logits
  are set to -inf *before* the log-softmax, so the log-probabilities are those of the
  distribution renormalised over the tokens that may be emitted.
- A hypothesis's *length* counts every generated token, its ``<end>`` included; a hypothesis cut
  off at ``max_length`` has length ``max_length``. So ``max_length`` is the most steps decoding
  runs, and ``token_ids`` (without ``<end>``) is never longer than ``max_length``.
- ``score = sum of log-probs / length ** length_penalty``: with the default ``length_penalty=1``
  it is the mean per-token log-probability; 0 gives the raw sequence log-probability.
- With ``no_repeat_ngram_size=n`` > 0, a token that would complete an n-gram already in the
  hypothesis gets logit -inf (before the log-softmax, like the banned ids). ``<end>`` is never
  blocked, so a hypothesis can always stop.
- ``word_bias`` (B, V), when given, is added to every step's logits of that image before the
  log-softmax: the step distribution becomes ``p(w) * exp(bias[w])`` renormalised (a product of
  experts with a fixed per-image word prior). Grounding uses it to favour the words the
  encoder's concepts support and to disfavour the ones they contradict. A positive bias is a
  one-time bonus: once a hypothesis emits a token, the positive bias of every token in its
  ``bias_groups`` group (V,) (default: the token alone; grounding groups "cat" with "cats") is
  spent for that hypothesis, so a favoured word is named once, not repeated; negative bias stays.
- ``alphas`` has one attention row per returned token (the attention of the ``<end>`` step is
  dropped), each a distribution over the P grid cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

Memory = tuple[torch.Tensor, ...]
State = tuple[torch.Tensor, ...]


class Stepper(Protocol):
    """What decoding drives (see docs/ARCHITECTURE.md): the torch decoder or an ORT session."""

    def start(self, features: torch.Tensor) -> tuple[Memory, State]: ...

    def step(
        self, tokens: torch.Tensor, state: State, memory: Memory
    ) -> tuple[torch.Tensor, State, torch.Tensor]: ...


@dataclass
class DecodeResult:
    """The decoded caption of one image."""

    token_ids: list[int]  # without <start> and <end>
    score: float  # sum of log-probs / length ** length_penalty (length counts <end>)
    alphas: np.ndarray  # (len(token_ids), P) float32 attention per returned token
    alternatives: list[tuple[list[int], float]] = field(default_factory=list)  # best first
    # (L_k, P) attention of each alternative, when the decoder kept it (beam search does)
    alternative_alphas: list[np.ndarray] = field(default_factory=list)


Hypothesis = DecodeResult  # alias: one decoded hypothesis with its score and attention


def check_inputs(features: torch.Tensor, max_length: int) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be (B, P, C), got shape {tuple(features.shape)}")
    if int(max_length) < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")


def banned_ids(pad_id: int, start_id: int, unk_id: int, suppress_unk: bool) -> list[int]:
    return [pad_id, start_id, *([unk_id] if suppress_unk else [])]


def masked_log_probs(
    logits: torch.Tensor, banned: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """logits (N, V) (+ bias (N, V)) -> log-probs (N, V) float32 with the banned ids at -inf."""
    logits = logits.float()
    if bias is not None:
        logits = logits + bias  # (N, V)
    logits = logits.index_fill(1, banned, float("-inf"))  # (N, V)
    return torch.log_softmax(logits, dim=1)  # (N, V)


def spend_bias(
    bias: torch.Tensor, tokens: torch.Tensor, groups: torch.Tensor | None
) -> torch.Tensor:
    """bias (N, V), tokens (N,) just emitted -> bias with the positive entries of each row's
    emitted token group set to 0 (see the module doc)."""
    if groups is None:
        hit = torch.zeros_like(bias, dtype=torch.bool)
        hit[torch.arange(bias.size(0), device=bias.device), tokens] = True  # (N, V)
    else:
        hit = groups.unsqueeze(0) == groups[tokens].unsqueeze(1)  # (N, V)
    return torch.where(hit & (bias > 0), torch.zeros_like(bias), bias)


def check_word_bias(word_bias: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A (B, V) float bias, or None; a wrong shape is a caller's bug worth a clear message."""
    if word_bias is None:
        return None
    if word_bias.dim() != 2 or word_bias.size(0) != batch:
        raise ValueError(f"word_bias must be (B={batch}, V), got shape {tuple(word_bias.shape)}")
    return word_bias.float()


def block_repeated_ngrams(
    logits: torch.Tensor, history: torch.Tensor, n: int, end_id: int
) -> torch.Tensor:
    """logits (N, V), history (N, t) tokens emitted so far -> logits with -inf on every token
    that would repeat one of the row's n-grams ("on a skateboard on a skateboard")."""
    t = history.size(1)
    if n <= 0 or t < n:
        return logits
    windows = history.unfold(1, n, 1)  # (N, t - n + 1, n) every n-gram so far
    prefix = history[:, t - n + 1 :]  # (N, n - 1) what the next token would extend
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(dim=2)  # (N, W)
    rows, where = match.nonzero(as_tuple=True)  # (M,), (M,)
    if rows.numel() == 0:
        return logits
    tokens = windows[rows, where, n - 1]  # (M,)
    keep = tokens != end_id
    logits = logits.clone()
    logits[rows[keep], tokens[keep]] = float("-inf")
    return logits


def normalised_score(total: float, length: int, length_penalty: float) -> float:
    return float(total) / float(length) ** float(length_penalty)


def select_rows(tensors: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.index_select(0, index) for t in tensors)
