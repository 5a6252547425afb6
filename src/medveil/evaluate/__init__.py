"""Evaluation: utility, fidelity and privacy metrics."""
