"""Helpers for the attack suite (tests/test_attack.py) and the attack
bench (tests/bench/attack): the attacker (build/attack, tests/attack.c),
legitimate probes timed while it runs, and what a server process holds
(descriptors, memory, CPU) read from /proc.

Nothing here sleeps to synchronise: the attacker reports on its stdout,
probes and samplers are threads bounded in count and in time.
"""
import os
import re
import resource
import socket
import ssl
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTACK = os.path.join(ROOT, "build", "attack")
CHROMIUM_HELLO = os.path.join(ROOT, "tests", "hellos", "chromium.bin")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# the attacker's lines (see tests/attack.c)
TICK_RE = re.compile(
    r"^(?P<tag>tick|done) t=(?P<t>[0-9.]+) open=(?P<open>\d+) "
    r"maxopen=(?P<maxopen>\d+) connecting=(?P<connecting>\d+) "
    r"fin=(?P<fin>\d+) rst=(?P<rst>\d+) failed=(?P<failed>\d+) "
    r"sent=(?P<sent>\d+)(?: fin_ms=(?P<fin_ms>\S+) rst_ms=(?P<rst_ms>\S+) "
    r"late_ms=(?P<late_ms>\S+) soon_ms=(?P<soon_ms>\S+))?$")


def nofile_hard():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _quant(s):
    """'N/min/p50/p99/max' (ms) -> dict, or None when N is 0."""
    parts = s.split("/")
    if parts[0] == "0":
        return None
    n, lo, p50, p99, hi = (int(x) for x in parts)
    return {"n": n, "min": lo, "p50": p50, "p99": p99, "max": hi}


def _merge_quant(qs):
    qs = [q for q in qs if q]
    if not qs:
        return None
    return {"n": sum(q["n"] for q in qs), "min": min(q["min"] for q in qs),
            "p50": max(q["p50"] for q in qs), "p99": max(q["p99"] for q in qs),
            "max": max(q["max"] for q in qs)}


class Attack:
    """build/attack, in as many processes as the descriptor limit needs
    (each takes one descriptor a connection).  Reads their lines as they
    come; .latest() sums the last tick of every process; .wait() returns
    the summed "done" lines."""

    def __init__(self, port, conns, sources=1, mode="idle", rate=2500,
                 secs=30, trickle_ms=1000, hello=CHROMIUM_HELLO,
                 first="127.1.0.1", host="127.0.0.1"):
        per = max(256, nofile_hard() - 64)
        nproc = (conns + per - 1) // per
        self.procs, self.ticks, self.done = [], [], []
        self.lock = threading.Lock()
        self.conns = conns
        self.t0 = time.monotonic()
        for i in range(nproc):
            n = conns // nproc + (1 if i < conns % nproc else 0)
            argv = [ATTACK, "-t", "%s:%d" % (host, port), "-s", first,
                    "-n", str(sources), "-c", str(n),
                    "-r", str(rate / nproc), "-m", mode, "-d", str(secs),
                    "-i", str(trickle_ms)]
            if mode == "trickle":
                argv += ["-H", hello]
            p = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
            self.procs.append(p)
            self.ticks.append(None)
            self.done.append(None)
            threading.Thread(target=self._read, args=(i, p),
                             daemon=True).start()

    def _read(self, i, p):
        for line in p.stdout:
            m = TICK_RE.match(line.strip())
            if not m:
                continue
            d = m.groupdict()
            with self.lock:
                self.ticks[i] = d
                if d["tag"] == "done":
                    self.done[i] = d

    def latest(self):
        """Summed counters of the last ticks, or None before the first."""
        with self.lock:
            ticks = list(self.ticks)
        if any(t is None for t in ticks):
            return None
        keys = ("open", "connecting", "fin", "rst", "failed", "sent")
        return {k: sum(int(t[k]) for t in ticks) for k in keys}

    def made(self):
        """Every connection attempted and none still connecting."""
        x = self.latest()
        return x is not None and \
            x["open"] + x["fin"] + x["rst"] + x["failed"] >= self.conns \
            and x["connecting"] == 0

    def wait(self, timeout):
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("the attacker did not end in %.0fs"
                                     % timeout)
        # its reader threads see EOF right after the exit
        deadline = time.monotonic() + 5
        while any(d is None for d in self.done) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        errs = [p.stderr.read() for p in self.procs]
        if any(d is None for d in self.done):
            raise AssertionError("the attacker reported nothing: %r" % errs)
        out = {k: sum(int(d[k]) for d in self.done)
               for k in ("open", "fin", "rst", "failed", "sent",
                         "connecting")}
        # each process's own peak; the peaks of several processes need not
        # coincide, so their sum is an upper bound of the whole's peak
        out["maxopen"] = sum(int(d["maxopen"]) for d in self.done)
        out["t"] = max(float(d["t"]) for d in self.done)
        out["fin_ms"] = _merge_quant(_quant(d["fin_ms"]) for d in self.done)
        out["rst_ms"] = _merge_quant(_quant(d["rst_ms"]) for d in self.done)
        out["late_ms"] = _merge_quant(_quant(d["late_ms"]) for d in self.done)
        out["soon_ms"] = _merge_quant(_quant(d["soon_ms"]) for d in self.done)
        for k in ("late", "soon"):
            out[k] = out[k + "_ms"]["n"] if out[k + "_ms"] else 0
        out["rc"] = [p.returncode for p in self.procs]
        out["stderr"] = errs
        return out

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


