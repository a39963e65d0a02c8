"""The streaming safetensors writer: whatever mix of chunk kinds and sizes a merge hands it (slots
it fills, views it passes, ranges copied from a base file), the file holds the header and every
tensor's bytes in order; small slot chunks are gathered before the writer thread takes them."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from loratools.formats.safetensors_writer import StreamingSafetensorsWriter, encode_header

KINDS = st.sampled_from(["slot", "view", "copy"])


@given(st.lists(st.lists(st.tuples(KINDS, st.integers(1, 3 << 20)), min_size=1, max_size=4), min_size=1, max_size=6),
       st.integers(0, 2**32 - 1))
def test_any_mix_of_chunks_is_written_in_order(tmp_path_factory, tensors, seed):
    work = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(seed)
    sizes = [sum(n for _, n in chunks) for chunks in tensors]
    source = rng.integers(0, 256, size=sum(sizes), dtype=np.uint8)
    (work / "source").write_bytes(source.tobytes())
    entries = [(f"t{i}", "U8", (size,)) for i, size in enumerate(sizes)]
    with open(work / "source", "rb") as src, open(work / "out", "wb", buffering=0) as fh:
        writer = StreamingSafetensorsWriter(fh, entries, {"format": "pt"})
        at = 0
        for (name, _, _), chunks in zip(entries, tensors):
            writer.begin(name)
            for kind, n in chunks:
                data = source[at: at + n]
                if kind == "slot":
                    slot = writer.buffer(n)
                    slot[:] = data
                    writer.write(slot, slot=True)
                elif kind == "view":
                    writer.write(data)
                else:
                    writer.copy(src.fileno(), at, n)
                at += n
        writer.close()
    header, _ = encode_header(entries, {"format": "pt"})
    assert (work / "out").read_bytes() == header + source.tobytes()


def test_small_slot_chunks_share_a_handoff(tmp_path):
    """A thousand 4 KiB chunks (an MoE model's small tensors) reach the thread in a few slots."""
    entries = [(f"t{i}", "U8", (4096,)) for i in range(1000)]
    with open(tmp_path / "out", "wb", buffering=0) as fh:
        writer = StreamingSafetensorsWriter(fh, entries, None)
        handoffs = []
        put = writer._put
        writer._put = lambda data, owner, ready: (handoffs.append(len(data)), put(data, owner, ready))
        for i, (name, _, _) in enumerate(entries):
            writer.begin(name)
            slot = writer.buffer(4096)
            slot[:] = i % 251
            writer.write(slot, slot=True)
        writer.close()
    assert len(handoffs) <= 1 + 4096 * 1000 // StreamingSafetensorsWriter.SLOT_BYTES + 1
    data = (tmp_path / "out").read_bytes()[-4096 * 1000:]
    assert all(data[i * 4096] == i % 251 for i in range(1000))
