"""Application layer: CLI, build orchestration, demo, evaluation, data ingestion and the sample generator."""
