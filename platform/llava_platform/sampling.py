"""Sampling rules shared by both generation engines (standard library only: the vLLM engine's
environment imports this too)."""

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (dividing logits by ~0 gives NaN probabilities)."""
