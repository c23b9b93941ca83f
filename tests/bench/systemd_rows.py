"""tests/bench/systemd_rows.py - the rows of `make bench` under a real systemd.

Imported by tests/bench/run.  A systemd machine is booted with
systemd-nspawn by tests/test_deploy.py's `Container` (the host's /usr, a
copy of its /etc, `make install` output in /usr/local and /etc), and in it:

  direct    nginx (the bench's backend configuration) as a transient
            service, on 0.0.0.0:8443; the client talks to it itself
  nginx     nginx stream + ssl_preread (conf/nginx-stream.conf) as a
            transient service on :9443, relaying to 127.0.0.1:8443
  listen    alpnd's listening-socket units as installed (Accept=no)
  perconn   alpnd's per-connection units as installed (Accept=yes)

both alpnd pairs on port 443 (they conflict: the one measured is started,
which stops the other), with --fallback 127.0.0.1:8443 in
/etc/default/alpnd.  The client (tlsload) runs outside the machine, in the
network namespace of the host side of its veth, as Container.host() does.

CPU per connection, from the host:
  relay     the target's processes (its units' cgroups in the machine's
            name=systemd (v1) or unified (v2) hierarchy, the schedstat of
            each of their threads: nanoseconds, where /proc/PID/stat
            counts 10 ms ticks)
            plus what PID 1 reaped (cutime+cstime of the machine's PID 1:
            every per-connection alpnd, including the unit's set-up in the
            forked child before execve)
  pid1      the machine's PID 1 itself (utime+stime)
  machine   the whole machine: a cpuacct (v1) / cpu (v2) cgroup the
            nspawn process is put in before it boots (backend, journald,
            PID 1 and the relay)
"""

import os
import pathlib
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import test_deploy as td  # noqa: E402  (Container, Procs, run)

CT_ADDR = "10.205.0.2"        # the machine's side of the veth (test_deploy)
BACKEND_PORT = 8443
STREAM_PORT = 9443
RELAY_PORT = 443
WORK = "/var/lib/alpnd-bench"  # inside the machine
TCK = os.sysconf("SC_CLK_TCK")
NAMES = ["direct", "nginx", "listen", "perconn"]
# A variant of the listening units (other options, another build), on its
# own port, measured in the same rounds: BENCH_SYSTEMD_VARIANT
VARIANT = "listen2"
VARIANT_PORT = 1443
VARIANT_STEM = "alpnd-bench-variant"
# alpnd listening and nginx stream differ by a few per cent: rounds go on
# (up to a maximum) until their per-round ratio is known to +-PRECISION
PRECISION = 0.03
# the row under systemd-socket-activate that each row is shown beside
SSA_TWIN = {"direct": "direct", "nginx": "nginx", "listen": "alpnd-listen",
            "perconn": "alpnd", VARIANT: None}


def log(*a):
    print("bench (systemd):", *a, file=sys.stderr, flush=True)


def missing():
    """Why the machine cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    for tool in ("systemd-nspawn", "nsenter", "unshare", "ip", "nginx"):
        if shutil.which(tool) is None:
            return "%s is not installed" % tool
    if not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        return "nginx's stream module is not installed (libnginx-mod-stream)"
    return None


def stat_ticks(pid):
    """(utime, stime, cutime, cstime) of pid, in seconds, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except OSError:
        return None
    fs = st[st.rindex(")") + 2:].split()
    return tuple(int(x) / TCK for x in fs[11:15])


def run_ns(pid):
    """CPU time of every thread of pid so far, in seconds, from schedstat
    (nanoseconds; /proc/PID/stat counts in ticks of 10 ms, too coarse for
    a second of a relay), or None."""
    total, seen = 0, False
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    for t in tids:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
                total += int(f.read().split()[0])
                seen = True
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9 if seen else None


