"""Exporting persisted checkpoints to torch.distributed.checkpoint, which standard tools read."""
