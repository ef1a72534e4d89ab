"""Tests of fedhft.protocol."""