def unit_files(dest):
    """The installed socket units on port 443: {"listen": (socket,
    service), "perconn": (socket, service template)}, whatever they are
    called (Accept= decides)."""
    d = dest / "etc/systemd/system"
    out = {}
    for p in sorted(d.glob("*.socket")):
        ent = dict((k, v) for sec, k, v in td.unit_entries(p) if sec == "Socket")
        if ent.get("ListenStream") != "443":
            continue
        stem = p.name[:-len(".socket")]
        if ent.get("Accept", "no") in ("yes", "true", "1", "on"):
            out["perconn"] = (p.name, stem + "@.service")
        else:
            out["listen"] = (p.name, ent.get("Service", stem + ".service"))
    return out


class CgProcs(td.Procs):
    """test_deploy's Procs; every process it starts enters our cgroups
    first, so the machine (nspawn and all it starts) is accounted there."""

    def __init__(self, procs_files):
        super().__init__()
        self.files = procs_files

    def start(self, cmd, **kw):
        files = self.files

        def enter():
            for pf in files:
                with open(pf, "w") as f:
                    f.write(str(os.getpid()))
        kw.setdefault("preexec_fn", enter)
        return super().start(cmd, **kw)


def add_variant(dest, units, args, binary):
    """Copies of the installed listening units under another name, on
    VARIANT_PORT, with their own options file (/etc/default/<stem>: the
    same options plus args) and, given a binary, their own alpnd."""
    d = dest / "etc/systemd/system"
    sock, svc = units["listen"]
    st = (d / sock).read_text().replace("ListenStream=443", "ListenStream=%d" % VARIANT_PORT)
    # not in conflict with the units on port 443: both run
    st = "\n".join(l for l in st.splitlines()
                   if not l.startswith(("Conflicts=", "After=", "WantedBy="))) + "\n"
    if "ListenStream=%d" % VARIANT_PORT not in st:
        raise RuntimeError("%s: no ListenStream=443 to move" % sock)
    (d / (VARIANT_STEM + ".socket")).write_text(st)
    sv = (d / svc).read_text().replace(sock, VARIANT_STEM + ".socket")
    sv = sv.replace("/default/alpnd\n", "/default/%s\n" % VARIANT_STEM)
    if binary:
        shutil.copy(binary, dest / "usr/local/sbin" / VARIANT_STEM)
        sv = "\n".join(l.replace("sbin/alpnd ", "sbin/%s " % VARIANT_STEM)
                       if l.startswith(("ExecStart=", "ExecReload=")) else l
                       for l in sv.splitlines()) + "\n"
    (d / (VARIANT_STEM + ".service")).write_text(sv)
    opts = (dest / "etc/default/alpnd").read_text().replace(
        'ALPND_OPTS="', 'ALPND_OPTS="%s' % "".join(a + " " for a in args))
    (dest / "etc/default" / VARIANT_STEM).write_text(opts)


