# Helpers for the nbdsh scripts: run by `nbdsh -n -c exec(...)` before each script, with
# VDK_SOCKET naming the server's Unix socket.
import os

import nbd

SOCK = os.environ["VDK_SOCKET"]
MIB = 1 << 20


def uri(export=""):
    return "nbd+unix:///%s?socket=%s" % (export, SOCK)


def connect(export="", structured=True, meta=True, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri(export))
    return h


def expect_error(name, f, *args):
    """Calls f(*args) and checks that the server answered the errno `name`."""
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errno == name, "expected %s, got %s (%s)" % (name, e.errno, e.string)
        return
    raise AssertionError("expected %s, but the call succeeded" % name)


def pattern(n, seed):
    return bytearray(((i * 2654435761) >> 13 ^ seed) & 0xFF for i in range(n))


def extents(h, offset, length, flags=0):
    """base:allocation extents as a list of (length, flags)."""
    got = []

    def cb(metacontext, off, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        got.extend(zip(entries[0::2], entries[1::2]))

    h.block_status(length, offset, cb, flags)
    return got
