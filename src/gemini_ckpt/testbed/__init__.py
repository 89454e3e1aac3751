"""Test beds that run whole jobs on one host, machines simulated by processes."""
