"""Decoding: greedy and beam search over any Stepper (see docs/ARCHITECTURE.md)."""

from captioner.decoding.beam import beam_search
from captioner.decoding.greedy import greedy_decode
from captioner.decoding.steps import DecodeResult, Hypothesis, Stepper

__all__ = ["DecodeResult", "Hypothesis", "Stepper", "beam_search", "greedy_decode"]
