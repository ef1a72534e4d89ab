"""Tests of fedhft.simulate."""
