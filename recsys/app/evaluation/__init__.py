"""Offline evaluation under the protocol of ../shared/data/README.md (splits, baselines, report)."""
