"""Structured events and the summaries built from them."""
