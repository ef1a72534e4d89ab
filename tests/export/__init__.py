"""Tests of fedhft.export."""
