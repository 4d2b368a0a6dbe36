"""Ranking service: fine-tuned cross-encoder, collaborative filtering, fusion and dynamic batching."""
