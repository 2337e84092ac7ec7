"""vdk beside nbdkit and qemu-nbd, on the same work, in one run.

Every row is measured with fio's nbd engine (libnbd, one connection, queue depth 16): 4 KiB
random read and write, 1 MiB sequential read and write, over a Unix socket and over loopback
TCP, for a RAM disk (vdk --memory vs nbdkit memory) and for a raw file (vdk vs nbdkit file vs
qemu-nbd). Each figure is the median of --runs runs; the servers take turns within each round,
so drift on the machine hits all of them. A plain Unix-socket stream (1 MiB writes, nothing
else) is measured too: the ceiling for 1 MiB transfers on this machine.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

GIB = 1 << 30
WORKLOADS = [("randread", "4k"), ("randwrite", "4k"), ("read", "1m"), ("write", "1m")]


def wait_for(addr, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if addr[0] == "unix":
                s = socket.socket(socket.AF_UNIX)
                s.connect(addr[1])
            else:
                s = socket.create_connection(("127.0.0.1", addr[1]))
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server at %s did not start" % (addr,))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, name, disk, transport, argv, uri, addr):
        self.name, self.disk, self.transport = name, disk, transport
        self.argv, self.uri, self.addr = argv, uri, addr
        self.proc = None

    def start(self):
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self.addr)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def servers(vdk, tmp, image, before=None):
    out = []
    # (name, binary) of each vdk measured: this build, and with --vdk-before another one.
    builds = [("vdk", vdk)] + ([("vdk-before", before)] if before else [])
    for transport in ("unix", "tcp"):
        def addr(tag):
            if transport == "unix":
                path = os.path.join(tmp, "%s-%s.sock" % (tag, transport))
                return ("unix", path)
            return ("tcp", free_port())

        def uri(a, export=""):
            if a[0] == "unix":
                return "nbd+unix:///%s?socket=%s" % (export, a[1])
            return "nbd://127.0.0.1:%d/%s" % (a[1], export)

        def listen_vdk(a):
            return "unix://" + a[1] if a[0] == "unix" else "tcp://127.0.0.1:%d" % a[1]

        def listen_nbdkit(a):
            return ["-U", a[1]] if a[0] == "unix" else ["-i", "127.0.0.1", "-p", str(a[1])]

        def listen_qemu(a):
            return ["-k", a[1]] if a[0] == "unix" else ["-b", "127.0.0.1", "-p", str(a[1])]

        for name, binary in builds:
            a = addr(name + "-mem")
            out.append(Server(name, "memory", transport,
                              [binary, "serve", "--memory", "1G", "--listen", listen_vdk(a)],
                              uri(a, "memory"), a))
        a = addr("nbdkit-mem")
        out.append(Server("nbdkit", "memory", transport,
                          ["nbdkit", "-f", "--exit-with-parent"] + listen_nbdkit(a) +
                          ["memory", "1G"], uri(a), a))
        for name, binary in builds:
            a = addr(name + "-file")
            # vdk locks the image it serves: each vdk server has a copy of its own.
            own = os.path.join(tmp, "%s-%s.img" % (name, transport))
            subprocess.run(["cp", "--reflink=auto", image, own], check=True)
            out.append(Server(name, "file", transport,
                              [binary, "serve", own, "--listen", listen_vdk(a)], uri(a), a))
        a = addr("nbdkit-file")
        out.append(Server("nbdkit", "file", transport,
                          ["nbdkit", "-f", "--exit-with-parent"] + listen_nbdkit(a) +
                          ["file", image], uri(a), a))
        a = addr("qemu-file")
        out.append(Server("qemu-nbd", "file", transport,
                          ["qemu-nbd", "-f", "raw", "-t", "-e", "16", "--cache=writeback"] +
                          listen_qemu(a) + [image], uri(a), a))
    return out


def fio(uri, rw, bs, runtime):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=" + bs,
           "--iodepth=16", "--numjobs=1", "--size=1G", "--time_based",
           "--runtime=%d" % runtime, "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"] / 1e6, side["iops"]


def prefill(uri):
    """Writes the whole disk once, so reads are of data, not holes."""
    cmd = ["fio", "--name=fill", "--ioengine=nbd", "--uri=" + uri, "--rw=write", "--bs=1m",
           "--iodepth=16", "--size=1G", "--output-format=json"]
    subprocess.run(cmd, check=True, capture_output=True)


def unix_stream_mbps(seconds=3, chunk=1 << 20):
    """Throughput of a bare Unix-socket stream: one writer, one reader, 1 MiB at a time."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got = [0]

    def reader():
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = b.recv_into(view)
            if n == 0:
                return
            got[0] += n

    t = threading.Thread(target=reader)
    t.start()
    data = bytes(chunk)
    end = time.time() + seconds
    start = time.time()
    while time.time() < end:
        a.sendall(data)
    a.close()
    t.join()
    return got[0] / (time.time() - start) / 1e6


