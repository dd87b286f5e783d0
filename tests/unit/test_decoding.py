"""Greedy and beam search over the Stepper protocol: hand-checked toy steppers, an exhaustive
search against brute force, and the real Show-Attend-Tell decoder."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from captioner.decoding import DecodeResult, beam_search, greedy_decode
from captioner.model.config import DecoderConfig
from captioner.model.decoder import ShowAttendTellDecoder

PAD, START, END, UNK = 0, 1, 2, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- toy steppers ------------------------------------------------------------------------
class ToyStepper:
    """A stepper whose next-token logits are any function of (image, words so far).

    The state is the prefix, <start> included, as a base-V number (the leading <start> = 1 makes
    it unambiguous); the memory holds the image index, read from features[:, 0, 0]. The
    attention is a function of (image, prefix) too, so backpointer bookkeeping can be checked.
    """

    def __init__(self, vocab_size: int, logits_fn, num_pixels: int = 4):
        self.V = vocab_size
        self.P = num_pixels
        self.logits_fn = logits_fn  # (image, prefix tuple) -> (V,) logits
        self.calls = 0

    def start(self, features: torch.Tensor):
        image = features[:, 0, 0].round().long()  # (B,)
        code = torch.zeros(features.size(0), dtype=torch.long)  # (B,)
        return (image,), (code,)

    def prefix(self, code: int) -> tuple[int, ...]:
        digits = []
        while code:
            code, d = divmod(code, self.V)
            digits.append(d)
        return tuple(reversed(digits))[1:]  # drop the leading <start>

    def alpha(self, image: int, prefix: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([7, image, len(prefix), *prefix])
        a = np.exp(rng.normal(size=self.P))
        return a / a.sum()

    def step(self, tokens: torch.Tensor, state, memory):
        self.calls += 1
        (image,), (code,) = memory, state
        code = code * self.V + tokens  # (B,)
        logits, alphas = [], []
        for i, c in zip(image.tolist(), code.tolist(), strict=True):
            p = self.prefix(c)
            logits.append(np.asarray(self.logits_fn(i, p), dtype=np.float32))
            alphas.append(self.alpha(i, p))
        logits_t = torch.from_numpy(np.stack(logits))  # (B, V)
        alpha_t = torch.from_numpy(np.stack(alphas)).float()  # (B, P)
        return logits_t, (code,), alpha_t


def table_stepper(vocab_size: int, table: dict) -> ToyStepper:
    """Probabilities given by hand: table[prefix] = {token: prob}; a prefix not in the table
    ends for sure."""

    def logits_fn(image, prefix):
        probs = table.get(prefix, {END: 1.0})
        logits = np.full(vocab_size, -np.inf)
        for token, p in probs.items():
            logits[token] = math.log(p)
        return logits

    return ToyStepper(vocab_size, logits_fn)


def random_stepper(vocab_size: int, seed: int = 0, end_bias: float = 0.0, unk_bias=0.0):
    """Pseudo-random logits, a fixed function of (seed, image, prefix)."""

    def logits_fn(image, prefix):
        rng = np.random.default_rng([seed, image, len(prefix), *prefix])
        logits = 2.0 * rng.normal(size=vocab_size)
        logits[END] += end_bias
        logits[UNK] += unk_bias
        return logits

    return ToyStepper(vocab_size, logits_fn)


def toy_features(n: int, first_image: int = 0) -> torch.Tensor:
    f = torch.zeros(n, 4, 2)  # (B, P, C)
    f[:, 0, 0] = torch.arange(first_image, first_image + n, dtype=torch.float32)
    return f


def log_probs(stepper: ToyStepper, image: int, prefix: tuple[int, ...], banned) -> np.ndarray:
    """float64 reference of the decoders' masked log-softmax."""
    logits = np.asarray(stepper.logits_fn(image, prefix), dtype=np.float64)
    logits[list(banned)] = -np.inf
    m = logits.max()
    return logits - m - np.log(np.exp(logits - m).sum())


