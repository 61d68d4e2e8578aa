#!/usr/bin/env python3
"""Split captured walsender streams into per-target fuzz corpora.

Usage:
    split_fixtures.py split CORPUS_DIR STREAM...
    split_fixtures.py synth OUT_FILE

`split` reads each STREAM (the raw backend byte stream after
CopyBothResponse: a sequence of backend frames, tag byte + Int32 length that
includes itself + body) and writes seeds into

    CORPUS_DIR/frame/     each whole stream, and each individual frame
    CORPUS_DIR/pgoutput/  each XLogData payload (one pgoutput message)
    CORPUS_DIR/envelope/  the content of each pgoutput `M` (logical message)

Seeds are named by the SHA-1 of their content, like libFuzzer names its own
corpus entries, so re-running is idempotent and duplicates collapse.

`synth` writes a hand-built stream that exercises every frame and pgoutput
message kind the decoders know (used to test the splitter, and as extra
seeds for layouts a capture may not contain, e.g. streamed transactions).

Standard library only.
"""

import hashlib
import os
import struct
import sys

FACT_PREFIX = b"factlib"


class Seeds:
    def __init__(self, root):
        self.root = root
        self.counts = {}
        self.new = {}

    def add(self, target, data):
        d = os.path.join(self.root, target)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, hashlib.sha1(data).hexdigest())
        self.counts[target] = self.counts.get(target, 0) + 1
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            self.new[target] = self.new.get(target, 0) + 1


def frames(stream):
    """Yields (tag, whole_frame_bytes, body) and warns about a torn tail."""
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < 5:
            yield None, stream[pos:], None
            return
        tag = stream[pos]
        (length,) = struct.unpack_from(">i", stream, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > len(stream):
            yield None, stream[pos:], None
            return
        yield tag, stream[pos:end], stream[pos + 5 : end]
        pos = end


def cstr(buf, pos):
    end = buf.index(b"\x00", pos)
    return buf[pos:end], end + 1


def logical_message_content(msg, streamed):
    """Returns (prefix, content) of a pgoutput `M` message, or None."""
    try:
        pos = 1
        if streamed:
            pos += 4  # Int32 xid
        pos += 1 + 8  # Int8 flags, Int64 lsn
        prefix, pos = cstr(msg, pos)
        (n,) = struct.unpack_from(">i", msg, pos)
        pos += 4
        if n < 0 or pos + n != len(msg):
            return None
        return prefix, msg[pos : pos + n]
    except (ValueError, struct.error):
        return None


def split(corpus, paths):
    seeds = Seeds(corpus)
    for path in paths:
        with open(path, "rb") as f:
            stream = f.read()
        seeds.add("frame", stream)
        nframes = nxlog = nmsg = nfact = 0
        streamed = False  # between pgoutput Stream Start and Stream Stop
        for tag, frame, body in frames(stream):
            if tag is None:
                print(f"{path}: warning: torn frame of {len(frame)} bytes at the end", file=sys.stderr)
                break
            nframes += 1
            seeds.add("frame", frame)
            if tag != ord("d") or len(body) < 1 or body[0] != ord("w"):
                continue
            if len(body) < 25:
                print(f"{path}: warning: short XLogData ({len(body)} bytes)", file=sys.stderr)
                continue
            msg = body[25:]
            nxlog += 1
            seeds.add("pgoutput", msg)
            if not msg:
                continue
            kind = msg[0]
            if kind == ord("S"):
                streamed = True
            elif kind == ord("E"):
                streamed = False
            elif kind == ord("M"):
                pc = logical_message_content(msg, streamed)
                if pc is None:
                    # The stream position is a guess; try the other layout.
                    pc = logical_message_content(msg, not streamed)
                if pc is None:
                    print(f"{path}: warning: undecodable M message", file=sys.stderr)
                    continue
                nmsg += 1
                prefix, content = pc
                nfact += prefix == FACT_PREFIX
                seeds.add("envelope", content)
        print(
            f"{path}: {len(stream)} bytes, {nframes} frames, {nxlog} XLogData, "
            f"{nmsg} M messages ({nfact} with prefix {FACT_PREFIX.decode()})"
        )
    for target in ("frame", "pgoutput", "envelope"):
        print(
            f"  {target}: {seeds.counts.get(target, 0)} seeds, "
            f"{seeds.new.get(target, 0)} new files in {os.path.join(corpus, target)}"
        )


# ---------------------------------------------------------------- synthetic


def frame(tag, body):
    return bytes([ord(tag)]) + struct.pack(">i", len(body) + 4) + body


def xlog(msg, start=0x1000000, end=0x1000100, clock=760_000_000_000_000):
    return frame("d", b"w" + struct.pack(">QQq", start, end, clock) + msg)


def keepalive(end, reply):
    return frame("d", b"k" + struct.pack(">Qq", end, 760_000_000_000_000) + bytes([reply]))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field, value):
    return varint(field << 3 | 2) + varint(len(value)) + value


def pb_varint(field, value):
    return varint(field << 3) + varint(value & 0xFFFFFFFFFFFFFFFF)


