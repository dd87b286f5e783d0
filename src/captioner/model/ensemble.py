"""Several decoders as one Stepper: an ensemble searched in one beam search (or greedy).

Decoders trained from different seeds make different mistakes; searching with the mean of their
next-word distributions (each member's softmax, averaged, as in Vinyals et al. 2015 and most
captioning ensembles) keeps the words they agree on. Every member must share the vocabulary and
the encoder grid; each keeps its own memory and recurrent state, carried as one flat tuple so
that greedy and beam search reorder them like a single decoder's.

The step returns ``log(mean_m softmax(logits_m))`` as its logits: these are already
log-probabilities, so the log-softmax decoding applies after its word bias and banned ids
renormalises them exactly as it does a single model's logits (an ensemble of one, or of copies
of one decoder, decodes the same captions). The attention shown for a word is the members' mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

Memory = tuple[torch.Tensor, ...]
State = tuple[torch.Tensor, ...]
Stepper = Any  # decoding's Stepper protocol (start/step); the model layer does not import it


class EnsembleStepper:
    """The Stepper protocol over ``members``, each weighted by ``weights`` (default: equal)."""

    def __init__(self, members: Sequence[Stepper], weights: Sequence[float] | None = None):
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or any(not w > 0 or math.isinf(w) for w in weights):
            raise ValueError(
                f"ensemble weights must be one positive number per member, got {weights}"
            )
        total = sum(weights)
        self.members = list(members)
        self.log_weights = [math.log(w / total) for w in weights]
        self._memory_sizes: list[int] = []
        self._state_sizes: list[int] = []

    def start(self, features: torch.Tensor) -> tuple[Memory, State]:
        """features (B, P, C) -> every member's memory and state, concatenated as flat tuples."""
        memory: list[torch.Tensor] = []
        state: list[torch.Tensor] = []
        self._memory_sizes, self._state_sizes = [], []
        for member in self.members:
            m, s = member.start(features)
            memory.extend(m)
            state.extend(s)
            self._memory_sizes.append(len(m))
            self._state_sizes.append(len(s))
        return tuple(memory), tuple(state)

    def step(
        self, tokens: torch.Tensor, state: State, memory: Memory
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """tokens (N,) -> log of the weighted mean probability (N, V), new state, mean alpha
        (N, P)."""
        log_probs, alphas, new_state = [], [], []
        m_at = s_at = 0
        for member, log_w, m_n, s_n in zip(
            self.members, self.log_weights, self._memory_sizes, self._state_sizes, strict=True
        ):
            member_memory = memory[m_at : m_at + m_n]
            member_state = state[s_at : s_at + s_n]
            m_at, s_at = m_at + m_n, s_at + s_n
            logits, s, alpha = member.step(tokens, member_state, member_memory)  # (N, V)
            log_probs.append(torch.log_softmax(logits.float(), dim=1) + log_w)  # (N, V)
            alphas.append(alpha.float() * math.exp(log_w))  # (N, P)
            new_state.extend(s)
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0)  # (N, V)
        return mixed, tuple(new_state), torch.stack(alphas).sum(0)


def ensemble_of(steppers: Sequence[Stepper]) -> Stepper:
    """One stepper as itself (a fused ONNX stepper keeps its one-call search step), several as
    an :class:`EnsembleStepper` with equal weights."""
    return steppers[0] if len(steppers) == 1 else EnsembleStepper(steppers)
