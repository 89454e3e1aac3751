"""Integrations with training frameworks, each an optional extra; the core never imports them.

Each integration adapts a framework's engine to the trainer side's `SnapshotSource`: what to
capture at `save()`, how to load it back in place, and which optimizer steps to wait in.
"""
