"""Synthetic knowledge graphs (random-tail and permutation worlds), k-hop tasks and honest splits."""
