"""The `gemini-ckpt` command line."""
