"""Evaluation: statistics with intervals and tests, figures, and the report."""
