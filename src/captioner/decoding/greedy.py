"""Greedy decoding over any Stepper (the conventions it shares with beam search:
:mod:`captioner.decoding.steps`)."""

from __future__ import annotations

import numpy as np
import torch

from captioner.decoding.beam import beam_search
from captioner.decoding.fused import uses_fused
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


@torch.inference_mode()
def greedy_decode(
    stepper: Stepper,
    features: torch.Tensor,
    *,
    start_id: int = 1,
    end_id: int = 2,
    unk_id: int = 3,
    pad_id: int = 0,
    max_length: int = 20,
    suppress_unk: bool = False,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    word_bias: torch.Tensor | None = None,
    bias_groups: torch.Tensor | None = None,
) -> list[DecodeResult]:
    """Decode every image of ``features`` (B, P, C) at once, taking the most likely token at
    each step; a row stops at its first ``<end>``. Finished rows are dropped from the batch, so
    the stepper only runs the captions still going. ``word_bias`` (B, V) and ``bias_groups``
    (V,): see the module doc."""
    check_inputs(features, max_length)
    B = features.size(0)
    if B == 0:
        return []
    if uses_fused(stepper):  # beam 1 is greedy (tested), in one call
        settings = dict(
            max_length=max_length,
            suppress_unk=suppress_unk,
            word_bias=word_bias,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        ids = dict(start_id=start_id, end_id=end_id, unk_id=unk_id, pad_id=pad_id)
        return beam_search(
            stepper,
            features,
            beam_size=1,
            length_penalty=length_penalty,
            bias_groups=bias_groups,
            **settings,
            **ids,
        )
    row_bias = check_word_bias(word_bias, B)  # (n, V) each live row's remaining bias
    device = features.device
    banned = torch.tensor(banned_ids(pad_id, start_id, unk_id, suppress_unk), device=device)
    memory, state = stepper.start(features)
    active = torch.arange(B, device=device)  # (n,) image of each live row
    tokens = torch.full((B,), start_id, dtype=torch.long, device=device)  # (n,)
    cum = torch.zeros(B, dtype=torch.float32, device=device)  # (n,) sum of log-probs so far
    hist_tok = torch.full((max_length, B), pad_id, dtype=torch.long, device=device)  # (T, B)
    hist_alpha: torch.Tensor | None = None  # (T, B, P), allocated once P is known
    totals = torch.zeros(B, dtype=torch.float32, device=device)  # (B,) final sums
    lengths = [0] * B
    for t in range(max_length):
        logits, state, alpha = stepper.step(tokens, state, memory)  # (n, V), ..., (n, P)
        if no_repeat_ngram_size > 0:
            past = hist_tok[:t, active].T  # (n, t)
            logits = block_repeated_ngrams(logits, past, no_repeat_ngram_size, end_id)
        logp = masked_log_probs(logits, banned, row_bias)  # (n, V)
        tokens = logp.argmax(dim=1)  # (n,) the first maximum on ties
        if row_bias is not None:
            row_bias = spend_bias(row_bias, tokens, bias_groups)
        cum = cum + logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (n,)
        if hist_alpha is None:
            hist_alpha = torch.zeros(max_length, B, alpha.size(1), device=device)  # (T, B, P)
        hist_tok[t, active] = tokens
        hist_alpha[t, active] = alpha.float()
        done = (
            torch.ones_like(tokens, dtype=torch.bool) if t == max_length - 1 else tokens == end_id
        )
        if not bool(done.any()):
            continue
        totals[active[done]] = cum[done]
        for b in active[done].tolist():
            lengths[b] = t + 1
        keep = (~done).nonzero().squeeze(1)  # (n',)
        if keep.numel() == 0:
            break
        active, cum, tokens = active[keep], cum[keep], tokens[keep]
        if row_bias is not None:
            row_bias = row_bias[keep]
        state, memory = select_rows(state, keep), select_rows(memory, keep)

    tok_np = hist_tok.cpu().numpy()  # (T, B)
    alpha_np = hist_alpha.cpu().numpy()  # (T, B, P)
    results = []
    for b, (total, length) in enumerate(zip(totals.tolist(), lengths, strict=True)):
        ids = tok_np[:length, b].tolist()
        if ids and ids[-1] == end_id:
            ids = ids[:-1]
        score = normalised_score(total, length, length_penalty)
        alphas = np.ascontiguousarray(alpha_np[: len(ids), b], dtype=np.float32)  # (L, P)
        results.append(DecodeResult(ids, score, alphas, [(list(ids), score)]))
    return results
