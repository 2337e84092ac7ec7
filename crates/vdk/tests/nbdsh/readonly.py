# A read-only export refuses every write with EPERM and still reads.
# Server: --read-only disk.img (64M, first 4 KiB written by the test).

h = connect("", strict=False)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
assert h.pread(5, 0) == b"hello"
expect_error("EPERM", h.pwrite, b"x", 0)
expect_error("EPERM", h.trim, 4096, 0)
expect_error("EPERM", h.zero, 4096, 0)
h.flush()
h.shutdown()
print("readonly ok")
