"""The control messages between a trainer and its machine agent, and their validation.

Every request is `{"op": NAME, "id": N, ...fields}`; every reply is `{"id": N, "ok": true, ...}` or
`{"id": N, "ok": false, "error": {"kind": CLASS, "message": TEXT}}`.

Call order for one rank: `hello`, then `restore` (which may be followed by `restored` or
`report_corrupt`), then per step `allocate` (only when the state grew), `begin`, `commit` (or
`abort`). `begin` and `commit` may carry the save's `timing`, whose `iteration_start` tells an
interleaving agent when the next iteration began. `failpoint` is sent by a trainer that reached
an armed fault point; the agent kills it. `profile` carries the idle spans of the trainer's
iterations (when the agent interleaves its replication traffic); `replicated` waits until the
placement peers hold a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gemini_ckpt.errors import ProtocolError

# op -> required fields and their types
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"rank": int, "pid": int, "generation": int},
    "allocate": {"rank": int, "nbytes": int},
    "begin": {"rank": int, "step": int},
    "commit": {"rank": int, "slot": int, "manifest": dict},
    "abort": {"rank": int, "step": int, "reason": str},
    "restore": {"rank": int},
    "restored": {"rank": int, "step": int, "seconds": (int, float)},
    "report_corrupt": {"rank": int, "step": int, "detail": str},
    "failpoint": {"rank": int, "name": str, "step": int},
    "stats": {},
    "profile": {"rank": int, "profile": dict},
    "replicated": {"rank": int, "step": int, "timeout_s": (int, float)},
}


@dataclass(frozen=True)
class Request:
    """A validated request."""

    op: str
    id: int
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a decoded frame as a request.

    Raises:
        ProtocolError: unknown op, missing field or wrongly typed field; the message says which.
    """
    op = message.get("op")
    request_id = message.get("id", 0)
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(f"request id must be an integer, got {request_id!r}")
    if op not in SCHEMAS:
        raise ProtocolError(f"unknown op {op!r}; known ops: {', '.join(sorted(SCHEMAS))}")
    for name, kind in SCHEMAS[op].items():
        if name not in message:
            raise ProtocolError(f"op {op!r} needs field {name!r}")
        value = message[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise ProtocolError(f"field {name!r} of op {op!r} must be {expected}, got {value!r}")
        if isinstance(value, int) and value < 0:
            raise ProtocolError(f"field {name!r} of op {op!r} must be >= 0, got {value}")
    fields = {k: v for k, v in message.items() if k not in ("op", "id")}
    return Request(op, request_id, fields)


_TIMING_FIELDS = ("blocking_s", "copy_s", "deferred_s", "iteration_s", "iteration_start")
_MAX_METRICS = 32


def parse_timing(raw: Any) -> dict[str, Any]:
    """Validate the optional `timing` of a commit: durations, a start time and named metrics.

    Raises:
        ProtocolError: a field is unknown, not a finite number, or there are too many metrics.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"timing must be an object, got {type(raw).__name__}")
    unknown = set(raw) - {*_TIMING_FIELDS, "metrics"}
    if unknown:
        raise ProtocolError(f"unknown timing fields {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name in _TIMING_FIELDS:
        if name in raw:
            out[name] = _finite(f"timing {name}", raw[name])
    metrics = raw.get("metrics") or {}
    if not isinstance(metrics, dict) or len(metrics) > _MAX_METRICS:
        raise ProtocolError(f"metrics must be an object of at most {_MAX_METRICS} numbers")
    out["metrics"] = {str(k)[:64]: _finite(f"metric {k!r}", v) for k, v in metrics.items()}
    return out


def _finite(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def ok_reply(request_id: int, **fields: Any) -> dict[str, Any]:
    """A success reply."""
    return {"id": request_id, "ok": True, **fields}


def error_reply(request_id: int, error: BaseException) -> dict[str, Any]:
    """An error reply naming the error class and message."""
    return {
        "id": request_id,
        "ok": False,
        "error": {"kind": type(error).__name__, "message": str(error)},
    }
