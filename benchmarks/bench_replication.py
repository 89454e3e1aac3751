"""Replication and retrieval throughput between two agents' processes, next to raw TCP.

Two processes on loopback stand for two machines. This one is the source: its own store holds a
committed checkpoint of each size (random bytes, `--chunk-size` chunks with xxh3 digests). The
other is its placement peer: a `ReplicaServer` over a replica store, plus a plain TCP endpoint.
Each repeat, interleaved, per size:

* raw push: the same number of bytes sent from a warm buffer here and received into a warm buffer
  there, one `sendall` per chunk and one `recv_into` per 256 KiB as the replication code does,
  same socket options and buffer sizes, over a plain connection kept open across repeats (its
  TCP window grown, like the link's; retrieval opens new connections): the limit for (a). (One
  `sendall` of the whole buffer is markedly slower here: it would flatter the ratios.)
* replication (a): `PeerLink.push` of the checkpoint, from its slot to the peer's replica store:
  authenticated connection (kept open across repeats, as the agent does), chunk frames, the
  receiver's digest verification and commit;
* retrieval (b): `fetch_replica` of that replica back into a third store here, over `--streams`
  parallel connections (by default as many as the library picks for this machine: one per two
  CPUs, at most 4): new authenticated connections, the manifest, verification, commit;
* raw fetch: the same bytes in the other direction: the limit for (b);
* retrieval, kept mapped: (b) through a `ReplicaClient` that keeps the destination's slots mapped
  across fetches (as an agent could for its own store): no per-fetch mapping of the slot;
* retrieval over `--alt-streams` connections (4 by default): the same as (b).

Ratios are throughput ratios (raw seconds / measured seconds) taken within each repeat; JSON holds
min and median of every measurement and ratio.

    python benchmarks/bench_replication.py --sizes 64MiB,256MiB,1GiB --repeats 3 \
        --out docs/results/replication.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemini_ckpt.config import parse_size, shm_root
from gemini_ckpt.protocol.manifest import Manifest, TensorEntry
from gemini_ckpt.replication import (
    Credentials,
    PeerLink,
    ReplicaClient,
    ReplicaServer,
    ServerSettings,
    SlotMappings,
    default_streams,
    fetch_replica,
    load_secret,
    new_secret,
    wire,
)
from gemini_ckpt.replication.fetch import MAX_STREAMS
from gemini_ckpt.snapshot.copier import digest
from gemini_ckpt.store import shm
from gemini_ckpt.store.local_store import LocalStore, SlotRef

JOB = "bench-replication"
GOALS = {"retrieval_vs_raw_min": 0.70}
MEASURES = ("raw_push_s", "push_s", "fetch_s", "raw_fetch_s", "fetch_kept_mapped_s")
MEASURES += ("fetch_alt_streams_s",)  # in the order each repeat takes them
WARMUP = 2


def stats(samples: list[float]) -> dict[str, Any]:
    """Min, median and every sample."""
    return {"min": min(samples), "median": statistics.median(samples), "samples": samples}


def move(sock: socket.socket, buffer: memoryview, piece: int, send: bool) -> None:
    """Send `buffer` one `piece` (a chunk) per call, or receive it in the receivers' pieces.

    That is how replication moves chunks, without the headers, checksums and store.
    """
    step = piece if send else wire.HASH_PIECE
    for offset in range(0, len(buffer), step):
        part = buffer[offset : offset + step]
        if send:
            sock.sendall(part)
        else:
            wire.recv_exact_into(sock, part)


def serve_raw(listener: socket.socket, buffer: memoryview) -> None:
    """Plain TCP, transfers until EOF: op (S: we receive, F: we send), size, piece; an ack after."""
    while True:
        conn, _ = listener.accept()
        with conn:
            while len(header := conn.recv(17, socket.MSG_WAITALL)) == 17:
                size, piece = int.from_bytes(header[1:9], "big"), int.from_bytes(header[9:], "big")
                move(conn, buffer[:size], piece, send=header[:1] == b"F")
                if header[:1] == b"S":
                    conn.sendall(b"k")
                else:
                    conn.recv(1)


def serve(args: argparse.Namespace) -> None:
    """The peer: a replica server and a raw endpoint until stdin closes."""
    credentials = Credentials(JOB, load_secret(Path(args.secret_file), {}))
    directory = Path(tempfile.mkdtemp(prefix="bench-peer-", dir=args.shm_dir))
    replicas = LocalStore(directory / "replicas", 1 << 50, kind="replica")
    replicas.start()
    buffer = memoryview(bytearray(args.raw_bytes))
    listener = socket.socket()
    wire.tune(listener, parse_size(args.socket_buffer))
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    threading.Thread(target=serve_raw, args=(listener, buffer), daemon=True).start()
    settings = ServerSettings(buffer_bytes=parse_size(args.socket_buffer))
    server = ReplicaServer(credentials, replicas, lambda: 0, settings=settings)
    try:
        address = server.start()
        print(json.dumps({"replica": address, "raw": listener.getsockname()}), flush=True)
        sys.stdin.read()
    finally:
        server.close()
        replicas.close()
        directory.rmdir()


class Source:
    """This machine's own store with one rank's checkpoint, committed under a new step on demand.

    Both slots are filled with the same bytes once; later steps reuse them, so a new step costs a
    commit, not a copy.
    """

    def __init__(self, store: LocalStore, rank: int, data: np.ndarray, chunk_size: int) -> None:
        self.store = store
        self.rank = rank
        self.buffer = memoryview(data)  # the raw transfers' bytes: warm, just written
        self.nbytes = int(data.nbytes)
        self.chunk_size = chunk_size
        chunks = range(0, self.nbytes, chunk_size)
        self.digests = tuple(digest(self.buffer[i : i + chunk_size]) for i in chunks)
        self.step = 0
        store.allocate(rank, self.nbytes)
        for _ in range(2):
            self.commit(data)

    def commit(self, data: np.ndarray | None = None) -> SlotRef:
        """Commit the next step; write `data` into its slot first if given."""
        self.step += 1
        grant = self.store.prepare_write(self.rank, self.step)
        path = self.store.begin_write(self.rank, grant)
        if data is not None:
            region = shm.map_file(path, self.nbytes, writable=True)
            region.tensor.copy_(torch.from_numpy(data))
            region.close()
        entry = TensorEntry("uint8", (self.nbytes,), 0, self.nbytes)
        geometry = (self.chunk_size, self.nbytes, self.digests, (entry,), (0,))
        manifest = Manifest(
            JOB, self.rank, self.rank + 1, self.step, 0, *geometry, {"__tensor__": 0}
        )
        self.store.commit(self.rank, grant.slot, manifest)
        ref = self.store.locate(self.rank, self.step)
        if ref is None:
            raise RuntimeError(f"step {self.step} vanished right after its commit")
        return ref


def raw(sock: socket.socket, op: bytes, source: Source) -> float:
    """Seconds to move the checkpoint's size over the plain connection (S: to the peer)."""
    buffer, piece = source.buffer, source.chunk_size
    start = time.perf_counter()
    sock.sendall(op + len(buffer).to_bytes(8, "big") + piece.to_bytes(8, "big"))
    move(sock, buffer, piece, send=op == b"S")
    if op == b"S":
        sock.recv(1)
    else:
        sock.sendall(b"k")
    return time.perf_counter() - start