def rotated(servers_, r):
    """The servers in round `r`'s order: within each disk/transport, each server goes first
    in one round, so that no position favours one every time."""
    groups = {}
    for s in servers_:
        groups.setdefault((s.disk, s.transport), []).append(s)
    out = []
    for g in groups.values():
        k = r % len(g)
        out += g[k:] + g[:k]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--only", default="", help="run only rows whose disk/transport match, e.g. memory/unix")
    ap.add_argument("--vdk-before", default=None,
                    help="another vdk binary (an earlier build) measured in the same rounds")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vdk-bench-")
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:  # a file of data, not holes
        block = os.urandom(1 << 20)
        for _ in range(GIB >> 20):
            f.write(block)
    before = os.path.abspath(args.vdk_before) if args.vdk_before else None
    all_servers = [s for s in servers(os.path.abspath(args.vdk), tmp, image, before)
                   if args.only in "%s/%s" % (s.disk, s.transport)]
    results = {}
    streams = []
    try:
        for s in all_servers:
            s.start()
            if s.disk == "memory":
                prefill(s.uri)
        for r in range(args.runs):
            streams.append(unix_stream_mbps())
            print("run %d plain unix stream %8.1f MB/s" % (r + 1, streams[-1]), file=sys.stderr)
            for rw, bs in WORKLOADS:
                for s in rotated(all_servers, r):
                    mbps, iops = fio(s.uri, rw, bs, args.runtime)
                    results.setdefault((s.disk, s.transport, rw, bs, s.name), []).append((mbps, iops))
                    print("run %d %-8s %-6s %-5s %-9s %-8s %8.1f MB/s %9.0f IOPS" %
                          (r + 1, s.disk, s.transport, bs, rw, s.name, mbps, iops), file=sys.stderr)
    finally:
        for s in all_servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    stream = statistics.median(streams)
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for k, vals in results.items()}
    print("# vdk benchmark, %s, %s, %d cores, fio nbd engine, iodepth 16, median of %d x %d s"
          % (time.strftime("%Y-%m-%d"), platform.platform(), os.cpu_count(), args.runs, args.runtime))
    print()
    print("| disk | transport | workload | vdk | peer | peer result | vdk/peer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (disk, transport, rw, bs, name), (mbps, iops) in sorted(med.items()):
        if name == "vdk":
            continue
        vm, vi = med[(disk, transport, rw, bs, "vdk")]
        fmt = (lambda m, i: "%.0f IOPS" % i) if bs == "4k" else (lambda m, i: "%.0f MB/s" % m)
        print("| %s | %s | %s %s | %s | %s | %s | %.2f |" %
              (disk, transport, bs, rw, fmt(vm, vi), name, fmt(mbps, iops), vm / mbps))
    print()
    print("Plain Unix-socket stream, 1 MiB writes (median of %d): %.0f MB/s" % (len(streams), stream))
    for (disk, transport, rw, bs, name), (mbps, _) in sorted(med.items()):
        if name == "vdk" and transport == "unix" and bs == "1m":
            print("vdk %s %s 1 MiB over Unix: %.0f MB/s = %.0f %% of the plain stream" %
                  (disk, rw, mbps, 100 * mbps / stream))


if __name__ == "__main__":
    main()
