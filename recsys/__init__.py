"""Shared package: contract stubs, settings, serving bootstrap, metrics, artifacts and the CLI."""
