"""Tests of fedhft.device_profiles."""
