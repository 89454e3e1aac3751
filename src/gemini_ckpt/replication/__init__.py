"""Peer replication: agents push their ranks' checkpoints to placement peers, and fetch them back.

Every connection is mutually authenticated with the job's secret (`auth`); messages are bounded
JSON headers followed by raw chunk bytes, moved between shared-memory slots without copies
(`wire`). Each agent runs one `ReplicaServer`, which receives pushes into its replica store and
serves fetches from it (and from its own store); it pushes through one `PeerLink` per peer and
retrieves with `fetch_replica`. Every chunk is verified against the manifest on receipt, on both
paths.
"""

from gemini_ckpt.replication.auth import (
    SECRET_ENV,
    AuthenticationError,
    Credentials,
    load_secret,
    new_secret,
)
from gemini_ckpt.replication.connection import Timeouts
from gemini_ckpt.replication.fetch import (
    FetchResult,
    Holdings,
    ReplicaClient,
    default_streams,
    fetch_replica,
)
from gemini_ckpt.replication.mapping import SlotMappings
from gemini_ckpt.replication.pacing import Pacing
from gemini_ckpt.replication.sender import (
    Backoff,
    PeerLink,
    PushResult,
    PushStatus,
    push_replica,
)
from gemini_ckpt.replication.server import ReplicaServer, ServerSettings
from gemini_ckpt.replication.wire import Address, Endpoint, parse_address

__all__ = [
    "SECRET_ENV",
    "Address",
    "AuthenticationError",
    "Backoff",
    "Credentials",
    "Endpoint",
    "FetchResult",
    "Holdings",
    "Pacing",
    "PeerLink",
    "PushResult",
    "PushStatus",
    "ReplicaClient",
    "ReplicaServer",
    "ServerSettings",
    "SlotMappings",
    "Timeouts",
    "default_streams",
    "fetch_replica",
    "load_secret",
    "new_secret",
    "parse_address",
    "push_replica",
]
