"""SPDY/3.1 framing and header compression, with byte vectors written from the spec."""
import socket
import struct
import threading
import zlib

import pytest

from pyshim.streaming import spdy


def test_dictionary_is_the_spdy3_one():
    assert len(spdy.DICTIONARY) == 1423
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    # The dictionary id a SPDY/3 peer's zlib header carries (adler32 of the dictionary).
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2


def test_control_and_data_frame_bytes():
    assert spdy.rst_stream(5, spdy.CANCEL) == bytes.fromhex("80030003 00000008 00000005 00000005")
    assert spdy.ping_frame(2) == bytes.fromhex("80030006 00000004 00000002")
    assert spdy.goaway_frame(7, 0) == bytes.fromhex("80030007 00000008 00000007 00000000")
    assert spdy.window_update(3, 65536) == bytes.fromhex("80030009 00000008 00000003 00010000")
    assert spdy.settings_frame([(0, 7, 65536)]) == bytes.fromhex("80030004 0000000c 00000001 00000007 00010000")
    assert spdy.data_frame_header(1, 5) + b"hello" == bytes.fromhex("00000001 00000005") + b"hello"
    assert spdy.data_frame_header(3, 0, fin=True) == bytes.fromhex("00000003 01000000")


def test_header_block_layout():
    block = spdy.encode_header_block({"streamType": "error", "Port": "80"})
    assert block == (b"\x00\x00\x00\x02" + b"\x00\x00\x00\x0astreamtype" + b"\x00\x00\x00\x05error"
                     + b"\x00\x00\x00\x04port" + b"\x00\x00\x00\x0280")
    assert spdy.decode_header_block(block) == {"streamtype": ["error"], "port": ["80"]}
    multi = spdy.encode_header_block({"x": ["a", "b"]})
    assert spdy.decode_header_block(multi) == {"x": ["a", "b"]}
    with pytest.raises(spdy.ProtocolError):
        spdy.decode_header_block(block[:-3])


def test_header_compression_uses_one_zlib_stream_per_direction():
    comp, decomp = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    first = comp.compress({"streamtype": "stdout"})
    # A zlib stream with a preset dictionary: FDICT set, DICTID = adler32 of the SPDY dictionary.
    assert first[1] & 0x20 and first[2:6] == struct.pack("!I", 0xE3C6A7C2)
    second = comp.compress({"streamtype": "stdout"})
    assert not second.startswith(first[:2])  # no new zlib header: the same stream goes on
    assert len(second) < len(first)          # and it remembers what it compressed before
    assert decomp.decompress(first) == {"streamtype": ["stdout"]}
    assert decomp.decompress(second) == {"streamtype": ["stdout"]}
    # A fresh decompressor cannot read the second block alone: the context really is shared.
    with pytest.raises(spdy.ProtocolError):
        spdy.HeaderDecompressor().decompress(second)


def test_plain_zlib_with_the_dictionary_reads_our_blocks():
    """What Go's compress/zlib with the dictionary does on the other side."""
    comp = spdy.HeaderCompressor()
    raw = comp.compress({"streamtype": "error"})
    d = zlib.decompressobj(zdict=spdy.DICTIONARY)
    assert spdy.decode_header_block(d.decompress(raw)) == {"streamtype": ["error"]}


def test_syn_stream_round_trip_and_layout():
    comp, decomp = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    frame = spdy.syn_stream(comp, 1, {"streamType": "error"}, fin=False)
    assert frame[:4] == bytes.fromhex("80030001")
    assert frame[4] == 0 and int.from_bytes(frame[5:8], "big") == len(frame) - 8
    assert frame[8:18] == bytes.fromhex("00000001 00000000 0000")
    parsed = spdy.parse_frame(frame[:8], frame[8:], decomp)
    assert (parsed.kind, parsed.stream_id, parsed.headers) == (spdy.SYN_STREAM, 1, {"streamtype": ["error"]})
    reply = spdy.syn_reply(comp, 1, {}, fin=True)
    parsed = spdy.parse_frame(reply[:8], reply[8:], decomp)
    assert (parsed.kind, parsed.flags, parsed.stream_id, parsed.headers) == (spdy.SYN_REPLY, 1, 1, {})


def test_parse_rejects_other_versions_and_ignores_unknown_types():
    decomp = spdy.HeaderDecompressor()
    v2 = struct.pack("!HHI", 0x8002, spdy.PING, 4) + b"\0\0\0\1"
    with pytest.raises(spdy.ProtocolError):
        spdy.parse_frame(v2[:8], v2[8:], decomp)
    unknown = spdy.control_frame(0x0A, 0, b"xx")
    assert spdy.parse_frame(unknown[:8], unknown[8:], decomp) is None


def test_sessions_talk_to_each_other():
    a, b = socket.socketpair()
    received = []

    def on_stream(stream):
        received.append(stream)
        return stream.header("streamtype") != "refuse-me"

    server = spdy.Session(a, server=True, on_stream=on_stream)
    client = spdy.Session(b, server=False)
    threads = [threading.Thread(target=s.run, daemon=True) for s in (server, client)]
    for t in threads:
        t.start()
    stream = client.open_stream({"streamType": "stdin"})
    assert stream.id == 1
    stream.write(b"x" * 300_000)  # more than one frame
    stream.close()
    assert received[0].read_all(5) == b"x" * 300_000
    received[0].write(b"back")
    received[0].close()
    assert stream.read_all(5) == b"back"
    with pytest.raises(spdy.SessionClosed):
        client.open_stream({"streamType": "refuse-me"})
    client.ping(5)
    client.close()
    for t in threads:
        t.join(5)
    assert server.closed.is_set()
    a.close()
    b.close()