def replay(stepper, features: torch.Tensor, ids: list[int], max_length: int, length_penalty=1.0):
    """Teacher-force one image along ``ids`` (+ <end> unless cut off at max_length) with the
    banned tokens of the decoders: -> (score, alphas (len(ids), P))."""
    memory, state = stepper.start(features)
    token = torch.tensor([START])
    total, alphas = 0.0, []
    targets = ids + ([END] if len(ids) < max_length else [])
    for target in targets:
        logits, state, alpha = stepper.step(token, state, memory)
        logits = logits.double()
        logits[:, [PAD, START]] = -math.inf
        total += float(torch.log_softmax(logits, dim=1)[0, target])
        alphas.append(alpha[0].double().numpy())
        token = torch.tensor([target])
    alphas = np.array(alphas).reshape(len(targets), -1)[: len(ids)]  # (len(ids), P)
    return total / len(targets) ** length_penalty, alphas


# ---- the real decoder ----------------------------------------------------------------------
# small random decoders with their weights (and the features) scaled so that captions have
# varied lengths and differ between images
REAL_SETTINGS = {"gru": (2.0, 5.0, 1.5), "lstm": (4.0, 5.0, 1.0)}


def real_decoder(cell: str, vocab_size: int = 40) -> tuple[ShowAttendTellDecoder, torch.Tensor]:
    scale, feature_scale, end_bias = REAL_SETTINGS[cell]
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=vocab_size,
        feature_dim=24,
        num_pixels=16,
        embed_dim=32,
        hidden_dim=32,
        attention_dim=32,
        context_dim=32,
        cell=cell,
    )
    decoder = ShowAttendTellDecoder(config).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(scale)
        decoder.out_vocab.bias[END] += end_bias
    features = feature_scale * torch.randn(6, 16, 24, generator=torch.Generator().manual_seed(1))
    return decoder, features


def tokens(results: list[DecodeResult]) -> list[list[int]]:
    return [r.token_ids for r in results]


# ---- hand-checked examples -----------------------------------------------------------------
def test_beam_finds_the_better_sequence_greedy_misses():
    # greedy: 4 (.5) then 6 (.4) -> P = .20; beam 2 keeps 5 (.4) whose 6 (.9) gives P = .36
    table = {
        (): {4: 0.5, 5: 0.4, END: 0.1},
        (4,): {6: 0.4, 7: 0.35, END: 0.25},
        (5,): {6: 0.9, END: 0.1},
    }
    features = toy_features(1)
    greedy = greedy_decode(table_stepper(8, table), features)[0]
    assert greedy.token_ids == [4, 6]
    assert greedy.score == pytest.approx(math.log(0.5 * 0.4) / 3, abs=1e-6)
    assert greedy.alternatives == [([4, 6], greedy.score)]

    beam = beam_search(table_stepper(8, table), features, beam_size=2)[0]
    assert beam.token_ids == [5, 6]
    assert beam.score == pytest.approx(math.log(0.4 * 0.9) / 3, abs=1e-6)
    assert [ids for ids, _ in beam.alternatives] == [[5, 6], [4, 6]]
    assert beam.alternatives[1][1] == pytest.approx(math.log(0.2) / 3, abs=1e-6)
    # raw log-probabilities rank them the same way
    beam0 = beam_search(table_stepper(8, table), features, beam_size=2, length_penalty=0.0)[0]
    assert beam0.token_ids == [5, 6]
    assert beam0.score == pytest.approx(math.log(0.36), abs=1e-6)


def test_an_early_finished_hypothesis_is_kept_while_a_longer_one_goes_on():
    table = {
        (): {4: 0.6, 5: 0.4},
        (4,): {END: 0.9, 6: 0.1},
        (5,): {6: 0.9, END: 0.1},
        (5, 6): {7: 0.6, END: 0.4},
    }
    # step 2: [4 <end>] (.54) finishes, [5 6] (.36) goes on alone and ends at step 4 with
    # P = .216: log(.216) / 4 = -.383 is worse than log(.54) / 2 = -.308
    stepper = table_stepper(8, table)
    result = beam_search(stepper, toy_features(1), beam_size=2, max_length=10)[0]
    assert stepper.calls == 4
    assert result.token_ids == [4]
    assert result.score == pytest.approx(math.log(0.54) / 2, abs=1e-6)
    assert [ids for ids, _ in result.alternatives] == [[4], [5, 6, 7]]
    assert result.alternatives[1][1] == pytest.approx(math.log(0.216) / 4, abs=1e-6)
    assert result.alphas.shape == (1, 4)


