"""Evaluation: the metrics, the scoring of generated folders (evaluate.py) and its report."""
