"""The demo workload: a small GPT trained with DDP, deterministic so runs compare bit for bit."""