def test_an_empty_caption_is_a_valid_hypothesis():
    table = {(): {END: 0.7, 4: 0.3}, (4,): {5: 0.5, 6: 0.5}}
    result = beam_search(table_stepper(8, table), toy_features(1), beam_size=2, max_length=3)[0]
    assert result.token_ids == []
    assert result.score == pytest.approx(math.log(0.7), abs=1e-6)
    assert result.alphas.shape == (0, 4) and result.alphas.dtype == np.float32
    # 5 and 6 tie after 4: the lower id is kept
    ids, score = result.alternatives[1]
    assert ids == [4, 5]
    assert score == pytest.approx(math.log(0.3 * 0.5) / 3, abs=1e-6)


def test_ties_are_broken_by_the_lowest_token_id():
    table = {(): {6: 0.25, 4: 0.25, 5: 0.25, 7: 0.25}}
    for k in (1, 2, 4):
        result = beam_search(table_stepper(8, table), toy_features(1), beam_size=k)[0]
        assert [ids for ids, _ in result.alternatives] == [[4], [5], [6], [7]][:k]
    assert greedy_decode(table_stepper(8, table), toy_features(1))[0].token_ids == [4]


@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
def test_pad_and_start_are_never_emitted_and_unk_can_be_suppressed(decode):
    table = {(): {PAD: 0.4, START: 0.3, UNK: 0.2, 4: 0.1}, (UNK,): {UNK: 0.9, 5: 0.1}}
    features = toy_features(1)
    result = decode(table_stepper(8, table), features)[0]
    assert result.token_ids == [UNK, UNK]
    # log-probs are renormalised over what may be emitted: P(unk) = .2 / .3
    assert result.score == pytest.approx((math.log(2 / 3) + math.log(0.9)) / 3, abs=1e-6)
    suppressed = decode(table_stepper(8, table), features, suppress_unk=True)[0]
    assert suppressed.token_ids == [4]
    assert suppressed.score == pytest.approx(0.0, abs=1e-6)


# ---- exhaustive search = brute force ---------------------------------------------------------
def brute_force(stepper: ToyStepper, image: int, max_length: int, banned, length_penalty):
    """Every sequence decoding can produce: -> {token ids: score}, in float64."""
    allowed = [t for t in range(stepper.V) if t not in banned]
    words = [t for t in allowed if t != END]
    scores = {}
    for n in range(max_length + 1):
        for ids in itertools.product(words, repeat=n):
            targets = list(ids) + ([END] if n < max_length else [])
            total = sum(
                log_probs(stepper, image, tuple(ids[:i]), banned)[target]
                for i, target in enumerate(targets)
            )
            scores[ids] = total / len(targets) ** length_penalty
    return scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("suppress_unk", [False, True])
def test_exhaustive_beam_search_finds_the_brute_force_best(seed, length_penalty, suppress_unk):
    V, T = 6, 3
    stepper = random_stepper(V, seed=seed, end_bias=0.5)
    banned = {PAD, START} | ({UNK} if suppress_unk else set())
    results = beam_search(
        stepper,
        toy_features(2),
        beam_size=V**T,
        max_length=T,
        length_penalty=length_penalty,
        suppress_unk=suppress_unk,
    )
    for image, result in enumerate(results):
        scores = brute_force(stepper, image, T, banned, length_penalty)
        best = max(scores, key=scores.get)
        assert result.token_ids == list(best)
        assert result.score == pytest.approx(scores[best], abs=1e-5)
        # exhaustive: every possible sequence comes back once, with its score, best first
        assert len(result.alternatives) == len(scores)
        for ids, score in result.alternatives:
            assert score == pytest.approx(scores[tuple(ids)], abs=1e-5)
        got = [score for _, score in result.alternatives]
        assert got == sorted(got, reverse=True)


