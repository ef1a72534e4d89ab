"""Tests of fedhft.edge_runtime."""
