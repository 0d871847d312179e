"""fxstore's benchmark suite: fxstore against hooks, torchvision's extractor and the plain model.

Run ``python -m benchmarks`` (or ``make bench``) for the comparison table, and
``pytest benchmarks --benchmark-only`` for the pytest-benchmark micro cases. Every number
comes with a verification of the captured values against an independent reference, so a
contender that captured nothing (hooks silently skipped under ``torch.compile``) shows up
as FAILED instead of as fast. See ``python -m benchmarks --help``.
"""