def reference_beam(stepper: ToyStepper, image: int, k: int, max_length: int, length_penalty):
    """The same search written plainly, one image and one hypothesis at a time, in float64."""
    banned = {PAD, START}
    alive, finished = [((), 0.0)], []
    for t in range(max_length):
        candidates = []
        for parent, (prefix, total) in enumerate(alive):
            logp = log_probs(stepper, image, prefix, banned)
            candidates += [
                (total + logp[w], parent, w) for w in range(stepper.V) if logp[w] > -1e30
            ]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        next_alive = []
        for total, parent, w in candidates[: k - len(finished)]:
            prefix = alive[parent][0] + (w,)
            if w == END or t == max_length - 1:
                ids = list(prefix[:-1] if w == END else prefix)
                finished.append((ids, total / (t + 1) ** length_penalty))
            else:
                next_alive.append((prefix, total))
        alive = next_alive
        if not alive:
            break
    return sorted(finished, key=lambda h: -h[1])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("beam_size", "max_length"), [(2, 5), (3, 6), (5, 4)])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_batched_beam_search_matches_a_plain_reference(seed, beam_size, max_length, length_penalty):
    stepper = random_stepper(7, seed=seed, end_bias=0.7)
    results = beam_search(
        stepper,
        toy_features(3),
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
    )
    for image, result in enumerate(results):
        expected = reference_beam(stepper, image, beam_size, max_length, length_penalty)
        assert [ids for ids, _ in result.alternatives] == [ids for ids, _ in expected]
        for (_, got), (_, want) in zip(result.alternatives, expected, strict=True):
            assert got == pytest.approx(want, abs=1e-5)


# ---- greedy = beam 1, ordering, determinism, batching ------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_beam_size_1_is_greedy_on_a_toy_stepper(seed):
    features = toy_features(5)
    greedy = greedy_decode(random_stepper(10, seed, end_bias=1.0), features, max_length=6)
    beam = beam_search(random_stepper(10, seed, end_bias=1.0), features, beam_size=1, max_length=6)
    assert tokens(beam) == tokens(greedy)
    assert len({len(ids) for ids in tokens(greedy)}) > 1  # rows stop at different steps
    for g, b in zip(greedy, beam, strict=True):
        assert b.score == g.score
        np.testing.assert_array_equal(b.alphas, g.alphas)
        assert b.alternatives == g.alternatives


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_size_1_is_greedy_on_the_real_decoder(cell, length_penalty):
    decoder, features = real_decoder(cell)
    greedy = greedy_decode(decoder, features, length_penalty=length_penalty)
    beam = beam_search(decoder, features, beam_size=1, length_penalty=length_penalty)
    assert tokens(beam) == tokens(greedy)
    for g, b in zip(greedy, beam, strict=True):
        assert b.score == g.score
        np.testing.assert_array_equal(b.alphas, g.alphas)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_alternatives_are_all_finished_beams_best_first(beam_size):
    decoder, features = real_decoder("lstm")
    for result in beam_search(decoder, features, beam_size=beam_size):
        assert len(result.alternatives) == beam_size
        scores = [score for _, score in result.alternatives]
        assert scores == sorted(scores, reverse=True)
        assert result.alternatives[0] == (result.token_ids, result.score)
        assert len({tuple(ids) for ids, _ in result.alternatives}) == beam_size


def test_decoding_is_deterministic():
    decoder, features = real_decoder("gru")
    for decode in (greedy_decode, beam_search):
        first, second = decode(decoder, features), decode(decoder, features)
        for a, b in zip(first, second, strict=True):
            assert (a.token_ids, a.score, a.alternatives) == (b.token_ids, b.score, b.alternatives)
            np.testing.assert_array_equal(a.alphas, b.alphas)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_batch_gives_what_each_image_gives_alone(cell, beam_size):
    decoder, features = real_decoder(cell)
    together = beam_search(decoder, features[:3], beam_size=beam_size)
    alone = [beam_search(decoder, features[i : i + 1], beam_size=beam_size)[0] for i in range(3)]
    assert tokens(together) == tokens(alone)
    for t, a in zip(together, alone, strict=True):
        assert t.score == pytest.approx(a.score, abs=1e-5)
        assert [ids for ids, _ in t.alternatives] == [ids for ids, _ in a.alternatives]
        np.testing.assert_allclose(t.alphas, a.alphas, atol=1e-5)
    greedy_together = greedy_decode(decoder, features[:3])
    greedy_alone = [greedy_decode(decoder, features[i : i + 1])[0] for i in range(3)]
    assert tokens(greedy_together) == tokens(greedy_alone)


def test_a_batch_of_toy_images_gives_what_each_gives_alone():
    stepper = random_stepper(9, seed=3, end_bias=1.0)
    together = beam_search(stepper, toy_features(4), beam_size=3, max_length=5)
    alone = [
        beam_search(stepper, toy_features(1, i), beam_size=3, max_length=5)[0] for i in range(4)
    ]
    assert [r.alternatives for r in together] == [r.alternatives for r in alone]


