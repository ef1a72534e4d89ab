"""Tests of fedhft.broker_server."""
