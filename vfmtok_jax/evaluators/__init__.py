"""Evaluators: FID Inception features, the ADM metrics, ADM batch files.

Above models / weights / ops, below the tasks and command lines.
"""
