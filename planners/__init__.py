"""Inference-time planning over the experts: when each tier runs, and how candidates are chosen."""
