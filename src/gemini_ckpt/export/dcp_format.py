"""Writing one training state as a single-process torch.distributed.checkpoint (DCP) checkpoint.

DCP flattens the state into entries named by dotted path; tensors become tensor entries, anything
else an object entry that DCP pickles (`NOTES` says what that keeps and what it does not). The
DCP package takes about 2 s to import, so it is imported only when a state is written.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from gemini_ckpt.errors import ExportError

FORMAT = "torch.distributed.checkpoint"
NOTES = (
    "tensors are DCP tensors, bit for bit, with their dtype and shape; entries that share one "
    "tensor (tied weights) are written once per name",
    "every other value (numbers, strings, bytes, None, NumPy arrays and scalars, torch dtypes, "
    "tuples, lists without tensors, the Python and NumPy RNG states) is a DCP object entry, which "
    "DCP writes with torch.save and dcp.load reads with torch.load(weights_only=False): load only "
    "exports you trust",
    "entries are named by their dotted path, every dict key as a string: dcp.load fills a "
    "template's tensors in place whatever its key types, but puts a non-tensor value under a "
    "non-string key back under the key's string form (export.json lists those values per rank)",
    "not kept: the _metadata attribute of module state dicts (load_state_dict works without it) "
    "and empty dicts (DCP has no entry for them; a template keeps its own)",
)
"""What DCP keeps of a training state and what it does not; shown in `--help` and export.json."""


def _dcp_terminal(node: Any) -> bool:
    """Whether DCP stores `node` as one entry (as its `traverse_state_dict` decides)."""
    if isinstance(node, Mapping):
        return False
    if not isinstance(node, list):
        return True
    return not any(isinstance(e, torch.Tensor) or not _dcp_terminal(e) for e in node)


def values_under_non_string_keys(node: Any, path: str = "", odd: bool = False) -> Iterator[str]:
    """Paths of the object entries DCP stores under a non-string dict key (see `NOTES`)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            inner = f"{path}.{key}" if path else str(key)
            yield from values_under_non_string_keys(value, inner, odd or not isinstance(key, str))
    elif not _dcp_terminal(node):
        for index, value in enumerate(node):
            yield from values_under_non_string_keys(value, f"{path}.{index}", odd)
    elif odd and not isinstance(node, torch.Tensor):
        yield path


def write_dcp(state: dict[str, Any], directory: Path) -> tuple[int, int]:
    """Save `state` as a single-process DCP checkpoint in `directory`; (tensors, objects) written.

    Raises:
        ExportError: DCP refused the state (two entries with one name) or could not write it.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_saver import save

    # torch >= 2.7 takes no_dist; older releases pick single-process mode by themselves when no
    # process group is initialized (an export never initializes one).
    single = {"no_dist": True} if "no_dist" in inspect.signature(save).parameters else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*assuming the intent is to save in a single"
            )
            metadata = save(state, storage_writer=FileSystemWriter(directory), **single)
    except CheckpointException as e:
        causes = "; ".join(f"{type(exc).__name__}: {exc}" for exc, _ in e.failures.values())
        raise ExportError(f"DCP cannot save the state: {causes}") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"DCP cannot save the state: {e}") from e
    entries = metadata.state_dict_metadata.values()
    tensors = sum(isinstance(m, TensorStorageMetadata) for m in entries)
    return tensors, len(entries) - tensors
