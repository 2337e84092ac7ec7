# The error filter drives the server's error path: injected failures reach the client as
# the errno the filter was told, and the connection lives on. Served with
#   --filter error:op=read,range=1M-2M,errno=EIO --filter error:op=write,range=3M-4M,errno=ENOSPC
h = connect("memory")
h.pwrite(b"x" * 4096, 0)
assert h.pread(4096, 0) == b"x" * 4096
for _ in range(3):
    expect_error("EIO", h.pread, 4096, 1 * MIB + 8192)
    expect_error("ENOSPC", h.pwrite, b"y" * 4096, 3 * MIB)
    # Around the failing ranges, and after each failure, the connection serves as before.
    h.pwrite(b"z" * 4096, 2 * MIB)
    assert h.pread(4096, 2 * MIB) == b"z" * 4096
    h.flush()
# A second connection is unaffected by the first one's errors.
g = connect("memory")
assert g.pread(4096, 0) == b"x" * 4096
g.shutdown()
h.shutdown()