# ---- the real decoder ----------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_real_decoder_results_match_a_teacher_forced_replay(cell, beam_size):
    decoder, features = real_decoder(cell)
    results = beam_search(decoder, features, beam_size=beam_size)
    assert len(results) == len(features)
    for i, result in enumerate(results):
        assert all(UNK <= t < decoder.config.vocab_size for t in result.token_ids)
        assert result.alphas.dtype == np.float32
        assert result.alphas.shape == (len(result.token_ids), decoder.config.num_pixels)
        np.testing.assert_allclose(result.alphas.sum(axis=1), 1.0, atol=1e-5)
        # the returned attention is that of the returned words (backpointers are right)
        with torch.inference_mode():
            score, alphas = replay(decoder, features[i : i + 1], result.token_ids, 20)
        assert result.score == pytest.approx(score, abs=1e-4)
        np.testing.assert_allclose(result.alphas, alphas, atol=1e-5)


def test_every_alternative_carries_its_own_attention():
    stepper = random_stepper(9, seed=5, end_bias=0.5)
    for i, result in enumerate(beam_search(stepper, toy_features(3), beam_size=4, max_length=6)):
        assert len(result.alternative_alphas) == len(result.alternatives)
        np.testing.assert_array_equal(result.alternative_alphas[0], result.alphas)
        for (ids, _), alphas in zip(result.alternatives, result.alternative_alphas, strict=True):
            expected = [stepper.alpha(i, tuple(ids[:n])) for n in range(len(ids))]
            np.testing.assert_allclose(alphas, np.array(expected).reshape(-1, 4), atol=1e-6)


def test_toy_attention_follows_the_backpointers():
    stepper = random_stepper(9, seed=5, end_bias=0.5)
    features = toy_features(3)
    for i, result in enumerate(beam_search(stepper, features, beam_size=4, max_length=6)):
        expected = [
            stepper.alpha(i, tuple(result.token_ids[:n])) for n in range(len(result.token_ids))
        ]
        np.testing.assert_allclose(result.alphas, np.array(expected).reshape(-1, 4), atol=1e-6)
        score, _ = replay(stepper, features[i : i + 1], result.token_ids, 6)
        assert result.score == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
@pytest.mark.parametrize("max_length", [1, 2, 7])
def test_max_length_is_respected(decode, max_length):
    decoder, features = real_decoder("gru")
    with torch.no_grad():
        decoder.out_vocab.bias[END] = -1e4  # never ends: every caption is cut off
    for result in decode(decoder, features, max_length=max_length):
        assert len(result.token_ids) == max_length
        assert result.alphas.shape == (max_length, decoder.config.num_pixels)
        for ids, _ in result.alternatives:
            assert len(ids) == max_length
    for result in decode(*real_decoder("lstm"), max_length=max_length):
        assert len(result.token_ids) <= max_length


@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
def test_real_decoder_never_emits_special_tokens_when_told(decode):
    decoder, features = real_decoder("lstm")
    with torch.no_grad():
        decoder.out_vocab.bias[[PAD, START, UNK]] += 50.0  # the decoder loves them
    emitted = {t for r in decode(decoder, features) for ids, _ in r.alternatives for t in ids}
    assert UNK in emitted and not emitted & {PAD, START}
    suppressed = decode(decoder, features, suppress_unk=True)
    emitted = {t for r in suppressed for ids, _ in r.alternatives for t in ids}
    assert not emitted & {PAD, START, UNK, END}


@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
def test_suppress_unk_on_a_stepper_that_loves_unk(decode):
    stepper = random_stepper(8, seed=2, end_bias=-2.0, unk_bias=3.0)
    plain = decode(stepper, toy_features(4), max_length=6)
    assert UNK in {t for r in plain for ids, _ in r.alternatives for t in ids}
    for r in decode(stepper, toy_features(4), max_length=6, suppress_unk=True):
        assert all(UNK not in ids for ids, _ in r.alternatives)


def test_beam_search_runs_one_step_per_time_step_for_the_whole_batch():
    stepper = random_stepper(9, seed=1, end_bias=-50.0)  # never ends
    beam_search(stepper, toy_features(4), beam_size=3, max_length=5)
    assert stepper.calls == 5


