import itertools
import os
import sys
import threading

import pytest
import torch

from gemini_ckpt.protocol.manifest import ALIGNMENT
from gemini_ckpt.snapshot.copier import ChunkCopier, digest
from gemini_ckpt.snapshot.layout import plan_layout, signature


def tensors():
    shared = torch.randn(1000)
    return [
        torch.randn(3, 7),
        shared,
        torch.arange(10, dtype=torch.int64),
        shared,
        torch.randn(5000).to(torch.bfloat16),
        torch.tensor(True),
        torch.randn(0),
    ]


def test_layout_aligns_and_deduplicates():
    ts = tensors()
    layout = plan_layout(ts, chunk_size=4096)
    assert len(layout.entries) == len(ts) - 1  # the shared tensor is stored once
    assert layout.tensor_refs[1] == layout.tensor_refs[3]
    for entry in layout.entries:
        assert entry.offset % ALIGNMENT == 0
    ends = sorted((e.offset, e.offset + e.nbytes) for e in layout.entries)
    for (_, end), (start, _) in itertools.pairwise(ends):
        assert end <= start
    assert layout.data_nbytes % ALIGNMENT == 0


def test_segments_cover_every_byte_once_and_stay_inside_their_chunk():
    layout = plan_layout(tensors(), chunk_size=4096)
    covered = {i: 0 for i in range(len(layout.entries))}
    for index, segments in enumerate(layout.chunks):
        start, end = layout.chunk_range(index)
        for seg in segments:
            assert start <= seg.dst_offset and seg.dst_offset + seg.length <= end
            covered[seg.entry] += seg.length
    assert covered == {i: e.nbytes for i, e in enumerate(layout.entries)}


def test_signature_changes_with_shapes_and_sharing():
    a, b = torch.randn(4), torch.randn(4)
    assert signature([a, b]) == signature([torch.randn(4), torch.randn(4)])
    assert signature([a, a]) != signature([a, b])
    assert signature([a]) != signature([torch.randn(5)])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copy_produces_checksums_of_the_destination(threads):
    ts = [*tensors(), torch.randn(64, 64).t()]  # one non-contiguous source
    layout = plan_layout(ts, chunk_size=4096)
    sources = [None] * len(layout.entries)
    for tensor, ref in zip(ts, layout.tensor_refs, strict=True):
        sources[ref] = sources[ref] if sources[ref] is not None else tensor
    region = torch.zeros(layout.data_nbytes, dtype=torch.uint8)
    copier = ChunkCopier(threads)
    try:
        digests = copier.copy(layout, sources, region, range(layout.num_chunks))
        view = memoryview(region.numpy())
        for i in range(layout.num_chunks):
            start, end = layout.chunk_range(i)
            assert digests[i] == digest(view[start:end])
        for entry, src in zip(layout.entries, sources, strict=True):
            stored = region[entry.offset : entry.offset + entry.nbytes]
            assert torch.equal(stored, src.contiguous().reshape(-1).view(torch.uint8))
        ordered = [digests[i] for i in range(layout.num_chunks)]
        assert copier.verify(ordered, 4096, view) == []
        region[4096 + 17] ^= 0x40
        assert copier.verify(ordered, 4096, view) == [1]
    finally:
        copier.close()


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_copy_without_checksums_then_digests(torch_threads):
    ts = [*tensors(), torch.randn(64, 64).t()]
    layout = plan_layout(ts, chunk_size=4096)
    sources = [None] * len(layout.entries)
    for tensor, ref in zip(ts, layout.tensor_refs, strict=True):
        sources[ref] = sources[ref] if sources[ref] is not None else tensor
    region = torch.zeros(layout.data_nbytes, dtype=torch.uint8)
    copier = ChunkCopier(2)
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)  # 2: torch copies in the calling thread; 1: copy threads
    try:
        assert copier.copy(layout, sources, region, range(layout.num_chunks), checksum=False) == {}
        for entry, src in zip(layout.entries, sources, strict=True):
            stored = region[entry.offset : entry.offset + entry.nbytes]
            assert torch.equal(stored, src.contiguous().reshape(-1).view(torch.uint8))
        view = memoryview(region.numpy())
        digests = copier.digests(4096, view)
        assert digests == [
            digest(view[i * 4096 : (i + 1) * 4096]) for i in range(layout.num_chunks)
        ]
    finally:
        torch.set_num_threads(before)
        copier.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_copy_threads_run_niced_and_leave_the_caller_alone():
    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    caller = nice_of_this_thread()
    copier = ChunkCopier(2, nice=min(19, caller + 7))
    try:
        workers = {copier.start().submit(nice_of_this_thread).result() for _ in range(4)}
    finally:
        copier.close()
    assert workers == {min(19, caller + 7)}
    assert nice_of_this_thread() == caller
