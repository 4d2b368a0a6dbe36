"""Gateway: the caller-facing flow — retrieval, ranking, diversity — with deadlines and fallbacks."""