def fact_envelope():
    entry = pb_bytes(1, b"tenant") + pb_bytes(2, b"acme")
    trace = pb_bytes(1, b"4bf92f3577b34da6a3ce929d0e0e4736") + pb_bytes(2, b"00f067aa0ba902b7")
    return (
        pb_bytes(1, b"0190f0c1-0000-7000-8000-000000000001")
        + pb_bytes(2, b"order")
        + pb_bytes(3, b"o-1")
        + pb_bytes(4, b"order.placed")
        + pb_bytes(5, b'{"total":42}')
        + pb_varint(6, 1_700_000_000_123_456_789)
        + pb_bytes(7, entry)
        + pb_bytes(8, trace)
    )


def m_message(prefix, content, transactional=True, xid=None):
    head = b"M" + (struct.pack(">I", xid) if xid is not None else b"")
    return head + bytes([int(transactional)]) + struct.pack(">Q", 0x1000040) + prefix + b"\0" + struct.pack(">i", len(content)) + content


def tuple_data(*values):
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "toast":
            out += b"u"
        elif isinstance(v, bytes):
            out += b"b" + struct.pack(">i", len(v)) + v
        else:
            t = v.encode()
            out += b"t" + struct.pack(">i", len(t)) + t
    return out


def synth():
    xid, sxid = 731, 732
    lsn = 0x1000000
    ts = 760_000_000_000_000
    rel = (
        b"R" + struct.pack(">I", 16384) + b"public\0orders\0" + b"d" + struct.pack(">h", 2)
        + b"\x01id\0" + struct.pack(">Ii", 23, -1)
        + b"\x00note\0" + struct.pack(">Ii", 25, -1)
    )
    msgs = [
        b"B" + struct.pack(">QqI", lsn + 0x100, ts, xid),
        rel,
        b"Y" + struct.pack(">I", 90001) + b"public\0mood\0",
        b"O" + struct.pack(">Q", lsn) + b"origin_a\0",
        b"I" + struct.pack(">I", 16384) + b"N" + tuple_data("1", "hello"),
        b"U" + struct.pack(">I", 16384) + b"K" + tuple_data("1", None) + b"N" + tuple_data("1", "toast"),
        b"U" + struct.pack(">I", 16384) + b"O" + tuple_data("1", "a") + b"N" + tuple_data("1", b"\x00\x01"),
        b"U" + struct.pack(">I", 16384) + b"N" + tuple_data("2", "b"),
        b"D" + struct.pack(">I", 16384) + b"K" + tuple_data("1", None),
        b"T" + struct.pack(">iB", 2, 3) + struct.pack(">II", 16384, 16390),
        m_message(FACT_PREFIX, fact_envelope()),
        m_message(b"other", b"not an envelope", transactional=False),
        b"C" + struct.pack(">BQQq", 0, lsn + 0x100, lsn + 0x130, ts),
        # A streamed transaction.
        b"S" + struct.pack(">IB", sxid, 1),
        b"R" + struct.pack(">I", sxid) + rel[1:],
        b"I" + struct.pack(">II", sxid, 16384) + b"N" + tuple_data("3", "streamed"),
        m_message(FACT_PREFIX, fact_envelope(), xid=sxid),
        b"T" + struct.pack(">IiB", sxid, 1, 0) + struct.pack(">I", 16384),
        b"E",
        b"A" + struct.pack(">II", sxid, sxid + 1),
        b"A" + struct.pack(">IIQq", sxid, sxid + 1, lsn + 0x200, ts),
        b"c" + struct.pack(">IBQQq", sxid, 0, lsn + 0x300, lsn + 0x330, ts),
        # Two-phase commit.
        b"b" + struct.pack(">QQqI", lsn + 0x400, lsn + 0x430, ts, 733) + b"gid-1\0",
        b"P" + struct.pack(">BQQqI", 0, lsn + 0x400, lsn + 0x430, ts, 733) + b"gid-1\0",
        b"K" + struct.pack(">BQQqI", 0, lsn + 0x500, lsn + 0x530, ts, 733) + b"gid-1\0",
        b"r" + struct.pack(">BQQqqI", 0, lsn + 0x430, lsn + 0x600, ts, ts + 1, 734) + b"gid-2\0",
        b"p" + struct.pack(">BQQqI", 0, lsn + 0x700, lsn + 0x730, ts, 735) + b"gid-3\0",
    ]
    out = keepalive(lsn, 0)
    for i, m in enumerate(msgs):
        out += xlog(m, start=lsn + 0x10 * i, end=lsn + 0x1000)
    out += keepalive(lsn + 0x1000, 1)
    out += frame("N", b"SWARNING\0VWARNING\0C01000\0Mjust a notice\0\0")
    out += frame("c", b"")
    out += frame("E", b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 42\0Hstop it\0\0")
    return out


def main(argv):
    if len(argv) >= 3 and argv[1] == "split":
        split(argv[2], argv[3:])
    elif len(argv) == 3 and argv[1] == "synth":
        with open(argv[2], "wb") as f:
            f.write(synth())
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
