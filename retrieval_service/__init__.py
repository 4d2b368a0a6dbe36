"""Retrieval: the catalog, its text encoder and ANN index, online upserts/deletes, and the offline index build."""
