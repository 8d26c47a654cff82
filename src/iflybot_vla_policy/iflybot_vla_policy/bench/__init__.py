"""Benchmarks, one module per area; each exposes ``run(quick: bool) -> dict``.

Every figure is measured beside its naive baseline in the same run (these machines are noisy, so
ratios measured side by side are what we report). ``iflybot bench`` discovers the modules here,
runs them and writes one JSON file plus a markdown table.
"""
