"""Crash workload for the kill -9 test: writes records into slots of an NBD export, never
reusing a slot, flushes now and then, and after each flush appends the number of records
that are now durable to a state file (fsync'd). Killed from outside at a random moment.

    workload.py write URI STATE FIRST LIMIT SLOTS
    workload.py verify RAW STATE SLOTS

A record j goes to slot perm(j) (a fixed permutation) with a length and content that depend
only on j; some records are zero writes. After a crash, every record below the last count in
STATE must read back exactly.
"""
import os
import sys

SLOT = 16 * 1024
SIZES = [4096, 512, 16384, 3000, 12288, 1000]


def perm(j, slots):
    # A permutation of range(slots) for odd multipliers and power-of-two slots.
    return (j * 40503 + 17) % slots


def record(j):
    size = SIZES[j % len(SIZES)]
    if j % 7 == 3:
        return size, None  # a zero write
    seed = (j * 2654435761) & 0xFFFFFFFF
    unit = bytes(((seed >> (8 * (i % 4))) + i) & 0xFF for i in range(256))
    data = (unit * (size // 256 + 1))[:size]
    return size, data


def write(uri, state, first, limit, slots):
    import time
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    j = first
    while True:
        if j >= first + limit:
            # Enough for this round: wait for the kill.
            time.sleep(0.01)
            continue
        size, data = record(j)
        off = perm(j, slots) * SLOT
        if data is None:
            h.zero(size, off)
        else:
            h.pwrite(data, off)
        j += 1
        if j % 5 == 0:
            h.flush()
            with open(state, "a") as f:
                f.write("%d\n" % j)
                f.flush()
                os.fsync(f.fileno())


def verify(raw, state, slots):
    with open(state) as f:
        counts = [int(l) for l in f if l.strip()]
    durable = counts[-1] if counts else 0
    with open(raw, "rb") as f:
        for j in range(durable):
            size, data = record(j)
            f.seek(perm(j, slots) * SLOT)
            got = f.read(size)
            want = bytes(size) if data is None else data
            if got != want:
                sys.exit("record %d (slot %d, %d bytes) lost after a flush" % (j, perm(j, slots), size))
    print(durable)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        verify(sys.argv[2], sys.argv[3], int(sys.argv[4]))
