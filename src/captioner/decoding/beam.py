"""Beam search over any Stepper, batched over images and beams.

Every time step makes one ``stepper.step`` call for all live images x ``beam_size`` beams: the
first step runs one row per image (all its beams are just <start>), then the memory is expanded
once to B*K rows, and the state is reordered with one ``index_select`` per step. Images whose
beams are all finished are dropped from the batch.

The search keeps K slots per image (a "shrinking" beam). At each step the K - F best one-token
extensions of the live beams are taken, F being the number of hypotheses the image has
finished so far; an extension that is ``<end>`` becomes a finished hypothesis (its score is
final and it keeps its slot for good), the others are the live beams of the next step, slot j
holding the j-th best. (Refilling K live beams after each ``<end>`` and stopping on a bound
would break ``beam_size=1`` = greedy, as a length-normalised score can still rise.) So every
image ends with exactly ``beam_size`` finished hypotheses (fewer only if the stepper gives
fewer than that a non-zero probability), and an image is done when no beam is left alive, at
which point nothing can beat its best; at ``max_length`` the beams still alive count as
finished. Candidates are ranked by their summed log-probability; finished hypotheses by
``score = sum / length ** length_penalty`` (see :mod:`captioner.decoding.steps`).

With ``beam_size=1`` this is exactly greedy decoding (same tokens, same score): both take the
first maximum on ties and run the stepper on the same rows. With ``beam_size`` at least the
number of possible sequences it is exhaustive, hence exact.

Attention is kept per step and slot with backpointers, and gathered for the best hypothesis
only.

The bookkeeping is numpy on (n, K) arrays. What touches the stepper is an *expander*: a fused
stepper (:mod:`captioner.decoding.fused`, the ONNX Runtime decoder) returns each image's K best
candidates itself, with the memory kept one row per image; any other Stepper goes through
:class:`TorchExpander` (logits -> masked log-probs -> top k in torch, the memory expanded to
the K beams once).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from captioner.decoding.fused import FusedExpander, uses_fused
from captioner.decoding.steps import (
    DecodeResult,
    Stepper,
    banned_ids,
    block_repeated_ngrams,
    check_inputs,
    check_word_bias,
    masked_log_probs,
    normalised_score,
    select_rows,
    spend_bias,
)


def _top_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (N, M) -> the k best values and indices per row (N, k), best first, ties broken
    by the lowest index. ``topk`` leaves the order of equal values unspecified, so on a tie
    among the finite values it returns this falls back to a stable sort."""
    m = min(k + 1, scores.size(1))
    values, index = scores.topk(m, dim=1)  # (N, m), sorted descending
    same = values[:, 1:] == values[:, :-1]  # (N, m - 1)
    if bool(same.any()) and bool((same & (values[:, 1:] > float("-inf"))).any()):
        values, index = scores.sort(dim=1, descending=True, stable=True)  # (N, M)
    return values[:, :k], index[:, :k]


