"""Closed-loop evaluation: rollouts on held-out seeds, metrics, reports (JSON, markdown, plots)."""
