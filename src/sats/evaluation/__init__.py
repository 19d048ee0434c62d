"""Evaluation: metrics in mm, the ablation study with its statistics, and figures."""
