"""Scoring a trained run: metrics, non-learned baselines, refinement, held-out folders, figures."""
