"""The search step of a *fused* stepper: one call that returns each image's k best candidates.

A stepper may offer, besides the Stepper protocol, ``fused`` (True), ``vocab_size``,
``search_start(features) -> (memory, state)`` and ``search_step(tokens, state, memory, bias,
cum, k) -> (values, index, alpha, state)`` over numpy arrays, where the memory stays one row
per image (the step broadcasts it over the image's w rows), ``bias`` (n*w, V) is added to the
logits before the log-softmax (with -inf on the ids never emitted), ``cum`` (n, w) is each
row's summed log-prob and ``values``/``index`` (n, k) are the image's k best ``cum +
log-prob`` over its w*V candidates (index = row * V + word), best first, ties to the lower
index. :class:`captioner.model.onnx_decoder.OrtStepper` does, in one ONNX Runtime call: so
greedy and beam search never see (N, V) tensors, and their bookkeeping is a few numpy ops on
(n, k) arrays.
"""

from __future__ import annotations

import numpy as np
import torch


def uses_fused(stepper: object) -> bool:
    """Whether decoding can drive ``stepper`` through its fused step (n-gram blocking too: the
    blocked tokens go into the step's bias as -inf, the same -inf the plain path writes into
    the logits before its log-softmax)."""
    return bool(getattr(stepper, "fused", False))


def repeated_ngram_tokens(
    history: np.ndarray, n: int, end_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """history (N, t) tokens emitted so far -> (rows, tokens) that would repeat one of the
    row's n-grams: numpy's :func:`captioner.decoding.greedy.block_repeated_ngrams`."""
    N, t = history.shape
    if n <= 0 or t < n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = t - n + 1  # n-grams so far, the one at i is history[:, i : i + n]
    match = np.ones((N, span), dtype=bool)  # its first n - 1 tokens are the last n - 1
    for j in range(n - 1):
        match &= history[:, j : j + span] == history[:, t - n + 1 + j, None]
    rows, where = np.nonzero(match)
    tokens = history[rows, where + n - 1]  # what followed them then
    keep = tokens != end_id
    return rows[keep], tokens[keep]


def spend(bias: np.ndarray, words: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """:func:`captioner.decoding.greedy.spend_bias` in numpy: bias (N, V), words (N,) just
    emitted -> bias with the positive entries of each row's word group set to 0."""
    if groups is None:
        hit = np.zeros(bias.shape, dtype=bool)
        hit[np.arange(len(words)), words] = True  # (N, V)
    else:
        hit = groups[None, :] == groups[words][:, None]  # (N, V)
    return np.where(hit & (bias > 0), np.float32(0), bias)


class FusedExpander:
    """The memory, state and per-row bias of a fused search, and its step.

    ``bias`` has one row per stepper row: the image's word bias (zeros without one), less what
    the hypothesis has spent (see :mod:`captioner.decoding.greedy`), with -inf on the banned
    ids, so the graph adds one (N, V) array where the plain path adds the bias and then fills
    the banned ids (the same float32 values)."""

    def __init__(
        self,
        stepper,
        features: torch.Tensor,
        banned: list[int],
        word_bias: torch.Tensor | None,
        bias_groups: torch.Tensor | None = None,
        no_repeat_ngram_size: int = 0,
        end_id: int = 2,
    ) -> None:
        self.stepper = stepper
        self.ngram, self.end_id = no_repeat_ngram_size, end_id
        self.emitted = np.zeros((features.size(0), 0), np.int64)  # (n*w, t) for n-gram blocking
        self.spends = word_bias is not None  # (a zero bias has nothing to spend)
        self.groups = None if bias_groups is None else bias_groups.cpu().numpy()  # (V,)
        self.memory, self.state = stepper.search_start(features)
        B, V = features.size(0), int(stepper.vocab_size)
        if word_bias is None:
            bias = np.zeros((B, V), dtype=np.float32)
        else:
            bias = word_bias.detach().cpu().float().numpy().copy()  # (B, V)
        bias[:, banned] = -np.inf
        self.bias = bias  # (n*w, V)
        self.vocab_size = V

    def step(
        self, tokens: np.ndarray, cum: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens (n*w,), cum (n, w) -> values (n, k) float32, index (n, k) int64 (row * V +
        word), alpha (n*w, P) float32. Fewer than k candidates (w*V < k): the rest is -inf."""
        n, width = cum.shape
        m = min(k, width * self.vocab_size)
        bias = self.bias
        rows, blocked = repeated_ngram_tokens(self.emitted, self.ngram, self.end_id)
        if rows.size:
            bias = bias.copy()
            bias[rows, blocked] = -np.inf
        values, index, alpha, self.state = self.stepper.search_step(
            np.ascontiguousarray(tokens, dtype=np.int64),
            self.state,
            self.memory,
            bias,
            np.ascontiguousarray(cum, dtype=np.float32),
            m,
        )
        if m < k:
            values = np.concatenate([values, np.full((n, k - m), -np.inf, np.float32)], 1)
            index = np.concatenate([index, np.zeros((n, k - m), np.int64)], 1)
        return values, index, alpha

    def reorder(
        self, rows: np.ndarray, images: np.ndarray | None, width: int = 0, words=None
    ) -> None:
        """The state's and bias's rows for the next step (rows of the current state, n'*w' of
        them), each bias spent on its row's new word ``words`` (n', w'); when some images were
        dropped, the memory of the ``images`` kept (the memory is never expanded: ``width`` is
        for the plain path's expander)."""
        self.state = tuple(s[rows] for s in self.state)
        self.bias = self.bias[rows]  # (n'*w', V)
        if self.ngram > 0:  # each new row's tokens: its parent's, then its word
            self.emitted = np.concatenate([self.emitted[rows], words.reshape(-1, 1)], axis=1)
        if self.spends:
            self.bias = spend(self.bias, words.reshape(-1), self.groups)
        if images is not None:
            self.memory = tuple(m[images] for m in self.memory)
