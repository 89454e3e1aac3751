"""The seam between trainers and agents: message framing, requests, the checkpoint manifest."""