class Machine:
    def __init__(self, cgs, cg_dirs, workdir, alpnd_args, alpnd=None, variant=None):
        self.cgs, self.cg = cgs, cg_dirs
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="alpnd-bench-ct."))
        self.ct = None
        self.own_cgs = []
        files = [os.path.join(d, "cgroup.procs") for d in (cg_dirs or {}).values()]
        if os.path.isdir("/sys/fs/cgroup/systemd") and \
                not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            # v1: nspawn makes "payload" in its own name=systemd group; a
            # group of ours keeps it apart from any other machine.
            d = "/sys/fs/cgroup/systemd/alpnd-bench.%d" % os.getpid()
            os.mkdir(d)
            self.own_cgs.append(d)
            files.append(os.path.join(d, "cgroup.procs"))
        self.procs = CgProcs(files)
        dest = self.tmp / "dest"
        td.run(["make", "-s"] + td.NO_REBUILD + ["install", "DESTDIR=%s" % dest,
               "SYSTEMDUNITDIR=/etc/systemd/system", "PREFIX=/usr/local"],
               cwd=ROOT, timeout=120)
        if alpnd and os.path.realpath(alpnd) != os.path.realpath(td.ALPND):
            shutil.copy(alpnd, dest / "usr/local/sbin/alpnd")   # another build
        self.units = unit_files(dest)
        for k in ("listen", "perconn"):
            if k not in self.units:
                raise RuntimeError("no installed %s socket unit on port 443 in %s"
                                   % (k, sorted(os.listdir(dest / "etc/systemd/system"))))
        # the options every alpnd row uses: no PROXY header (the backend
        # is the bench's, as for direct and nginx stream); exit-idle long
        # enough that no measurement sees a restart
        (dest / "etc/default/alpnd").write_text(
            'ALPND_OPTS="%s--fallback 127.0.0.1:%d --certs '
            '/var/lib/dehydrated/alpn-certs"\nALPND_EXIT_IDLE=3600\n'
            % ("".join(a + " " for a in alpnd_args), BACKEND_PORT))
        self.variant = variant
        if variant:
            add_variant(dest, self.units, variant.get("args", []), variant.get("binary"))
            self.units[VARIANT] = (VARIANT_STEM + ".socket", VARIANT_STEM + ".service")
        t0 = time.monotonic()
        self.ct = td.Container(self.tmp, self.procs, dest)
        log("machine booted in %.1f s (PID 1 = %d)" % (time.monotonic() - t0, self.ct.pid))
        self.unit_root = self._unit_root()
        self._setup(workdir)
        self.active = None
        self.variant_on = False

    def _unit_root(self):
        """The host directory of the machine's cgroup tree (its units)."""
        with open("/proc/%d/cgroup" % self.ct.pid) as f:
            lines = [l.rstrip("\n").split(":", 2) for l in f]
        for _, ctrl, path in lines:
            if ctrl == "name=systemd" and os.path.isdir("/sys/fs/cgroup/systemd"):
                base = "/sys/fs/cgroup/systemd"
                break
        else:
            base = "/sys/fs/cgroup/unified" \
                if os.path.isdir("/sys/fs/cgroup/unified") and \
                not os.path.exists("/sys/fs/cgroup/cgroup.controllers") \
                else "/sys/fs/cgroup"
            path = [p for _, c, p in lines if c == ""][0]
        if path.endswith("/init.scope"):
            path = path[:-len("/init.scope")]
        return base + path

    def _setup(self, workdir):
        root = self.ct.root
        w = root / WORK.lstrip("/")
        for d in ("www", "tmp-body", "tmp-proxy", "tmp-fcgi", "tmp-uwsgi", "tmp-scgi"):
            (w / d).mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)
        shutil.copy(os.path.join(workdir, "www", "small"), w / "www" / "small")
        for f in ("cert.pem", "key.pem"):
            shutil.copy(os.path.join(workdir, f), w / f)

        def conf(template, **kv):
            s = open(os.path.join(HERE, "conf", template)).read()
            # listen on every address of the machine, not only loopback
            s = s.replace("listen 127.0.0.1:@PORT@", "listen @PORT@")
            for k, v in kv.items():
                s = s.replace("@%s@" % k, str(v))
            return s
        (w / "backend.conf").write_text(conf("backend-nginx.conf", DIR=WORK,
                                             PORT=BACKEND_PORT))
        (w / "stream.conf").write_text(conf(
            "nginx-stream.conf", DIR=WORK, NAME="stream", PORT=STREAM_PORT,
            ACME=8444, UPADDR="127.0.0.1:%d" % BACKEND_PORT))
        self.ct.sh(r"""
set -e
systemd-sysusers alpnd.conf
systemd-tmpfiles --create alpnd.conf
systemd-run -q --unit=bench-backend nginx -p {w} -e {w}/backend-error.log -c {w}/backend.conf
systemd-run -q --unit=bench-nginx-stream nginx -p {w} -e {w}/stream-error.log -c {w}/stream.conf
""".format(w=WORK))
        for port in (BACKEND_PORT, STREAM_PORT):
            self.wait_listen(port)

    def wait_listen(self, port, timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ct.sh("ss -Hltn 'sport = :%d'" % port, check=False).stdout.strip():
                return
            time.sleep(0.1)
        raise RuntimeError("nothing listens on port %d in the machine: %s" % (
            port, self.ct.sh("journalctl --no-pager -n 20", check=False).stdout))

    # --------------------------------------------------------- targets

    def port(self, name):
        return {"direct": BACKEND_PORT, "nginx": STREAM_PORT,
                VARIANT: VARIANT_PORT}.get(name, RELAY_PORT)

    def activate(self, name, warm, force=False):
        """Start the target's socket unit (the other alpnd socket stops:
        Conflicts=), then one short run through it (starts the
        listening service); that run only after a start, or with force."""
        if name in ("listen", "perconn") and self.active != name:
            sock = self.units[name][0]
            self.ct.sh("systemctl start %s" % sock)
            self.active = name
            self.wait_listen(RELAY_PORT)
            force = True
        if name == VARIANT and not self.variant_on:
            self.ct.sh("systemctl start %s" % self.units[VARIANT][0])
            self.variant_on = True
            self.wait_listen(VARIANT_PORT)
            force = True
        return warm(self.port(name)) if force else None

    def _unit_dirs(self, name):
        if name == "nginx":
            want = lambda b: b == "bench-nginx-stream.service"
        elif name in ("listen", VARIANT):
            svc = self.units[name][1]
            want = lambda b: b == svc
        elif name == "journald":
            want = lambda b: b == "systemd-journald.service"
        elif name == "perconn":
            pre = self.units["perconn"][1][:-len(".service")]   # "alpnd@"
            want = lambda b: b.startswith(pre)
        else:
            return []
        out = []
        for dp, dns, _ in os.walk(os.path.join(self.unit_root, "system.slice")):
            for d in dns:
                if want(d):
                    out.append(os.path.join(dp, d))
        return out

    def pids(self, name):
        """The processes of the target's units."""
        pids = set()
        for d in self._unit_dirs(name):
            for dp, _, fs in os.walk(d):
                if "cgroup.procs" in fs:
                    try:
                        with open(os.path.join(dp, "cgroup.procs")) as f:
                            pids.update(int(x) for x in f.read().split())
                    except OSError:
                        pass
        return pids

    def _run(self, name):
        total = 0.0
        for p in self.pids(name):
            t = run_ns(p)
            if t is None:
                t = stat_ticks(p)
                t = t[0] + t[1] if t else 0.0
            total += t
        return total

    def cpu(self, name):
        """(relay, pid1, machine, journald) CPU seconds so far."""
        relay = self._run(name)
        p1 = stat_ticks(self.ct.pid)
        relay += p1[2] + p1[3]
        return relay, p1[0] + p1[1], self.cgs.cpu(self.cg), self._run("journald")

    def client_prefix(self):
        return ["ip", "netns", "exec", self.ct.ns]

    def close(self):
        if self.ct is not None:
            self.ct.close()
        self.procs.close()
        for base in self.own_cgs:
            for dp, dns, _ in sorted(os.walk(base, topdown=False), key=lambda x: -len(x[0])):
                try:
                    os.rmdir(dp)
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- the run

def round_order(live, with_perconn):
    """One round's order at one concurrency: random, except that alpnd
    listening, nginx stream (and the variant) run back to back (in a
    random order), so that their per-round ratio compares runs adjacent in
    time."""
    pair = [n for n in ("listen", "nginx", VARIANT) if n in live]
    random.shuffle(pair)
    rest = [n for n in live if n not in pair and (with_perconn or n != "perconn")]
    slots = rest + ["pair"]
    random.shuffle(slots)
    out = []
    for n in slots:
        out += pair if n == "pair" else [n]
    return out


def measure(cgs, workdir, client, concs, rounds, secs, warmup, alpnd_args, alpnd=None,
            perconn_rounds=None, max_rounds=None, precision=PRECISION, variant=None):
    """Boot, measure, stop.  client(args, prefix) -> tlsload's result
    (run_client of tests/bench/run).  perconn_rounds: in how many of the
    rounds the per-connection units run (None: all; they are slow and
    costly, and far from the others).  After `rounds` rounds, more (up to
    max_rounds) while alpnd listening against nginx stream is not yet
    known to +-precision on every row (see pair_stats).  Returns the raw
    results, or {"error": why}.  variant: {"args": [...], "binary": path
    or None, "label": text}: a copy of the listening units with these
    options / this alpnd, on its own port, as row VARIANT."""
    why = missing()
    if why:
        return {"error": why}
    cg = cgs.make("machine") if cgs.kind else None
    m = None
    try:
        m = Machine(cgs, cg, workdir, alpnd_args, alpnd, variant)
        names = NAMES + ([VARIANT] if variant else [])
        pre = m.client_prefix()
        base = ["-a", CT_ADDR]

        def warm(port):
            r = {}
            for _ in range(3):
                r = client(["rate"] + base + ["-p", str(port), "-c", "1", "-d", "0.3",
                                              "-w", "0"], 30, pre)
                if r.get("rc") == 0 and r.get("conns"):
                    return None
                time.sleep(0.3)
            return "smoke test failed: %s" % r

        raw = {n: {"rate": {c: [] for c in concs}} for n in names}
        broken = {}
        for n in names:
            broken[n] = m.activate(n, warm, force=True)
            if broken[n]:
                log("%s: %s" % (n, broken[n]))
        if broken["direct"]:
            return {"error": "direct: " + broken["direct"], "units": m.units}
        live = [n for n in names if not broken[n]]
        procs = {}
        rnd = 0
        while rnd < rounds or (max_rounds and rnd < max_rounds and
                               not precise(raw, concs, precision)):
            log("round %d (%d to %s)" % (rnd + 1, rounds, max_rounds or rounds))
            for c in concs:
                for n in round_order(live, perconn_rounds is None or rnd < perconn_rounds):
                    bad = m.activate(n, warm)
                    if bad:
                        raw[n]["rate"][c].append({"rc": 1, "error": bad, "round": rnd})
                        continue
                    c0 = m.cpu(n)
                    r = client(["rate"] + base + ["-p", str(m.port(n)), "-c", str(c),
                                                  "-d", str(secs), "-w", str(warmup)],
                               secs + warmup + 120, pre)
                    c1 = m.cpu(n)
                    if n in ("nginx", "listen", VARIANT):
                        k = len(m.pids(n))
                        procs.setdefault(n, {})[k] = procs.get(n, {}).get(k, 0) + 1
                    r["round"] = rnd
                    tot = r.get("total")
                    if tot:
                        r["client_cpu_us_per_conn"] = r["client_cpu_s"] / tot * 1e6
                        r["relay_cpu_us_per_conn"] = 0.0 if n == "direct" else \
                            (c1[0] - c0[0]) / tot * 1e6
                        r["pid1_cpu_us_per_conn"] = (c1[1] - c0[1]) / tot * 1e6
                        if c0[2] is not None and c1[2] is not None:
                            r["machine_cpu_us_per_conn"] = (c1[2] - c0[2]) / tot * 1e6
                        r["journald_cpu_us_per_conn"] = (c1[3] - c0[3]) / tot * 1e6
                    raw[n]["rate"][c].append(r)
            rnd += 1
        return {"raw": raw, "broken": broken, "units": m.units,
                "variant": variant,
                # nginx: a master and its workers (worker_processes auto:
                # one per CPU); alpnd listening: one process
                # the count seen after most measurements
                "procs": {n: max(v, key=v.get) for n, v in procs.items()},
                "cgroups": cgs.kind, "unit_root": m.unit_root}
    except Exception as e:   # reported in the table, not fatal for the run
        return {"error": "%s: %s" % (type(e).__name__, str(e)[-800:])}
    finally:
        if m is not None:
            m.close()


def pair_stats(xs, ys, key, sign=1):
    """alpnd listening (xs) against nginx stream (ys), run back to back in
    each round: the ratio of key round by round, as (median, low, high,
    rounds alpnd was ahead, rounds); low..high is a distribution-free ~95%
    interval of the median (order statistics, the sign test's binomial):
    a round hit by someone else's load burst moves it by one rank, not by
    its size.  sign 1: higher is ahead.  None with fewer than 3 rounds."""
    by = dict((y.get("round", i), y) for i, y in enumerate(ys) if y.get("rc") == 0)
    rs = []
    for i, x in enumerate(xs):
        y = by.get(x.get("round", i))
        if x.get("rc") == 0 and y is not None and x.get(key) and y.get(key):
            rs.append(x[key] / y[key])
    n = len(rs)
    if n < 3:
        return None
    rs.sort()
    # the largest k with P(Binomial(n, 1/2) < k) <= 2.5%: [r(k), r(n-k+1)]
    k, below = 1, 0.0
    while True:
        below += math.comb(n, k - 1) / 2 ** n
        if below > 0.025:
            break
        k += 1
    k = max(k - 1, 1)
    return (statistics.median(rs), rs[k - 1], rs[n - k],
            sum(1 for r in rs if (r - 1) * sign > 0), n)


def spread(st):
    """The interval's larger distance from the median, relative."""
    return max(st[2] / st[0] - 1, 1 - st[1] / st[0])


def precise(raw, concs, precision):
    """Is every listen/nginx row (conn/s at each concurrency, relay CPU
    at c=8) known to +-precision?"""
    ln, ng = raw["listen"]["rate"], raw["nginx"]["rate"]
    for c in concs:
        for key in ("rate",) + (("relay_cpu_us_per_conn",) if c == 8 else ()):
            st = pair_stats(ln[c], ng[c], key)
            if st is None or spread(st) > precision:
                return False
    return True


def rounds_done(res):
    """How many rounds ran (for the report's header)."""
    try:
        return 1 + max(x.get("round", 0) for x in res["raw"]["direct"]["rate"][1])
    except (KeyError, ValueError):
        return "-"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(res, concs):
    if "raw" not in res:
        return {}
    raw, S = res["raw"], {}
    d = raw["direct"]

    def paired(xs, ys, f):
        """f(x, y) of the results of the same round (both good)."""
        by = dict((y.get("round", i), y) for i, y in enumerate(ys) if y.get("rc") == 0)
        out = []
        for i, x in enumerate(xs):
            y = by.get(x.get("round", i))
            if x.get("rc") == 0 and y is not None:
                v = f(x, y)
                if v is not None:
                    out.append(v)
        return out

    def rate_ratio(a, b):
        return a["rate"] / b["rate"] if a.get("rate") and b.get("rate") else None
    for n in [n for n in NAMES + [VARIANT] if n in raw]:
        r = raw[n]
        s = {"broken": res["broken"].get(n)}
        for c in concs:
            ok = [x for x in r["rate"][c] if x.get("rc") == 0]
            rr = paired(r["rate"][c], d["rate"][c], rate_ratio)
            s["rate_c%d" % c] = med([x.get("rate") for x in ok])
            s["rate_ratio_c%d" % c] = med(rr)
            s["rate_ratios_c%d" % c] = rr
            s["rate_ratio_c%d_min" % c] = min(rr) if rr else None
            s["rate_ratio_c%d_max" % c] = max(rr) if rr else None
            s["errors_c%d" % c] = sum(x.get("errors", 0) or 0 for x in r["rate"][c])
            for k in ("relay", "pid1", "machine", "client", "journald"):
                s["%s_us_c%d" % (k, c)] = med([x.get("%s_cpu_us_per_conn" % k) for x in ok])
        mine = [x.get("p50_us") for x in r["rate"][1] if x.get("rc") == 0]
        add = paired(r["rate"][1], d["rate"][1],
                     lambda a, b: a["p50_us"] - b["p50_us"]
                     if a.get("p50_us") is not None and b.get("p50_us") is not None else None)
        s["p50_us"] = med(mine)
        s["p50_added_us"] = med(add)
        S[n] = s
    # alpnd listening against nginx stream, round by round (they run back
    # to back): conn/s ratio and relay CPU ratio (pair_stats)
    if "listen" in S and "nginx" in S:
        ln, ng = raw["listen"]["rate"], raw["nginx"]["rate"]
        for c in concs:
            S["listen"]["vs_nginx_rate_c%d" % c] = pair_stats(ln[c], ng[c], "rate")
            S["listen"]["vs_nginx_cpu_c%d" % c] = pair_stats(
                ln[c], ng[c], "relay_cpu_us_per_conn", -1)
            for k in ("machine",):
                S["listen"]["vs_nginx_%s_c%d" % (k, c)] = pair_stats(
                    ln[c], ng[c], "%s_cpu_us_per_conn" % k, -1)
    # the variant against alpnd listening as installed, and against nginx
    if VARIANT in S and "listen" in S:
        v, ln, ng = raw[VARIANT]["rate"], raw["listen"]["rate"], raw["nginx"]["rate"]
        for c in concs:
            for other, rr in (("listen", ln), ("nginx", ng)):
                S[VARIANT]["vs_%s_rate_c%d" % (other, c)] = pair_stats(v[c], rr[c], "rate")
                for k in ("relay", "machine"):
                    S[VARIANT]["vs_%s_%s_c%d" % (other, k, c)] = pair_stats(
                        v[c], rr[c], "%s_cpu_us_per_conn" % k, -1)
    return S


def labels(res):
    u = res.get("units", {})
    v = res.get("variant") or {}
    return {VARIANT: "variant: %s" % v.get("label", "?"),
            "direct": "direct (nginx in the machine)",
            "nginx": "nginx stream ssl_preread (unit)",
            "listen": "alpnd listening: %s" % (u["listen"][0] if "listen" in u else "?"),
            "perconn": "alpnd per conn: %s" % (u["perconn"][0] if "perconn" in u else "?")}


def report(res, S, host_S, concs, fmt_r):
    out = ["", "Under a real systemd: a machine booted with systemd-nspawn (tests/test_deploy.py's "
           "Container), the client outside it (its veth's namespace)."]
    if "error" in res:
        out.append("  not measured: %s" % res["error"])
        return "\n".join(out)
    out.append("Units as installed by make install (alpnd: --fallback 127.0.0.1:%d, "
               "ALPND_EXIT_IDLE=3600); ratios to direct in the machine, per round, median "
               "of %s rounds;" % (BACKEND_PORT, rounds_done(res)))
    out.append("[s-s-a: the same relay's ratio under systemd-socket-activate on the host, "
               "same run].  CPU us per connection at c=8:")
    out.append("relay = the target's processes + what PID 1 reaped; PID 1 = the machine's "
               "systemd itself; machine = the whole machine's cgroup (backend, journald, ...);")
    out.append("journald = systemd-journald (alpnd listening: a summary line per 10 s for "
               "clean relays, a line each with -v; per connection: a line each; nginx stream "
               "logs none by default).")
    pr = res.get("procs", {})
    if pr.get("nginx"):
        out.append("Processes: nginx stream %d (a master and %d workers: worker_processes auto, "
                   "one per CPU; %d CPUs here), alpnd listening %d." % (
                       pr["nginx"], pr["nginx"] - 1, os.cpu_count(), pr.get("listen", 0)))
    lab = labels(res)
    w = max(len(v) for v in lab.values()) + 1
    hdr = "%-*s" % (w, "target")
    for c in concs:
        hdr += "  c=%-2d conn/s ratio [s-s-a]" % c
    out.append(hdr + "  p50 added  relay  PID 1  machine  journald")
    for n in [n for n in NAMES + [VARIANT] if n in S]:
        s = S[n]
        line = "%-*s" % (w, lab[n])
        if s.get("broken"):
            out.append(line + "  n/a: " + s["broken"])
            continue
        twin = host_S.get(SSA_TWIN[n], {}) if SSA_TWIN[n] else {}
        for c in concs:
            line += "  %6.0f/s %s [%s]" % (s["rate_c%d" % c] or 0, fmt_r(s["rate_ratio_c%d" % c]),
                                           fmt_r(twin.get("rate_ratio_c%d" % c)).strip())
            if s["errors_c%d" % c]:
                line += "!"
        f = lambda v: "-" if v is None else "%.0f" % v
        line += "  %+7s us  %5s  %5s  %7s  %8s" % (
            f(s["p50_added_us"]), f(s["relay_us_c8"]), f(s["pid1_us_c8"]),
            f(s["machine_us_c8"]), f(s["journald_us_c8"]))
        out.append(line)
    if "listen" in S and not S["listen"].get("broken"):
        out.append("alpnd listening / nginx stream, round by round (back to back): median "
                   "[~95% interval], rounds alpnd ahead:")
        out += pair_lines(S["listen"], "nginx", concs)
    if VARIANT in S and not S[VARIANT].get("broken"):
        for other in ("listen", "nginx"):
            out.append("variant / %s, round by round:" % labels(res)[other])
            out += pair_lines(S[VARIANT], other, concs)
    return "\n".join(out)


def pair_lines(s, other, concs):
    out = []
    for what, key, sign in (("conn/s", "rate", 1), ("relay CPU", "cpu", -1),
                            ("relay CPU", "relay", -1), ("machine CPU", "machine", -1)):
        parts = []
        for c in concs:
            st = s.get("vs_%s_%s_c%d" % (other, key, c))
            if st:
                parts.append("c=%d %.3f [%.2f-%.2f] (%d/%d)" % st_fields(c, st))
        if parts:
            out.append("  %-13s %s" % (what, "   ".join(parts)))
    return out


def verdicts(S, host_S, concs, fmt_r):
    """Listening mode ahead of nginx stream on every conn/s row and on relay
    CPU per connection, under systemd-socket-activate and under systemd.
    Under systemd, judged on the two's ratio round by round (they run
    back to back), with its interval: "within noise" when it holds 1."""
    out = []

    def mark(a, b):
        if a is None or b is None:
            return "n/a"
        return "met" if a > b else "NOT met"
    for where, SS, ln, nn, key in (("s-s-a", host_S, "alpnd-listen", "nginx", "cpu_us_conn_c%d"),
                                   ("systemd", S, "listen", "nginx", "relay_us_c%d")):
        if not SS or ln not in SS or nn not in SS:
            out.append("  [n/a] listening ahead of nginx stream under %s: not measured" % where)
            continue
        for c in concs:
            a, b = SS[ln].get("rate_ratio_c%d" % c), SS[nn].get("rate_ratio_c%d" % c)
            st = SS[ln].get("vs_nginx_rate_c%d" % c)
            out.append("  [%s] %-7s listening ahead of nginx stream, conn/s c=%-2d: %s vs %s%s"
                       % (pair_mark(st, 1) if st else mark(a, b), where, c, fmt_r(a),
                          fmt_r(b), pair_note(st, 1)))
        a, b = SS[ln].get(key % 8), SS[nn].get(key % 8)
        st = SS[ln].get("vs_nginx_cpu_c8")
        # less CPU is ahead
        out.append("  [%s] %-7s listening relay CPU per connection below nginx stream's "
                   "(c=8): %s vs %s us%s" % (
                       pair_mark(st, -1) if st else
                       mark(None if a is None else -a, None if b is None else -b),
                       where, "-" if a is None else "%.0f" % a,
                       "-" if b is None else "%.0f" % b, pair_note(st, -1)))
    return "\n".join(out)


def pair_mark(st, sign):
    ok = "met" if (st[0] - 1) * sign > 0 else "NOT met"
    if st[1] <= 1 <= st[2]:
        ok += ", within noise"
    return ok


def st_fields(c, st):
    return (c, st[0], st[1], st[2], st[3], st[4])


def pair_note(st, sign):
    """alpnd / nginx round by round (back to back): median, its interval
    and the rounds alpnd was ahead."""
    if not st:
        return ""
    return "; alpnd/nginx per round: median %.3f [%.2f-%.2f], ahead in %d of %d" % st[:5]