# --------------------------------------------------------------- /proc

def children_of(pid):
    """pid and every process below it (by walking /proc once)."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def fd_count(pids):
    n = 0
    for p in pids:
        try:
            n += len(os.listdir("/proc/%d/fd" % p))
        except OSError:
            pass
    return n


def status_kib(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pids):
    n = 0
    for p in pids:
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        n += int(line.split()[1])
        except OSError:
            pass
    return n


def cpu_secs(pid, pids=()):
    """CPU of pid, the children it reaped, and the live pids given."""
    total = 0
    for p in set([pid]) | set(pids):
        try:
            with open("/proc/%d/stat" % p) as f:
                st = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(st[11]) + int(st[12])
        if p == pid:
            total += int(st[13]) + int(st[14])
    return total / CLK_TCK


class Sampler(threading.Thread):
    """Every `every` seconds: descriptors and memory of a process, or of
    it and every process below it (tree=True)."""

    def __init__(self, pid, every=0.2, limit=3000, tree=False):
        super().__init__(daemon=True)
        self.pid, self.every, self.limit = pid, every, limit
        self.tree = tree
        self.samples = []
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set() and len(self.samples) < self.limit:
            pids = children_of(self.pid) if self.tree else [self.pid]
            self.samples.append({"t": time.monotonic(),
                                 "fds": fd_count(pids),
                                 "rss": sum(status_kib(p) for p in pids),
                                 "pss": pss_kib(pids)})
            self.stop_ev.wait(self.every)

    def stop(self):
        self.stop_ev.set()
        self.join(10)

    def peak(self, key):
        return max((s[key] for s in self.samples), default=0)


# -------------------------------------------------------------- probes

def _client_ctx(alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    return ctx


HTTPS_CTX = _client_ctx(["http/1.1"])
ACME_CTX = _client_ctx(["acme-tls/1"])


def https_get(port, host="127.0.0.1", source="127.0.0.1", timeout=5.0,
              expect=b"hello from nginx"):
    """One HTTPS request on a new connection (full handshake); the time
    from connect(2) to the end of the answer, in seconds."""
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        with HTTPS_CTX.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                      b"Connection: close\r\n\r\n")
            buf = b""
            while True:
                b = t.recv(65536)
                if not b:
                    break
                buf += b
    took = time.monotonic() - t0
    if not buf.startswith(b"HTTP/1.1 200") or expect not in buf:
        raise AssertionError("unexpected answer %r" % buf[:200])
    return took


def acme_handshake(port, name, der, host="127.0.0.1", source="127.0.0.1",
                   timeout=5.0):
    """An acme-tls/1 handshake for `name`; checks that the certificate
    served is `der` (the challenge certificate); seconds taken."""
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        with ACME_CTX.wrap_socket(s, server_hostname=name) as t:
            got = t.getpeercert(binary_form=True)
            alpn = t.selected_alpn_protocol()
    took = time.monotonic() - t0
    if got != der or alpn != "acme-tls/1":
        raise AssertionError("acme-tls/1: alpn %r, %s certificate"
                             % (alpn, "the challenge" if got == der
                                else "another"))
    return took


class Prober(threading.Thread):
    """Probes one after the other, every `every` seconds, until stopped
    (at most `limit` rounds): each probe is a (name, function) whose
    function returns the seconds it took or raises."""

    def __init__(self, probes, every=0.15, limit=2000):
        super().__init__(daemon=True)
        self.probes, self.every, self.limit = probes, every, limit
        self.results = {name: [] for name, _ in probes}
        self.errors = []
        self.stop_ev = threading.Event()
        self.rounds = 0

    def run(self):
        while not self.stop_ev.is_set() and self.rounds < self.limit:
            for name, fn in self.probes:
                try:
                    self.results[name].append(fn())
                except Exception as e:      # noqa: BLE001 (recorded)
                    self.errors.append("%s: %r" % (name, e))
            self.rounds += 1
            self.stop_ev.wait(self.every)

    def stop(self):
        self.stop_ev.set()
        self.join(30)

    def stats(self, name):
        xs = sorted(self.results[name])
        if not xs:
            return None
        return {"n": len(xs), "p50": xs[len(xs) // 2] * 1000,
                "p90": xs[len(xs) * 9 // 10] * 1000, "max": xs[-1] * 1000}


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]
