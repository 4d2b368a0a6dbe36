"""Tests of the retrieval service domain code."""
