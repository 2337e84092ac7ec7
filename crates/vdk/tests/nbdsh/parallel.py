# Many requests in flight on one connection, and several connections on one disk.
# Server: --export disk=disk.img(64M) --export ram=memory:32M.

BLOCK = 65536
COUNT = 128

for export in ("disk", "ram"):
    h = connect(export)
    bufs = [pattern(BLOCK, i) for i in range(COUNT)]
    for i, b in enumerate(bufs):
        h.aio_pwrite(b, i * BLOCK)
    assert h.aio_in_flight() > 1, "writes should be in flight together"
    while h.aio_in_flight() > 0:
        h.poll(-1)
    reads = []
    for i in range(COUNT):
        buf = nbd.Buffer(BLOCK)
        reads.append((i, buf, h.aio_pread(buf, i * BLOCK)))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, buf, cookie in reads:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == bufs[i], (export, i)

    # Multi-conn: a write flushed on one connection is seen by another.
    assert h.can_multi_conn()
    h2 = connect(export)
    h.pwrite(b"from h1", 10 * BLOCK + 7)
    h.flush()
    assert h2.pread(7, 10 * BLOCK + 7) == b"from h1"
    h.shutdown()
    h2.shutdown()
print("parallel ok")
