"""Synthetic tasks with verifiable answers, for recipes and tests that run offline on a CPU."""
