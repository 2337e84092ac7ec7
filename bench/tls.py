"""NBD over TLS: vdk beside nbdkit (memory plugin) and qemu-nbd (a raw file in /dev/shm),
each with --tls require and the same certificates, on TCP loopback. nbdcopy (libnbd, GnuTLS)
writes 1 GiB of random bytes to the disk, then reads it back to null:. Each figure is the
median of --runs runs; the servers take turns. vdk without TLS is shown as the cost of TLS.
"""
import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc):
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit("server exited: %s" % proc.args)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not listen: %s" % proc.args)


def make_pki(d):
    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ssl("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-days", "2", "-subj", "/CN=bench CA")
    ssl("req", *key, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext")


def timed(cmd):
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vdk-before", help="another vdk build, served with TLS in the same rounds")
    args = ap.parse_args()
    vdk = os.path.abspath(args.vdk)
    tmp = tempfile.mkdtemp(prefix="vdk-bench-tls-", dir="/dev/shm")
    procs = []
    try:
        pki = os.path.join(tmp, "pki")
        os.mkdir(pki)
        make_pki(pki)
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            for _ in range(GIB // (64 << 20)):
                f.write(os.urandom(64 << 20))
        qfile = os.path.join(tmp, "qemu.raw")
        with open(qfile, "wb") as f:
            f.truncate(GIB)
        servers = {}
        port = free_port()
        servers["vdk"] = ([vdk, "serve", "--memory", "1G", "--listen", "tcp://127.0.0.1:%d" % port,
                           "--tls", "require", "--tls-certificates", pki], port, "memory", True)
        if args.vdk_before:
            port = free_port()
            servers["vdk before"] = ([os.path.abspath(args.vdk_before), "serve", "--memory", "1G",
                                      "--listen", "tcp://127.0.0.1:%d" % port, "--tls", "require",
                                      "--tls-certificates", pki], port, "memory", True)
        port = free_port()
        servers["vdk (no TLS)"] = ([vdk, "serve", "--memory", "1G",
                                    "--listen", "tcp://127.0.0.1:%d" % port], port, "memory", False)
        port = free_port()
        servers["nbdkit"] = (["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--tls=require",
                              "--tls-certificates=" + pki, "memory", "1G"], port, "", True)
        port = free_port()
        servers["qemu-nbd"] = (["qemu-nbd", "-t", "-b", "127.0.0.1", "-p", str(port), "-f", "raw",
                                "-e", "8", "--object",
                                "tls-creds-x509,id=tls0,dir=%s,endpoint=server,verify-peer=off" % pki,
                                "--tls-creds", "tls0", "--cache=writeback", qfile], port, "", True)
        uris = {}
        for name, (cmd, port, export, tls) in servers.items():
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_port(port, p)
            if tls:
                uris[name] = "nbds://localhost:%d/%s?tls-certificates=%s" % (port, export, pki)
            else:
                uris[name] = "nbd://localhost:%d/%s" % (port, export)
        times = {}
        for r in range(args.runs + 1):  # round 0 warms up and is not counted
            for name, uri in uris.items():
                w = timed(["nbdcopy", src, uri])
                rd = timed(["nbdcopy", uri, "null:"])
                if r > 0:
                    times.setdefault((name, "write"), []).append(w)
                    times.setdefault((name, "read"), []).append(rd)
                print("run %d %-13s write %.2f s, read %.2f s" % (r, name, w, rd), file=sys.stderr)
        # The copy is checked once, through TLS, for every server.
        for name, uri in uris.items():
            out = os.path.join(tmp, "back.raw")
            subprocess.run(["nbdcopy", uri, out], check=True)
            subprocess.run(["cmp", "-s", src, out], check=True)
            os.remove(out)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    mib = GIB / (1 << 20)
    print("# NBD over TLS, nbdcopy of 1 GiB, %s, %s, %d cores, median of %d runs"
          % (time.strftime("%Y-%m-%d"), platform.platform(), os.cpu_count(), args.runs))
    print()
    print("| server | write MiB/s | read MiB/s |")
    print("| --- | --- | --- |")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in uris:
        print("| %s | %.0f | %.0f |" % (name, mib / med[(name, "write")], mib / med[(name, "read")]))
    print()
    for peer in ("nbdkit", "qemu-nbd") + (("vdk before",) if args.vdk_before else ()):
        print("vdk / %s: write %.2fx, read %.2fx" % (
            peer, med[(peer, "write")] / med[("vdk", "write")],
            med[(peer, "read")] / med[("vdk", "read")]))


if __name__ == "__main__":
    main()
