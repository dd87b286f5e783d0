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
``score = sum / length ** length_penalty`` (see :mod:`captioner.decoding.greedy`).

With ``beam_size=1`` this is exactly greedy decoding (same tokens, same score): both take the
first maximum on ties and run the stepper on the same rows. With ``beam_size`` at least the
number of possible sequences it is exhaustive, hence exact.

Attention is kept per step and slot with backpointers, and gathered for the best hypothesis
only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from captioner.decoding.greedy import (
    DecodeResult,
    Stepper,
    banned_ids,
    block_repeated_ngrams,
    check_inputs,
    check_word_bias,
    masked_log_probs,
    normalised_score,
    select_rows,
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
    """
    check_inputs(features, max_length)
    if int(beam_size) < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    B, K = features.size(0), int(beam_size)
    if B == 0:
        return []
    word_bias = check_word_bias(word_bias, B)
    device = features.device
    banned = torch.tensor(banned_ids(pad_id, start_id, unk_id, suppress_unk), device=device)
    slot = torch.arange(K, device=device)  # (K,)

    memory, state = stepper.start(features)  # B rows: every beam of an image is <start> alone
    width = 1  # rows per image in the stepper's batch: 1 at the first step, then K
    active = torch.arange(B, device=device)  # (n,) original image of each live image
    tokens = torch.full((B,), start_id, dtype=torch.long, device=device)  # (n*width,)
    # Slot j of an image holds the beam that ranked j-th at the last step; a slot whose
    # candidate finished (or was not taken) is empty, with a summed log-prob of -inf.
    cum = torch.zeros((B, 1), device=device)  # (n, width) summed log-prob of each slot's beam
    slots_left = torch.full((B,), K, dtype=torch.long, device=device)  # (n,) K - finished
    rank_ok = torch.ones((B, K), dtype=torch.bool, device=device)  # (n, K) rank < slots_left
    row_base = torch.arange(B, device=device).unsqueeze(1)  # (n, 1) first row of each image
    emitted = torch.zeros((B, 0), dtype=torch.long, device=device)  # (n*width, t) per row
    # per step: (live images, token and parent slot of each rank (n, K), attention (n*width, P))
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # finished[b]: (total log-prob, step, parent slot, last token, ended with <end>)
    finished: list[list[tuple[float, int, int, int, bool]]] = [[] for _ in range(B)]

    for t in range(max_length):
        last = t == max_length - 1
        n = active.numel()
        logits, state, alpha = stepper.step(tokens, state, memory)  # (n*w, V), ..., (n*w, P)
        V = logits.size(1)
        if no_repeat_ngram_size > 0:
            logits = block_repeated_ngrams(logits, emitted, no_repeat_ngram_size, end_id)
        bias = None
        if word_bias is not None:  # each image's row, repeated for its beams
            bias = word_bias.index_select(0, active).repeat_interleave(width, dim=0)  # (n*w, V)
        logp = masked_log_probs(logits, banned, bias)  # (n*w, V)
        cand = (cum.view(n * width, 1) + logp).view(n, width * V)  # (n, w*V)
        padded = width * V < K  # fewer candidates than slots (tiny vocabularies)
        if padded:
            cand = F.pad(cand, (0, K - width * V), value=float("-inf"))  # (n, K)
        top_val, top_idx = _top_candidates(cand, K)  # (n, K), (n, K) best first
        parent = torch.div(top_idx, V, rounding_mode="floor")  # (n, K) slot each one extends
        word = top_idx % V  # (n, K)
        valid = rank_ok & (top_val > float("-inf"))  # (n, K)
        ends = valid if last else valid & (word == end_id)  # (n, K)
        history.append((active, word, parent, alpha.to(torch.float32, copy=True)))

        done = ends.nonzero()  # (E, 2) image, rank
        if done.numel():
            img, rank = done.unbind(1)  # (E,), (E,) in image, then rank order
            records = zip(
                active[img].tolist(),
                top_val[img, rank].tolist(),
                parent[img, rank].tolist(),
                word[img, rank].tolist(),
                strict=True,
            )
            for b, total, par, w in records:
                finished[b].append((total, t, par, w, w == end_id))
            slots_left = slots_left - ends.sum(dim=1)  # (n,)
            rank_ok = slot < slots_left.unsqueeze(1)  # (n, K)
        if last:
            break

        alive = valid & ~ends  # (n, K)
        cum = torch.where(alive, top_val, float("-inf"))  # (n, K)
        if padded:  # the padding's "parents" are out of range: point them at slot 0
            parent = torch.where(alive, parent, 0)  # (n, K)
        src = row_base * width + parent  # (n, K) row of each new beam's parent
        live = alive.any(dim=1)  # (n,)
        images = None  # rows of the current memory's images to keep, when some are dropped
        if not bool(live.all()):  # drop the images whose beams have all finished
            images = live.nonzero().squeeze(1)  # (n',)
            if images.numel() == 0:
                break
            active, cum, src = active[images], cum[images], src[images]
            slots_left, rank_ok, word = slots_left[images], rank_ok[images], word[images]
            row_base = row_base[: images.numel()]  # (n', 1)
        state = select_rows(state, src.view(-1))  # each (n'*K, ...)
        if no_repeat_ngram_size > 0:  # each new beam's tokens: its parent's, then its word
            emitted = torch.cat([emitted.index_select(0, src.view(-1)), word.view(-1, 1)], 1)
        if width == 1:  # expand the memory to K rows per image, once
            images = torch.arange(n, device=device) if images is None else images
            memory = select_rows(memory, images.repeat_interleave(K))  # each (n'*K, ...)
        elif images is not None:
            memory = select_rows(memory, ((images * K).unsqueeze(1) + slot).view(-1))
        width = K
        tokens = word.view(-1)  # (n'*K,) dead slots feed whatever they hold; it is ignored

    # the history, as lists: tok_hist[t][i][j] for the i-th image live at step t
    position = [{b: i for i, b in enumerate(act.tolist())} for act, _, _, _ in history]
    tok_hist = [word.tolist() for _, word, _, _ in history]
    par_hist = [parent.tolist() for _, _, parent, _ in history]
    P = history[0][3].size(1)
    alpha_hist = [a.cpu().numpy().reshape(len(act), -1, P) for act, _, _, a in history]
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
        score, ids, steps, slots = hyps[0]
        alphas = np.zeros((len(ids), P), dtype=np.float32)  # (L, P)
        for row, (tt, s) in enumerate(zip(steps, slots, strict=True)):
            alphas[row] = alpha_hist[tt][position[tt][b], s]
        results.append(DecodeResult(ids, score, alphas, [(h[1], h[0]) for h in hyps]))
    return results
