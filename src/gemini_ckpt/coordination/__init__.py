"""Coordination between machine agents through a shared key-value store."""
