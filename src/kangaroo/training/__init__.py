"""Adapter training (``kangaroo train``): data, self-distillation, the training loop and its CLI.

Only light imports here: ``kangaroo --help`` imports :mod:`kangaroo.training.cli`.
"""