# ---- edge cases ----------------------------------------------------------------------------
@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
def test_an_empty_batch_gives_no_results(decode):
    decoder, _ = real_decoder("gru")
    assert decode(decoder, torch.zeros(0, 16, 24)) == []


def test_bad_arguments_are_rejected():
    decoder, features = real_decoder("gru")
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(decoder, features, beam_size=0)
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match="max_length"):
            decode(decoder, features, max_length=0)
        with pytest.raises(ValueError, match=r"\(B, P, C\)"):
            decode(decoder, features[0])


# ---- repeated n-gram blocking --------------------------------------------------------------
def ngram_blocked(prefix: tuple[int, ...], n: int) -> set[int]:
    """Plain reference: tokens that would complete an n-gram already in ``prefix``."""
    if len(prefix) < n:
        return set()
    last = prefix[len(prefix) - n + 1 :]
    return {
        prefix[i + n - 1] for i in range(len(prefix) - n + 1) if prefix[i : i + n - 1] == last
    } - {END}


def has_repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_blocking_reference_agrees_with_the_vectorised_mask(n):
    from captioner.decoding.steps import block_repeated_ngrams

    rng = np.random.default_rng(n)
    history = torch.from_numpy(rng.integers(2, 6, size=(40, 7)))  # (N, t) with many repeats
    blocked = block_repeated_ngrams(torch.zeros(40, 6), history, n, END)
    for row in range(40):
        expected = ngram_blocked(tuple(history[row].tolist()), n)
        assert set(torch.isinf(blocked[row]).nonzero().flatten().tolist()) == expected
    assert bool(torch.isinf(blocked).any())  # the random rows did repeat something


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 2])
def test_exhaustive_beam_search_with_blocking_finds_the_brute_force_best(seed, n):
    V, T = 6, 4
    stepper = random_stepper(V, seed=seed, end_bias=-1.0)
    words = [t for t in range(V) if t not in (PAD, START, END)]
    scores = {}
    for length in range(T + 1):
        for ids in itertools.product(words, repeat=length):
            if has_repeated_ngram(list(ids), n):
                continue  # impossible: blocked
            targets = list(ids) + ([END] if length < T else [])
            total = sum(
                log_probs(stepper, 0, ids[:i], {PAD, START} | ngram_blocked(ids[:i], n))[target]
                for i, target in enumerate(targets)
            )
            scores[ids] = total / len(targets)
    (result,) = beam_search(
        stepper, toy_features(1), beam_size=len(scores), max_length=T, no_repeat_ngram_size=n
    )
    best = max(scores, key=scores.get)
    assert result.token_ids == list(best)
    assert result.score == pytest.approx(scores[best], abs=1e-5)
    assert sorted(tuple(ids) for ids, _ in result.alternatives) == sorted(scores)


@pytest.mark.parametrize("decode", [greedy_decode, beam_search])
def test_a_stepper_that_loops_is_stopped_from_repeating(decode):
    """Logits favour 4 5 4 5 ...: unblocked output loops, blocked output never repeats a
    bigram, and with bigrams blocked it still stops (``<end>`` is never blocked)."""

    def loop(image, prefix):
        logits = np.zeros(8)
        logits[5 if prefix and prefix[-1] == 4 else 4] = 6.0
        return logits

    free = decode(ToyStepper(8, loop), toy_features(2), max_length=9)
    assert all(has_repeated_ngram(r.token_ids, 2) for r in free)
    blocked = decode(ToyStepper(8, loop), toy_features(2), max_length=9, no_repeat_ngram_size=2)
    for result in blocked:
        for ids, _ in result.alternatives:
            assert not has_repeated_ngram(ids, 2)
        assert result.token_ids[:3] == [4, 5, 4]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_beam_size_1_is_greedy_with_blocking(cell):
    decoder, features = real_decoder(cell)
    greedy = greedy_decode(decoder, features, no_repeat_ngram_size=2)
    beam = beam_search(decoder, features, beam_size=1, no_repeat_ngram_size=2)
    assert tokens(greedy) != tokens(greedy_decode(decoder, features))  # blocking changed some
    assert tokens(beam) == tokens(greedy)
    for g, b in zip(greedy, beam, strict=True):
        assert b.score == g.score


