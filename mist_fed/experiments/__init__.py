"""Experiments that run the whole pipeline: the paper-table comparison."""
