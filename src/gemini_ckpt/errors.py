"""The exception hierarchy: one base, a subclass per layer, messages naming what was violated."""

from __future__ import annotations


class GeminiError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(GeminiError):
    """A flag, environment variable or argument has a value that cannot work."""


class FaultSpecError(ConfigError):
    """A `--fault` specification is malformed or names something that does not exist."""


class ProtocolError(GeminiError):
    """A message between a trainer and its agent is malformed, too large or out of order."""


class RemoteError(GeminiError):
    """The agent answered a request with an error; `kind` is the agent-side error class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class AgentUnavailableError(GeminiError):
    """The trainer could not reach its machine agent."""


class SnapshotError(GeminiError):
    """The training state cannot be captured (unsupported value, changed layout, failed copy)."""


class RestoreError(GeminiError):
    """The training state cannot be loaded back."""


class CorruptCheckpointError(RestoreError):
    """A checkpoint failed verification: a chunk's checksum or the manifest does not match."""


class StoreError(GeminiError):
    """Checkpoint memory could not be allocated, found or committed."""


class MemoryBudgetError(StoreError):
    """The requested checkpoint memory does not fit the machine's budget."""


class ReplicationError(GeminiError):
    """A peer agent could not be reached, refused a replication request, or broke the protocol.

    The message names the peer's address and what went wrong.
    """


class CoordinationError(GeminiError):
    """The job-wide coordination store is unreachable or returned something unexpected."""


class RecoveryError(GeminiError):
    """No consistent state to resume from could be found, or the restart limit was reached."""


class ExportError(GeminiError):
    """A persisted step is missing or incomplete, or its export cannot be written."""


class PlacementError(GeminiError):
    """A checkpoint placement cannot be built or is inconsistent (for example m > N)."""


class SimulationError(GeminiError):
    """A simulation scenario, measured-input file or simulator setting is invalid."""


class CoordinationUnavailableError(CoordinationError):
    """No coordination endpoint answered within the call's timeout.

    The message names the endpoints tried. Each call's docstring says whether it is safe to retry
    (reads and idempotent writes are) or whether its outcome is unknown (a transaction sent to a
    server that went away may have been applied: re-read before deciding again).
    """


class LeaseLostError(CoordinationError):
    """A lease expired or was revoked; the keys attached to it are gone."""


class NotLeaderError(CoordinationError):
    """A fenced write was refused: the writer no longer holds the leadership it was granted."""


class EtcdServerError(CoordinationError):
    """A private etcd server could not be started, did not become healthy, or did not stop."""
