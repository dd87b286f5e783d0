"""Show, Attend and Tell decoder: soft (Bahdanau) attention over the encoder grid + GRU/LSTM.

Speed comes from doing every per-caption and per-token computation that does not depend on the
recurrence outside the time loop:
- image features are projected and their attention keys computed once per image (``prepare``);
- the embedding half of the cell's input projection is one matmul over all steps;
- the output layer and the vocabulary projection run once over all valid tokens;
- the batch is sorted by length, so step t only runs the captions that are still going.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.features.encoders import encoder_top, get_spec
from captioner.model.config import DecoderConfig

Memory = tuple[torch.Tensor, torch.Tensor]  # (context feats (B, P, D), attention keys (B, P, A))
State = tuple[torch.Tensor, ...]  # (h,) for GRU, (h, c) for LSTM; each (B, H)


@dataclass
class TeacherForcedOutput:
    logits: torch.Tensor  # (N, V) for the N valid target tokens, packed step-major
    targets: torch.Tensor  # (N,) the token each row of logits should predict
    alphas: torch.Tensor  # (B, T, P) attention per step, zeros past each caption's end
    mask: torch.Tensor  # (B, T) True where the step predicts a real token


class AdditiveAttention(nn.Module):
    """score_p = v . tanh(K_p + q): keys K are computed once per image (``keys``); the query
    projection q = W h is fused into the decoder's single hidden-state matmul."""

    def __init__(self, context_dim: int, attention_dim: int):
        super().__init__()
        self.key_proj = nn.Linear(context_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def keys(self, feats: torch.Tensor) -> torch.Tensor:
        return self.key_proj(feats)  # (B, P, A)

    def forward(self, query: torch.Tensor, feats: torch.Tensor, keys: torch.Tensor):
        scores = self.score(torch.tanh(keys + query.unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = torch.softmax(scores, dim=1)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (B, D)
        return context, alpha


class ShowAttendTellDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, pretrained_top: bool = False):
        """``pretrained_top``: start the encoder top (if the config has one) from its ImageNet
        weights, as training does; otherwise its weights are expected from a saved model."""
        super().__init__()
        self.config = config
        c = config
        gates = 3 if c.cell == "gru" else 4
        self.num_gates = gates
        # the encoder's last blocks, fine-tuned on captions: the grid arrives as the trunk's
        self.encoder_top = (
            encoder_top(c.encoder_top, c.encoder_top_blocks, pretrained_top)
            if c.encoder_top_blocks
            else None
        )
        grid_dim = get_spec(c.encoder_top).channels if self.encoder_top else c.feature_dim
        # LayerNorm first: raw grids are unnormalised (channel scales differ by ~100x), which
        # would saturate tanh and attention from the first step
        self.feat_proj = nn.Sequential(
            nn.LayerNorm(grid_dim), nn.Linear(grid_dim, c.context_dim), nn.ReLU()
        )
        self.attention = AdditiveAttention(c.context_dim, c.attention_dim)
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        self.init_h = nn.Linear(c.context_dim, c.hidden_dim)
        self.init_c = nn.Linear(c.context_dim, c.hidden_dim) if c.cell == "lstm" else None
        # everything computed from h_{t-1} in one matmul: the cell's recurrent gates, the
        # attention query and SAT's context gate (beta)
        self.hidden_splits = [gates * c.hidden_dim, c.attention_dim, c.context_dim]
        self.w_hidden = nn.Linear(c.hidden_dim, sum(self.hidden_splits))
        # cell input = [embedding, context]; the embedding part is applied to all steps at once
        self.w_embed = nn.Linear(c.embed_dim, gates * c.hidden_dim)
        self.w_context = nn.Linear(c.context_dim, gates * c.hidden_dim, bias=False)
        # deep output (SAT eq. 7): L_o(E y_{t-1} + L_h h_t + L_z z_t)
        self.out_hidden = nn.Linear(c.hidden_dim, c.embed_dim)
        self.out_context = nn.Linear(c.context_dim, c.embed_dim, bias=False)
        self.out_vocab = nn.Linear(c.embed_dim, c.vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    # ---- pieces shared by forward() and step() -------------------------------------------
    def prepare(self, features: torch.Tensor) -> tuple[Memory, State]:
        """(B, P, C) encoder grid -> attention memory and the initial recurrent state."""
        features = features.float()
        if self.encoder_top is not None:
            features = self.encoder_top(features)  # trunk (B, P, C_trunk) -> (B, P, C)
        feats = self.dropout(self.feat_proj(features))  # (B, P, D)
        keys = self.attention.keys(feats)  # (B, P, A)
        mean = feats.mean(dim=1)  # (B, D)
        h = torch.tanh(self.init_h(mean))  # (B, H)
        state: State = (h,) if self.init_c is None else (h, torch.tanh(self.init_c(mean)))
        return (feats, keys), state

    def _cell(self, x_embed: torch.Tensor, state: State, memory: Memory):
        """One recurrence step given the precomputed embedding projection x_embed (B, G*H)."""
        feats, keys = memory
        h = state[0]
        gh, query, beta = self.w_hidden(h).split(
            self.hidden_splits, dim=1
        )  # (B, G*H), (B, A), (B, D)
        context, alpha = self.attention(query, feats, keys)  # (B, D), (B, P)
        context = torch.sigmoid(beta) * context  # (B, D)
        gx = x_embed + self.w_context(context)  # (B, G*H)
        if self.config.cell == "gru":
            xr, xz, xn = gx.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            new_state: State = ((1 - z) * n + z * h,)
        else:
            i, f, g, o = (gx + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
            new_state = (torch.sigmoid(o) * torch.tanh(c), c)
        return new_state, context, alpha

    def _output(self, embedded: torch.Tensor, h: torch.Tensor, context: torch.Tensor):
        deep = embedded + self.out_hidden(h) + self.out_context(context)  # (N, E)
        return self.out_vocab(self.dropout(torch.tanh(deep)))  # (N, V)

    # ---- training: teacher forcing -----------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> TeacherForcedOutput:
        """Teacher forcing: predicts captions[:, 1:] from captions[:, :-1].

        features (I, P, C) image grids; captions (B, L) = <start> w1 .. wn <end> <pad>...;
        lengths (B,) counts <start> through <end>; image_index (B,) is the row of each caption's
        image in ``features`` (default: row b), so an image captioned 5 times is projected once.
        """
        assert features.dim() == 3, f"features must be (I, P, C), got {tuple(features.shape)}"
        assert captions.dim() == 2, f"captions must be (B, L), got {tuple(captions.shape)}"
        B = captions.size(0)
        if image_index is None:
            assert features.size(0) == B, "without image_index, features and captions pair up"
            image_index = torch.arange(B)
        lengths = lengths.to(torch.long).cpu()
        steps = lengths - 1  # (B,) tokens to predict per caption
        order = torch.argsort(steps, descending=True, stable=True)
        steps_sorted = steps[order]
        captions = captions[order]
        T = int(steps_sorted[0])
        (feats, keys), state = self.prepare(features)  # per image: (I, P, D), (I, P, A)
        rows = image_index[order]
        memory: Memory = (feats[rows], keys[rows])  # (B, P, D), (B, P, A)
        state = tuple(s[rows] for s in state)
        embedded = self.dropout(self.embedding(captions[:, :T]))  # (B, T, E)
        # one matmul for all steps; unbind once (per-step indexing would make backward build a
        # zero-filled (B, T, .) gradient for every step)
        x_steps = self.w_embed(embedded).transpose(0, 1).unbind(0)  # T x (B, G*H)
        emb_steps = embedded.transpose(0, 1).unbind(0)  # T x (B, E)
        # active[t] = how many (sorted) captions still predict a token at step t
        active = (steps_sorted.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1).tolist()
        hs, contexts, embeds, targets, alphas = [], [], [], [], []
        for t in range(T):
            n = active[t]
            m = state[0].size(0)
            # finished captions drop out, so padding costs (almost) nothing; shrink in steps of
            # >= 1/8, since every shrink costs a full-size gradient buffer in backward
            if n < m * 7 // 8:
                m = n
                state = tuple(s[:m] for s in state)
                memory = (memory[0][:m], memory[1][:m])
            state, context, alpha = self._cell(x_steps[t][:m], state, memory)
            hs.append(state[0][:n])
            contexts.append(context[:n])
            embeds.append(emb_steps[t][:n])
            targets.append(captions[:n, t + 1])
            alphas.append(alpha[:n])
        logits = self._output(torch.cat(embeds), torch.cat(hs), torch.cat(contexts))  # (N, V)
        alpha_sorted = torch.stack([F.pad(a, (0, 0, 0, B - a.size(0))) for a in alphas], 1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B)
        mask = torch.arange(T).unsqueeze(0) < steps.unsqueeze(1)  # (B, T), original order
        return TeacherForcedOutput(logits, torch.cat(targets), alpha_sorted[inverse], mask)

    # ---- inference: the Stepper protocol ---------------------------------------------------
    def start(self, features: torch.Tensor) -> tuple[Memory, State]:
        return self.prepare(features)

    def step(self, tokens: torch.Tensor, state: State, memory: Memory):
        """tokens (B,) -> logits (B, V), new state, alpha (B, P)."""
        embedded = self.embedding(tokens)  # (B, E)
        state, context, alpha = self._cell(self.w_embed(embedded), state, memory)
        return self._output(embedded, state[0], context), state, alpha


def masked_caption_loss(
    out: TeacherForcedOutput, alpha_c: float = 1.0, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over real tokens only (padding never enters, by construction) plus the
    doubly stochastic attention penalty alpha_c * mean((1 - sum_t alpha_tp)^2).
    Returns (total loss, cross-entropy alone)."""
    ce = F.cross_entropy(out.logits, out.targets, label_smoothing=label_smoothing)
    if alpha_c <= 0:
        return ce, ce.detach()
    coverage = out.alphas.sum(dim=1)  # (B, P)
    penalty = ((1.0 - coverage) ** 2).mean()
    return ce + alpha_c * penalty, ce.detach()
