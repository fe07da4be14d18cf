"""Spec-Bench runner pieces behind ``kangaroo bench`` (the CLI lives in :mod:`kangaroo.benchmark`).

- :mod:`.questions`: find, read and sample Spec-Bench's ``question.jsonl``.
- :mod:`.methods`: the decoding methods compared (``ar-hf``, ``ar``, ``kangaroo``, ...), one small
  plug-in each, registered by name.
- :mod:`.metrics`: every number in ``summary.json``, computed from answer records alone (the
  Spec-Bench ``model_answer`` layout), the way Spec-Bench's ``evaluation/speed.py`` does.
- :mod:`.report`: ``report.md``, the PNG plots and ``BENCHMARKS.md``.
"""
