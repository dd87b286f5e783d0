"""Decoding: greedy and beam search over any Stepper (see docs/ARCHITECTURE.md)."""

from captioner.decoding.beam import beam_search
from captioner.decoding.greedy import DecodeResult, Hypothesis, Stepper, greedy_decode

__all__ = ["DecodeResult", "Hypothesis", "Stepper", "beam_search", "greedy_decode"]
