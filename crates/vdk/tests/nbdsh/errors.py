# Bad requests get error replies and the connection lives on.
# Server: --export disk=disk.img(64M) --export ram=memory:32M.

h = connect("ram", strict=False)
size = h.get_size()
expect_error("EINVAL", h.pread, 8192, size - 4096)           # read past the end
expect_error("ENOSPC", h.pwrite, b"x" * 8192, size - 4096)   # write past the end
expect_error("EINVAL", h.trim, 8192, size - 4096)            # trim past the end
expect_error("ENOSPC", h.zero, 8192, size - 4096)            # zeroes past the end
expect_error("EINVAL", h.pread, 4096, 2**63)                 # offset beyond any disk
expect_error("EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_FUA)    # flag of another command
expect_error("EINVAL", h.pread, 512, 0, 1 << 7)              # unknown flag
h.pwrite(b"still here", 0)
assert h.pread(10, 0) == b"still here"
h.shutdown()

# Larger than the 32 MiB maximum, inside the 64 MiB disk.
h = connect("disk", strict=False)
expect_error("EINVAL", h.pread, 33 * MIB, 0)
# A write's payload is skipped in small pieces, so the stream stays in step.
expect_error("EINVAL", h.pwrite, bytearray(33 * MIB), 0)
h.pwrite(b"still here", 0)
assert h.pread(10, 0) == b"still here"
h.shutdown()
print("errors ok")