class TorchExpander:
    """Any Stepper's search step in torch: the memory goes from one row per image to K (once,
    after the first step); the state, the rows' word bias and the n-gram history are reordered
    to the new beams."""

    def __init__(
        self,
        stepper: Stepper,
        features: torch.Tensor,
        banned: torch.Tensor,
        word_bias: torch.Tensor | None,
        bias_groups: torch.Tensor | None,
        beam_size: int,
        no_repeat_ngram_size: int,
        end_id: int,
    ) -> None:
        self.stepper, self.banned, self.groups = stepper, banned, bias_groups
        self.row_bias = word_bias  # (n*w, V) each row's remaining bias, or None
        self.K, self.ngram, self.end_id = beam_size, no_repeat_ngram_size, end_id
        self.device = features.device
        self.memory, self.state = stepper.start(features)
        self.emitted = torch.zeros((features.size(0), 0), dtype=torch.long, device=self.device)
        self.vocab_size = 0  # V, known after the first step

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def step(
        self, tokens: np.ndarray, cum: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens (n*w,), cum (n, w) -> values, index (n, k) (row * V + word; -inf past the
        w*V candidates), alpha (n*w, P), all numpy."""
        n, width = cum.shape
        logits, self.state, alpha = self.stepper.step(self._tensor(tokens), self.state, self.memory)
        V = self.vocab_size = logits.size(1)  # logits (n*w, V)
        if self.ngram > 0:
            logits = block_repeated_ngrams(logits, self.emitted, self.ngram, self.end_id)
        logp = masked_log_probs(logits, self.banned, self.row_bias)  # (n*w, V)
        cand = (self._tensor(cum).view(n * width, 1) + logp).view(n, width * V)  # (n, w*V)
        if width * V < k:  # fewer candidates than slots (tiny vocabularies)
            cand = F.pad(cand, (0, k - width * V), value=float("-inf"))  # (n, k)
        values, index = _top_candidates(cand, k)  # (n, k) best first
        index = torch.where(index < width * V, index, 0)  # padding: row 0, word 0 (invalid)
        alpha = alpha.detach().to(torch.float32).cpu().numpy().copy()  # (n*w, P)
        return values.cpu().numpy(), index.cpu().numpy(), alpha

    def reorder(
        self, rows: np.ndarray, images: np.ndarray | None, width: int, words: np.ndarray
    ) -> None:
        """State rows ``rows`` (n'*K,) for the next step; ``images`` (n',) kept (None: all);
        ``words`` (n', K) the new beams' last tokens (n-gram blocking, spent bias)."""
        rows_t = self._tensor(rows)
        self.state = select_rows(self.state, rows_t)  # each (n'*K, ...)
        if self.row_bias is not None:  # the parent's bias, less the new word's bonus
            bias = self.row_bias.index_select(0, rows_t)  # (n'*K, V)
            self.row_bias = spend_bias(bias, self._tensor(words).view(-1), self.groups)
        if self.ngram > 0:  # each new beam's tokens: its parent's, then its word
            emitted = self.emitted.index_select(0, rows_t)
            self.emitted = torch.cat([emitted, self._tensor(words).view(-1, 1)], 1)
        K = self.K
        if width == 1:  # expand the memory to K rows per image, once
            kept = np.arange(len(rows) // K) if images is None else images
            self.memory = select_rows(self.memory, self._tensor(np.repeat(kept, K)))
        elif images is not None:
            index = (images[:, None] * K + np.arange(K)).reshape(-1)  # (n'*K,)
            self.memory = select_rows(self.memory, self._tensor(index))


@torch.inference_mode()
def beam_search(
    stepper: Stepper,
    features: torch.Tensor,
    *,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float = 1.0,
    suppress_unk: bool = False,
    no_repeat_ngram_size: int = 0,
    start_id: int = 1,
    end_id: int = 2,
    unk_id: int = 3,
    pad_id: int = 0,
    word_bias: torch.Tensor | None = None,
    bias_groups: torch.Tensor | None = None,
) -> list[DecodeResult]:
    """Beam-search every image of ``features`` (B, P, C) with ``beam_size`` beams each.

    Returns one :class:`DecodeResult` per image: the best finished hypothesis, its attention,
    and ``alternatives``, every finished hypothesis (``beam_size`` of them) best first, the
    first being the result itself. ``score = sum of log-probs / length ** length_penalty``,
    length counting ``<end>``: 1 (default) is the mean token log-prob, the same score greedy
    gives; 0 ranks by raw sequence log-prob (favours short captions); values above 1 favour
    longer ones. ``max_length`` bounds the steps, ``<end>`` included. ``<pad>`` and
    ``<start>`` (and ``<unk>`` with ``suppress_unk``) are never emitted, nor, with
    ``no_repeat_ngram_size=n`` > 0, a token that would repeat an n-gram of its own beam.
    ``word_bias`` (B, V) and ``bias_groups`` (V,): see :mod:`captioner.decoding.greedy` (each
    beam spends its own bonus).
    """
    check_inputs(features, max_length)
    if int(beam_size) < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    B, K = features.size(0), int(beam_size)
    if B == 0:
        return []
    word_bias = check_word_bias(word_bias, B)
    banned_list = banned_ids(pad_id, start_id, unk_id, suppress_unk)
    if uses_fused(stepper):
        expander = FusedExpander(
            stepper, features, banned_list, word_bias, bias_groups, no_repeat_ngram_size, end_id
        )
    else:
        banned = torch.tensor(banned_list, device=features.device)
        expander = TorchExpander(
            stepper, features, banned, word_bias, bias_groups, K, no_repeat_ngram_size, end_id
        )
    slot = np.arange(K)  # (K,)
    width = 1  # rows per image in the stepper's batch: 1 at the first step, then K
    active = np.arange(B)  # (n,) original image of each live image
    tokens = np.full(B, start_id, dtype=np.int64)  # (n*width,)
    # Slot j of an image holds the beam that ranked j-th at the last step; a slot whose
    # candidate finished (or was not taken) is empty, with a summed log-prob of -inf.
    cum = np.zeros((B, 1), dtype=np.float32)  # (n, width) summed log-prob of each slot's beam
    slots_left = np.full(B, K)  # (n,) K - finished
    rank_ok = np.ones((B, K), dtype=bool)  # (n, K) rank < slots_left
    # per step: (live images, token and parent slot of each rank (n, K), attention (n*width, P))
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    # finished[b]: (total log-prob, step, parent slot, last token, ended with <end>)
    finished: list[list[tuple[float, int, int, int, bool]]] = [[] for _ in range(B)]

    for t in range(max_length):
        last = t == max_length - 1
        n = active.size
        top_val, top_idx, alpha = expander.step(tokens, cum, K)  # (n, K), (n, K), (n*w, P)
        parent, word = np.divmod(top_idx, expander.vocab_size)  # (n, K) slot extended, word
        valid = rank_ok & (top_val > -np.inf)  # (n, K)
        ends = valid if last else valid & (word == end_id)  # (n, K)
        history.append((active, word, parent, alpha))

        if ends.any():
            img, rank = ends.nonzero()  # (E,), (E,) in image, then rank order
            records = zip(
                active[img].tolist(),
                top_val[img, rank].tolist(),
                parent[img, rank].tolist(),
                word[img, rank].tolist(),
                strict=True,
            )
            for b, total, par, w in records:
                finished[b].append((total, t, par, w, w == end_id))
            slots_left = slots_left - ends.sum(axis=1)  # (n,)
            rank_ok = slot < slots_left[:, None]  # (n, K)
        if last:
            break

        alive = valid & ~ends  # (n, K)
        cum = np.where(alive, top_val, -np.inf).astype(np.float32)  # (n, K)
        src = np.arange(n)[:, None] * width + np.where(alive, parent, 0)  # (n, K) parent rows
        live = alive.any(axis=1)  # (n,)
        images = None  # the current images to keep, when some are dropped
        if not live.all():  # drop the images whose beams have all finished
            images = live.nonzero()[0]  # (n',)
            if images.size == 0:
                break
            active, cum, src = active[images], cum[images], src[images]
            slots_left, rank_ok, word = slots_left[images], rank_ok[images], word[images]
        expander.reorder(src.reshape(-1), images, width, word)
        width = K
        tokens = word.reshape(-1)  # (n'*K,) dead slots feed whatever they hold; it is ignored
    return _results(B, history, finished, length_penalty)


def _results(
    B: int,
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    finished: list[list[tuple[float, int, int, int, bool]]],
    length_penalty: float,
) -> list[DecodeResult]:
    """Every image's finished hypotheses, ranked, with the best one's attention: by following
    the backpointers of ``history``."""
    # the history, as lists: tok_hist[t][i][j] for the i-th image live at step t
    position = [{b: i for i, b in enumerate(act.tolist())} for act, _, _, _ in history]
    tok_hist = [word.tolist() for _, word, _, _ in history]
    par_hist = [parent.tolist() for _, _, parent, _ in history]
    P = history[0][3].shape[1]
    alpha_hist = [a.reshape(len(act), -1, P) for act, _, _, a in history]
    results = []
    for b in range(B):
        hyps = []  # (score, token ids, steps and slots of their attention rows)
        for total, t, par, w, ended in finished[b]:
            ids, steps, slots = [w], [t], [par]
            s = par
            for tt in range(t - 1, -1, -1):  # follow the backpointers to the first step
                i = position[tt][b]
                ids.append(tok_hist[tt][i][s])
                s = par_hist[tt][i][s]
                steps.append(tt)
                slots.append(s)
            ids, steps, slots = ids[::-1], steps[::-1], slots[::-1]
            if ended:  # drop <end> and the attention that chose it
                ids, steps, slots = ids[:-1], steps[:-1], slots[:-1]
            hyps.append((normalised_score(total, t + 1, length_penalty), ids, steps, slots))
        hyps.sort(key=lambda h: -h[0])  # stable: equal scores keep step, then rank order
        if not hyps:  # the stepper gave every allowed token zero probability
            results.append(DecodeResult([], float("-inf"), np.zeros((0, P), np.float32), []))
            continue
        every_alphas = []
        for _, ids, steps, slots in hyps:
            alphas = np.zeros((len(ids), P), dtype=np.float32)  # (L, P)
            for row, (tt, s) in enumerate(zip(steps, slots, strict=True)):
                alphas[row] = alpha_hist[tt][position[tt][b], s]
            every_alphas.append(alphas)
        score, ids = hyps[0][0], hyps[0][1]
        alternatives = [(h[1], h[0]) for h in hyps]
        results.append(DecodeResult(ids, score, every_alphas[0], alternatives, every_alphas))
    return results