@dataclass
class Target:
    """The peer as this process reaches it, and where retrievals land here."""

    link: PeerLink
    raw: socket.socket
    """A plain connection kept open, like the link: its TCP window has grown to full size."""
    restored: LocalStore
    kept_mapped: ReplicaClient
    """A client that keeps the destination's slots mapped across fetches, as an agent could."""


def run_size(
    rank: int, nbytes: int, peer: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Every measurement for one checkpoint size (as `rank`'s), repeats interleaved."""
    directory = Path(tempfile.mkdtemp(prefix="bench-source-", dir=args.shm_dir))
    own = LocalStore(directory / "own", 1 << 50)
    restored = LocalStore(directory / "restored", 1 << 50)
    own.start()
    restored.start()
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    samples: dict[str, list[float]] = {k: [] for k in MEASURES}
    first: dict[str, list[float]] = {k: [] for k in MEASURES}
    replica_address = (str(peer["replica"][0]), int(peer["replica"][1]))
    mappings = SlotMappings(writable=True)
    try:
        source = Source(own, rank, data, parse_size(args.chunk_size))
        with (
            PeerLink(replica_address, args.credentials) as link,
            socket.socket() as plain,
        ):
            wire.tune(plain, parse_size(args.socket_buffer))
            plain.connect((str(peer["raw"][0]), int(peer["raw"][1])))
            client = ReplicaClient(replica_address, args.credentials, mappings=mappings)
            target = Target(link, plain, restored, client)
            # The first two repeats touch the replica's two slots (and the raw buffers) for the
            # first time: page faults of fresh memory, once per job; reported apart.
            for repeat in range(WARMUP + args.repeats):
                row = repeat_once(source, target, args)
                for key, value in row.items():
                    (samples if repeat >= WARMUP else first)[key].append(value)
    finally:
        mappings.close()
        own.close()
        restored.close()
        directory.rmdir()
    result = summarize(nbytes, samples)
    result["first_repeats_s"] = first
    return result


def repeat_once(source: Source, target: Target, args: argparse.Namespace) -> dict[str, float]:
    """One repeat of every measurement, in the order of `MEASURES`; seconds each."""
    row = {"raw_push_s": raw(target.raw, b"S", source)}
    start = time.perf_counter()
    result = target.link.push(source.store, source.commit(), 0)
    row["push_s"] = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"push failed: {result.describe()}")
    rank, step, credentials = source.rank, source.step, args.credentials
    for key, streams in (
        ("fetch_s", args.streams),
        ("raw_fetch_s", 0),
        ("fetch_kept_mapped_s", args.streams),
        ("fetch_alt_streams_s", args.alt_streams),
    ):
        start = time.perf_counter()
        if key == "raw_fetch_s":
            row[key] = raw(target.raw, b"F", source)
            continue
        if key == "fetch_kept_mapped_s":
            target.kept_mapped.fetch(rank, step, target.restored, streams)
        else:
            fetch_replica(target.link.address, credentials, rank, step, target.restored, streams)
        row[key] = time.perf_counter() - start
    return row


def summarize(nbytes: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    """Stats, throughputs (GB/s of medians) and per-repeat throughput ratios."""
    result: dict[str, Any] = {"bytes": nbytes, **{k: stats(v) for k, v in samples.items()}}
    result["gb_per_s"] = {
        k.removesuffix("_s"): nbytes / statistics.median(v) / 1e9 for k, v in samples.items()
    }
    ratios = {
        name: [r / m for r, m in zip(samples[raw_key], samples[key], strict=True)]
        for name, raw_key, key in (
            ("replication_vs_raw", "raw_push_s", "push_s"),
            ("retrieval_vs_raw", "raw_fetch_s", "fetch_s"),
            ("retrieval_kept_mapped_vs_raw", "raw_fetch_s", "fetch_kept_mapped_s"),
            ("retrieval_alt_streams_vs_raw", "raw_fetch_s", "fetch_alt_streams_s"),
        )
    }
    result["ratios"] = {k: stats(v) for k, v in ratios.items()}
    goal = GOALS["retrieval_vs_raw_min"]
    result["meets_goals"] = {
        "retrieval": min(ratios["retrieval_vs_raw"]) >= goal,
        "retrieval_kept_mapped": min(ratios["retrieval_kept_mapped_vs_raw"]) >= goal,
    }
    return result


def start_peer(args: argparse.Namespace, secret_file: Path, raw_bytes: int) -> subprocess.Popen:
    """The peer process, once it reports its addresses."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    command += ["--secret-file", str(secret_file), "--raw-bytes", str(raw_bytes)]
    command += ["--shm-dir", args.shm_dir, "--socket-buffer", args.socket_buffer]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="64MiB,256MiB,1GiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", type=int, default=default_streams(), help="per retrieval")
    p.add_argument("--alt-streams", type=int, default=MAX_STREAMS, help="a second stream count")
    p.add_argument("--chunk-size", default="4MiB")
    p.add_argument("--socket-buffer", default=str(wire.SOCKET_BUFFER), help="0: auto-tuning")
    p.add_argument("--shm-dir", default=str(shm_root()))
    p.add_argument("--out", default="bench-results/replication.json")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--secret-file", help=argparse.SUPPRESS)
    p.add_argument("--raw-bytes", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON, print a table; return the results."""
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return {}
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret"
        secret_file.write_bytes(new_secret().hex().encode())
        secret_file.chmod(0o600)
        args.credentials = Credentials(JOB, load_secret(secret_file, {}))
        peer_process = start_peer(args, secret_file, max(sizes))
        try:
            peer = json.loads(peer_process.stdout.readline())  # type: ignore[union-attr]
            results = [run_size(rank, size, peer, args) for rank, size in enumerate(sizes)]
        finally:
            peer_process.communicate(timeout=30)
    report = {
        "benchmark": "replication",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_average_before": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "credentials")},
        "goals": GOALS,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for line in table(report):
        print(line)
    return report


def table(report: dict[str, Any]) -> list[str]:
    """Markdown: medians in ms (min in parentheses), then ratios to raw, median (min)."""

    def cell(s: dict[str, Any], scale: float, digits: int) -> str:
        return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f})"

    streams, alt = report["settings"]["streams"], report["settings"]["alt_streams"]
    columns = {
        "raw push": "raw_push_s",
        "replication": "push_s",
        "raw fetch": "raw_fetch_s",
        f"retrieval ({streams})": "fetch_s",
        f"retrieval ({streams}), kept mapped": "fetch_kept_mapped_s",
        f"retrieval ({alt})": "fetch_alt_streams_s",
    }
    ratios = {
        "replication / raw": "replication_vs_raw",
        f"retrieval ({streams}) / raw": "retrieval_vs_raw",
        "kept mapped / raw": "retrieval_kept_mapped_vs_raw",
        f"retrieval ({alt}) / raw": "retrieval_alt_streams_vs_raw",
    }
    lines = [
        "Milliseconds, median (min) over repeats; (n): streams. Ratios: raw time / measured "
        "time, per repeat.",
        "",
        "| checkpoint | " + " | ".join([*columns, *ratios]) + " |",
        "|---" * (1 + len(columns) + len(ratios)) + "|",
    ]
    for r in report["results"]:
        cells = [cell(r[k], 1e3, 0) for k in columns.values()]
        cells += [cell(r["ratios"][k], 1, 2) for k in ratios.values()]
        lines.append(f"| {r['bytes'] / 2**20:.0f} MiB | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
