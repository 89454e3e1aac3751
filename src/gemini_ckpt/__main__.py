"""`python -m gemini_ckpt` is the `gemini-ckpt` command."""

import sys

from gemini_ckpt.cli.main import main

sys.exit(main())
