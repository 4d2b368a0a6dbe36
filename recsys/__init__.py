"""Shared package in layers (docs/architecture.md): core < v1 stubs < rpc < [services] < app."""
