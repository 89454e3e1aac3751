"""DeepSpeed integration (`pip install gemini-ckpt[deepspeed]`): checkpoints of a ZeRO engine.

`DeepSpeedCheckpointer` checkpoints one rank of a ZeRO 1-3 engine every iteration; `layout.py`
exports a persisted ZeRO-3 step to DeepSpeed's own checkpoint layout. DeepSpeed compiles some ops
on first use (on CPU, its shared-memory all-reduce); importing this package points
`TORCH_EXTENSIONS_DIR`, where they are cached, at a directory of the Python environment unless it
is set (`config.use_torch_extensions_dir`), so they compile once per environment.
"""

from gemini_ckpt.config import use_torch_extensions_dir

use_torch_extensions_dir()

from gemini_ckpt.integrations.deepspeed.checkpointer import DeepSpeedCheckpointer  # noqa: E402

__all__ = ["DeepSpeedCheckpointer"]
