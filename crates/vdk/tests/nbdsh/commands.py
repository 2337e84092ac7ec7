# Every command on a file export and a RAM export: READ (structured, holes, DF), WRITE (FUA),
# FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS (REQ_ONE), CACHE, DISC.
# Server: --export disk=disk.img(64M) --export ram=memory:32M.

for export in ("disk", "ram"):
    h = connect(export)
    data = pattern(3 * 65536, 1)

    # Write at an odd offset, read back exactly; FUA and flush succeed.
    h.pwrite(data, 12345)
    assert h.pread(len(data), 12345) == data, export
    h.pwrite(b"fua!", 1 * MIB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(4, 1 * MIB) == b"fua!"

    # Block status: data where written, hole where not; REQ_ONE gives one extent.
    ext = extents(h, 12288, 4 * MIB)
    assert sum(l for l, _ in ext) == 4 * MIB and ext[0][1] == 0, (export, ext)
    ext = extents(h, 8 * MIB, 4 * MIB)
    assert ext[0][1] == 3, (export, ext)  # hole | zero
    one = extents(h, 0, 4 * MIB, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1, one

    # A large read over data and a hole arrives as data and hole chunks.
    kinds = []

    def chunk(sub, off, status, err):
        kinds.append(status)
        return 0

    h.pwrite(pattern(65536, 2), 2 * MIB)
    got = h.pread_structured(4 * MIB, 2 * MIB, chunk)
    assert nbd.READ_DATA in kinds and nbd.READ_HOLE in kinds, (export, kinds)
    assert got[:65536] == pattern(65536, 2) and got[65536:] == bytearray(4 * MIB - 65536)

    # DF: the same read comes as one chunk.
    kinds.clear()
    got_df = h.pread_structured(4 * MIB, 2 * MIB, chunk, nbd.CMD_FLAG_DF)
    assert kinds == [nbd.READ_DATA] and got_df == got, (export, kinds)

    # Trim and write zeroes read back as zeroes.
    h.pwrite(pattern(1 * MIB, 3), 16 * MIB)
    h.trim(512 * 1024, 16 * MIB)
    assert h.pread(512 * 1024, 16 * MIB) == bytearray(512 * 1024)
    assert h.pread(4096, 16 * MIB + 512 * 1024) == pattern(1 * MIB, 3)[512 * 1024:512 * 1024 + 4096]
    h.pwrite(pattern(1 * MIB, 4), 20 * MIB)
    h.zero(256 * 1024, 20 * MIB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(256 * 1024, 20 * MIB) == bytearray(256 * 1024)
    h.zero(256 * 1024, 20 * MIB + 256 * 1024, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(512 * 1024, 20 * MIB) == bytearray(512 * 1024)
    assert h.pread(4096, 20 * MIB + 512 * 1024) == pattern(1 * MIB, 4)[512 * 1024:512 * 1024 + 4096]
    ext = extents(h, 16 * MIB, 512 * 1024)
    assert ext == [(512 * 1024, 3)], (export, ext)  # the trimmed range is a hole

    # Cache is accepted.
    h.cache(1 * MIB, 0)

    # DISC: shutdown sends NBD_CMD_DISC and the server closes cleanly.
    h.shutdown()

# A new connection sees what the earlier ones wrote (one disk behind every connection).
h = connect("disk")
assert h.pread(4, 1 * MIB) == b"fua!"
print("commands ok")