# ---- the fused ONNX Runtime search step ----------------------------------------------------
class PlainStepper:
    """The same stepper through the Stepper protocol only (its fused step hidden)."""

    def __init__(self, stepper):
        self.stepper = stepper

    def start(self, features):
        return self.stepper.start(features)

    def step(self, tokens, state, memory):
        return self.stepper.step(tokens, state, memory)


@pytest.fixture(scope="module", params=["gru", "lstm"])
def ort_decoder(request, tmp_path_factory):
    """(torch decoder, its OrtStepper with the fused search graph, features)."""
    from captioner.model.onnx_decoder import OrtStepper, export_decoder

    decoder, features = real_decoder(request.param)
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    export_decoder(decoder, out)
    stepper = OrtStepper(out, request.param, threads=1)
    assert stepper.fused and stepper.vocab_size == decoder.config.vocab_size
    return decoder, stepper, features


def assert_same_search(got: list[DecodeResult], want: list[DecodeResult], atol=1e-4) -> None:
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want, strict=True):
        assert [ids for ids, _ in g.alternatives] == [ids for ids, _ in w.alternatives]
        assert g.score == pytest.approx(w.score, abs=atol)
        np.testing.assert_allclose(g.alphas, w.alphas, atol=atol)


def grounding_bias(features: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-image bias with large bonuses and penalties, and word groups of two."""
    g = torch.Generator().manual_seed(5)
    bias = 3.0 * torch.randn(features.size(0), V, generator=g)  # (B, V)
    return bias, torch.arange(V) // 2


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_fused_ort_search_matches_the_torch_decoder(ort_decoder, beam_size):
    decoder, stepper, features = ort_decoder
    want = beam_search(decoder, features, beam_size=beam_size)
    assert_same_search(beam_search(stepper, features, beam_size=beam_size), want)
    assert_same_search(beam_search(PlainStepper(stepper), features, beam_size=beam_size), want)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_fused_ort_search_with_word_bias_and_groups_matches_torch(ort_decoder, beam_size):
    decoder, stepper, features = ort_decoder
    bias, groups = grounding_bias(features, decoder.config.vocab_size)
    settings = dict(beam_size=beam_size, word_bias=bias, bias_groups=groups, suppress_unk=True)
    want = beam_search(decoder, features, **settings)
    assert tokens(want) != tokens(beam_search(decoder, features, beam_size=beam_size))
    assert_same_search(beam_search(stepper, features, **settings), want)
    # without groups, each token spends only its own bonus
    no_groups = dict(settings, bias_groups=None)
    assert_same_search(
        beam_search(stepper, features, **no_groups), beam_search(decoder, features, **no_groups)
    )


def test_fused_ort_greedy_is_beam_1_and_matches_torch_greedy(ort_decoder):
    decoder, stepper, features = ort_decoder
    bias, groups = grounding_bias(features, decoder.config.vocab_size)
    for extra in ({}, {"word_bias": bias, "bias_groups": groups}):
        greedy = greedy_decode(stepper, features, **extra)
        beam = beam_search(stepper, features, beam_size=1, **extra)
        assert tokens(greedy) == tokens(beam)
        for g, b in zip(greedy, beam, strict=True):
            assert (g.score, g.alternatives) == (b.score, b.alternatives)
            np.testing.assert_array_equal(g.alphas, b.alphas)
        assert_same_search(greedy, greedy_decode(decoder, features, **extra))


def test_fused_ort_batch_gives_what_each_image_gives_alone(ort_decoder):
    decoder, stepper, features = ort_decoder
    bias, groups = grounding_bias(features, decoder.config.vocab_size)
    together = beam_search(stepper, features, beam_size=3, word_bias=bias, bias_groups=groups)
    alone = [
        beam_search(
            stepper, features[i : i + 1], beam_size=3, word_bias=bias[i : i + 1], bias_groups=groups
        )[0]
        for i in range(len(features))
    ]
    assert_same_search(together, alone, atol=1e-5)
    assert len({len(ids) for ids in tokens(together)}) > 1  # images finish at different steps


@pytest.mark.parametrize("n", [1, 2, 3])
def test_repeated_ngram_tokens_is_block_repeated_ngrams_in_numpy(n):
    from captioner.decoding.fused import repeated_ngram_tokens
    from captioner.decoding.steps import block_repeated_ngrams

    history = torch.randint(0, 5, (40, 9), generator=torch.Generator().manual_seed(n))
    history[0, -1] = 2  # <end> itself is never blocked
    logits = torch.zeros(40, 6)
    want = torch.isinf(block_repeated_ngrams(logits, history, n, end_id=2))
    rows, blocked = repeated_ngram_tokens(history.numpy(), n, end_id=2)
    got = torch.zeros(40, 6, dtype=torch.bool)
    got[torch.from_numpy(rows), torch.from_numpy(blocked)] = True
    assert torch.equal(got, want) and bool(want.any())
    none = repeated_ngram_tokens(history[:, : n - 1].numpy(), n, end_id=2)
    assert none[0].size == 0  # shorter than n: nothing to repeat yet


@pytest.mark.parametrize("beam_size", [1, 3])
def test_fused_ort_search_blocks_repeated_ngrams_like_torch(ort_decoder, beam_size):
    """n-gram blocking on the fused path (in the step's bias) = the plain path's (in the
    logits), with and without a word bias; beam 1 = greedy."""
    decoder, stepper, features = ort_decoder
    bias, groups = grounding_bias(features, decoder.config.vocab_size)
    for extra in ({}, {"word_bias": bias, "bias_groups": groups}):
        settings = dict(beam_size=beam_size, max_length=12, no_repeat_ngram_size=2, **extra)
        want = beam_search(decoder, features, **settings)
        assert_same_search(beam_search(stepper, features, **settings), want)
        assert_same_search(beam_search(PlainStepper(stepper), features, **settings), want)
    calls = []
    real_step = stepper.search_step
    stepper.search_step = lambda *a: calls.append(1) or real_step(*a)  # the fused step runs
    try:
        blocked = beam_search(stepper, features, beam_size=beam_size, no_repeat_ngram_size=1)
    finally:
        del stepper.search_step
    assert calls
    for r in blocked:
        assert len(set(r.token_ids)) == len(r.token_ids)  # no word twice
    if beam_size == 1:
        greedy = greedy_decode(stepper, features, max_length=12, no_repeat_ngram_size=2)
        assert_same_search(
            greedy, greedy_decode(decoder, features, max_length=12, no_repeat_ngram_size=2)
        )


def test_fused_ort_ties_go_to_the_lowest_token_id(tmp_path):
    """All logits equal: every candidate ties, and the fused TopK must rank them as the plain
    path's stable sort does (lowest row, then word)."""
    from captioner.model.onnx_decoder import OrtStepper, export_decoder

    decoder, features = real_decoder("gru")
    with torch.no_grad():
        decoder.out_vocab.weight.zero_()
        decoder.out_vocab.bias.zero_()
    export_decoder(decoder, tmp_path)
    stepper = OrtStepper(tmp_path, "gru", threads=1)
    for k in (1, 2, 5):
        settings = dict(beam_size=k, max_length=3, length_penalty=0.0)
        got = beam_search(stepper, features[:2], **settings)
        want = beam_search(decoder, features[:2], **settings)
        assert [r.alternatives for r in got] == [r.alternatives for r in want]
        assert got[0].token_ids == []  # <end>: the lowest id that may be emitted, and short


def test_fused_ort_search_with_fewer_candidates_than_beams(tmp_path):
    """A 6-word vocabulary and 8 beams: the first step has fewer candidates than slots."""
    from captioner.model.onnx_decoder import OrtStepper, export_decoder

    decoder, features = real_decoder("gru", vocab_size=6)
    export_decoder(decoder, tmp_path)
    stepper = OrtStepper(tmp_path, "gru", threads=1)
    got = beam_search(stepper, features, beam_size=8, max_length=3)
    want = beam_search(decoder, features, beam_size=8, max_length=3)
    assert_same_search(got, want)
    assert all(len(r.alternatives) == 8 for r in got)


def test_an_export_without_the_search_graph_takes_the_plain_path(ort_decoder, tmp_path):
    """`captioner export` folders (and older exports) have no decoder_search.onnx."""
    from captioner.model.onnx_decoder import OrtStepper, export_decoder

    decoder, stepper, features = ort_decoder
    export_decoder(decoder, tmp_path)
    (tmp_path / "decoder_search.onnx").unlink()
    plain = OrtStepper(tmp_path, decoder.config.cell, threads=1)
    assert not plain.fused
    assert_same_search(beam_search(plain, features), beam_search(stepper, features))
