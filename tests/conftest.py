"""Shared pytest fixtures and helpers for the alpnd test suites.

Import the helpers with ``from conftest import ...`` (pytest puts tests/ on
sys.path); the fixtures are available to every tests/test_*.py by name.

Paths
  ROOT               the repository
  BUILD              where the binaries under test are: ROOT, or ROOT/build/asan
                     when ALPND_BUILD=asan
  ALPND, RESPOND     BUILD/alpnd, BUILD/alpnd-respond (ALPND_BIN=path
                     overrides ALPND, e.g. to test another build of it)
  PY                 /usr/bin/python3 (Debian's, with pytest)

Helpers (plain functions)
  free_port(family=AF_INET)          an ephemeral TCP port, free right now
  wait_port(port, host, timeout)     until connect() succeeds (readiness)
  wait_for(pred, timeout, what)      poll a predicate, fail with `what`
  wait_log(path, regex, timeout)     until a file has a line matching regex;
                                     returns the re.Match
  client_hello(sni, alpn)            bytes of a real ClientHello made by
                                     Python's ssl (MemoryBIO), nothing sent
  sha256(bytes)                      hex digest
  LOG_RE                             regex for alpnd's per-connection line:
      alpnd[PID]: client sni alpn route bytes-up bytes-down duration result
    groups: pid client sni alpn route up down secs result
  parse_logs(text)                   list of dicts from LOG_RE matches

Fixtures
  procs        Procs(): start(argv, **popen) -> Popen in its own session;
               every process is killed (by its process group id) and reaped
               at teardown, even when the test fails.  procs.log(name) gives
               a fresh log path under tmp_path.
  tls_cert     (cert_path, key_path): self-signed EC P-256 for "localhost",
               SANs localhost/127.0.0.1/::1, generated once per session.
  nginx        factory: nginx(proxy_protocol=False, unix=False, ipv6=False)
               -> Nginx with .port, .url, .unix_path (unix=True), .access_log,
               .addr ("127.0.0.1:PORT" for --fallback); serves HTTPS with
               HTTP/2, GET / answers "hello from nginx\n", /big 1 MiB; the
               access log line is "$remote_addr $server_protocol $status"
               ($remote_addr is the PROXY client with proxy_protocol=True).
  echo_backend factory: echo_backend(mode="echo"|"record", family=AF_INET,
               unix=False, reply=b"") -> Backend with .addr (ADDR for
               alpnd), .port, .conns (list of Record: .data bytes received,
               .eof (peer half-closed), .closed), wait_conns(n).  "echo"
               sends everything back and half-closes after the peer's EOF;
               "record" keeps what it gets, sends `reply` then half-closes
               when the peer half-closes; "early" sends `reply` and
               half-closes at once, then keeps reading until EOF.
  inetd        factory: inetd(args, family=AF_INET, env=None, unix_path=None)
               -> Inetd: a Python listener (TCP, or unix_path) that accepts
               and runs ALPND args with stdin = the accepted socket (stdout
               /dev/null, stderr captured) - the inetd contract.  .port,
               .results (list of Result: .rc, .stderr), wait_results(n).
  activate     factory: activate(args, mode="inetd"|"fds"|"listen",
               host="127.0.0.1") -> Activated: runs ALPND under
               systemd-socket-activate: "inetd" = --accept --inetd (fd 0),
               "fds" = --accept (LISTEN_FDS, fd 3), "listen" = no --accept
               (listening-socket mode); prefix=[...] runs it under a
               wrapper (e.g. prlimit).  .port, .log (path of the combined
               stderr), .lines() (alpnd log lines parsed), .proc.
  alpnd_cmd    function: alpnd_cmd(*args) -> [ALPND, *args]
"""
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "asan") \
    if os.environ.get("ALPND_BUILD") == "asan" else ROOT
ALPND = os.environ.get("ALPND_BIN") or os.path.join(BUILD, "alpnd")
RESPOND = os.path.join(BUILD, "alpnd-respond")
PY = "/usr/bin/python3"

LOG_RE = re.compile(
    r"alpnd\[(?P<pid>\d+)\]: (?P<client>\S+) (?P<sni>\S+) (?P<alpn>\S+) "
    r"(?P<route>\S+) (?P<up>\d+) (?P<down>\d+) (?P<secs>[0-9.]+)s "
    r"(?P<result>.*)$", re.M)


def parse_logs(text):
    return [m.groupdict() for m in LOG_RE.finditer(text)]


# Listening mode sums up clean relays to the fallback (alpnd.8, Logging).
RELAYED_RE = re.compile(
    r"alpnd\[(?P<pid>\d+)\]: in the last (?P<secs>\d+) s: (?P<n>\d+) connections relayed "
    r"to the fallback \((?P<resets>\d+) ended in a reset\), (?P<up>\d+) bytes up, "
    r"(?P<down>\d+) down$", re.M)


def relayed_sums(text):
    """The summary lines of clean relays: dicts of pid, secs, n, resets, up,
    down (ints but pid)."""
    return [dict(m.groupdict(), **{k: int(m.group(k)) for k in
                                   ("secs", "n", "resets", "up", "down")})
            for m in RELAYED_RE.finditer(text)]


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def free_port(family=socket.AF_INET):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    delay = 0.002
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("timed out after %.1fs waiting for %s"
                                 % (timeout, what))
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_port(port, host="127.0.0.1", timeout=10.0):
    def up():
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(up, timeout, "%s:%d to accept connections" % (host, port))


def wait_log(path, regex, timeout=10.0):
    rx = re.compile(regex, re.M)

    def found():
        try:
            with open(path, errors="replace") as f:
                return rx.search(f.read())
        except FileNotFoundError:
            return None
    return wait_for(found, timeout, "/%s/ in %s" % (regex, path))


def client_hello(sni="example.test", alpn=("h2", "http/1.1")):
    """A ClientHello from Python's ssl, as the bytes it would send."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def alpnd_cmd(*args):
    return [ALPND] + [str(a) for a in args]


# --- processes -------------------------------------------------------------

class Procs:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.n = 0

    def log(self, name="proc"):
        self.n += 1
        return os.path.join(str(self.tmp), "%s.%d.log" % (name, self.n))

    def start(self, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen([str(a) for a in argv], **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=5):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        else:
            # The leader is gone; its group may live on (e.g. spawned alpnd).
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self):
        for p in reversed(self.procs):
            self.stop(p)


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.close()


# --- TLS material ----------------------------------------------------------

@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tlscert")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
         "-days", "2", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
        check=True, capture_output=True, timeout=30)
    os.chmod(key, 0o644)
    os.chmod(str(d), 0o755)
    return cert, key


# --- nginx -----------------------------------------------------------------

class Nginx:
    pass


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format combined_pp '$remote_addr $server_protocol $status';
    access_log {dir}/access.log combined_pp;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        {listen}
        {realip}
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = / {{ return 200 "hello from nginx\\n"; }}
        location = /big {{ alias {dir}/big; }}
    }}
}}
"""


@pytest.fixture
def nginx(procs, tmp_path, tls_cert):
    made = []

    def start(proxy_protocol=False, unix=False, ipv6=False):
        d = tmp_path / ("nginx%d" % len(made))
        d.mkdir()
        with open(d / "big", "wb") as f:
            f.write(os.urandom(1 << 20))
        n = Nginx()
        n.dir = str(d)
        n.port = free_port(socket.AF_INET6 if ipv6 else socket.AF_INET)
        pp = " proxy_protocol" if proxy_protocol else ""
        host = "[::1]" if ipv6 else "127.0.0.1"
        if unix:
            n.unix_path = str(d / "https.sock")
            listen = "listen unix:%s ssl http2%s;" % (n.unix_path, pp)
            n.addr = "unix:" + n.unix_path
        else:
            n.unix_path = None
            listen = "listen %s:%d ssl http2%s;" % (host, n.port, pp)
            n.addr = "%s:%d" % (host, n.port)
        n.url = "https://localhost:%d/" % n.port
        n.access_log = str(d / "access.log")
        # With PROXY protocol, $remote_addr becomes the proxied client.
        realip = ("set_real_ip_from 127.0.0.0/8; set_real_ip_from ::1; "
                  "set_real_ip_from unix:; real_ip_header proxy_protocol;"
                  if proxy_protocol else "")
        conf = NGINX_CONF.format(dir=d, listen=listen, cert=tls_cert[0],
                                 key=tls_cert[1], realip=realip)
        (d / "nginx.conf").write_text(conf)
        n.proc = procs.start(["nginx", "-e", str(d / "error.log"), "-p",
                              str(d), "-c", str(d / "nginx.conf")],
                             stderr=open(str(d / "stderr.log"), "w"))
        if unix:
            wait_for(lambda: os.path.exists(n.unix_path), 10,
                     "nginx unix socket")
        else:
            wait_port(n.port, host.strip("[]"))
        made.append(n)
        return n
    return start


# --- echo / recording backends ---------------------------------------------

class Record:
    def __init__(self):
        self.data = bytearray()
        self.eof = False
        self.closed = False
        self.peer = None


class Backend:
    def __init__(self, mode, family, unix_path, reply):
        self.mode = mode
        self.reply = reply
        self.conns = []
        self.lock = threading.Lock()
        self.stopping = False
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.addr = "unix:" + unix_path
            self.port = None
        else:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            self.sock.bind((host, 0))
            self.port = self.sock.getsockname()[1]
            self.addr = ("[%s]:%d" if family == socket.AF_INET6
                         else "%s:%d") % (host, self.port)
        self.sock.listen(512)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            r = Record()
            r.peer = peer
            with self.lock:
                self.conns.append(r)
            threading.Thread(target=self._serve, args=(c, r),
                             daemon=True).start()

    def _serve(self, c, r):
        try:
            if self.mode in ("record", "early") and self.reply:
                c.sendall(self.reply)
            if self.mode == "early":
                c.shutdown(socket.SHUT_WR)
            while True:
                b = c.recv(1 << 20)
                if not b:
                    r.eof = True
                    break
                r.data += b
                if self.mode == "echo":
                    c.sendall(b)
            if self.mode != "early":
                c.shutdown(socket.SHUT_WR)
            # Wait for the other side to close too.
            c.settimeout(30)
            while c.recv(65536):
                pass
        except OSError:
            pass
        finally:
            r.closed = True
            c.close()

    def wait_conns(self, n, timeout=10):
        wait_for(lambda: len(self.conns) >= n, timeout,
                 "%d connections at the backend" % n)
        return self.conns

    def close(self):
        self.stopping = True
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def echo_backend(tmp_path):
    made = []

    def start(mode="echo", family=socket.AF_INET, unix=False, reply=b""):
        path = str(tmp_path / ("backend%d.sock" % len(made))) if unix \
            else None
        b = Backend(mode, family, path, reply)
        made.append(b)
        return b
    yield start
    for b in made:
        b.close()


# --- inetd-style spawning ----------------------------------------------------

class Result:
    def __init__(self, rc, stderr):
        self.rc = rc
        self.stderr = stderr

    def __repr__(self):
        return "Result(rc=%r, stderr=%r)" % (self.rc, self.stderr)


class Inetd:
    def __init__(self, argv, family, env, unix_path=None):
        self.argv = argv
        self.env = env
        self.results = []
        self.procs = []
        self.lock = threading.Lock()
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.port = None
        else:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.bind(("::1" if family == socket.AF_INET6
                            else "127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        self.unix_path = unix_path
        self.sock.listen(512)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                p = subprocess.Popen(self.argv, stdin=c, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=self.env,
                                     start_new_session=True)
            except OSError as e:    # fork failed (a loaded machine): say so
                with self.lock:
                    self.results.append(Result(None, "inetd: cannot start: %r" % e))
                continue
            finally:
                c.close()
            with self.lock:
                self.procs.append(p)
            try:
                threading.Thread(target=self._reap, args=(p,),
                                 daemon=True).start()
            except RuntimeError:    # no thread to spare: reap it here
                self._reap(p)

    def _reap(self, p):
        err = p.stderr.read()
        p.stderr.close()        # or every process leaves a descriptor here
        rc = p.wait()
        with self.lock:
            self.results.append(Result(rc, err.decode(errors="replace")))

    def wait_results(self, n=1, timeout=15):
        try:
            wait_for(lambda: len(self.results) >= n, timeout,
                     "%d alpnd processes to exit" % n)
        except AssertionError as e:
            with self.lock:
                done = sum(p.poll() is not None for p in self.procs)
                started = len(self.procs)
            raise AssertionError("%s: %d started, %d exited, %d reaped with their "
                                 "stderr at EOF; still running: %s" % (
                                     e, started, done, len(self.results),
                                     self.running()[:10])) from None
        return self.results

    def running(self):
        """What the processes that have not exited are doing."""
        out = []
        with self.lock:
            live = [p for p in self.procs if p.poll() is None]
        for p in live:
            d = "/proc/%d/" % p.pid
            try:
                with open(d + "stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                with open(d + "wchan") as f:
                    wchan = f.read()
                fds = sorted(os.readlink(d + "fd/" + x) for x in os.listdir(d + "fd"))
            except OSError:
                continue
            out.append("%d %s %s %s" % (p.pid, st[0], wchan, fds))
        return out

    def close(self):
        self.stopping = True
        self.sock.close()
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)


@pytest.fixture
def inetd():
    made = []

    def start(args, family=socket.AF_INET, env=None, unix_path=None):
        i = Inetd(alpnd_cmd(*args), family, env, unix_path)
        made.append(i)
        return i
    yield start
    for i in made:
        i.close()


# --- systemd-socket-activate -------------------------------------------------

class Activated:
    def lines(self):
        with open(self.log, errors="replace") as f:
            return parse_logs(f.read())

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_lines(self, n, timeout=15):
        return wait_for(lambda: len(self.lines()) >= n and self.lines(),
                        timeout, "%d alpnd log lines in %s" % (n, self.log))


@pytest.fixture
def activate(procs):
    if shutil.which("systemd-socket-activate") is None:
        pytest.fail("systemd-socket-activate missing: run tests/deps check")

    def start(args, mode="inetd", host="127.0.0.1", env=None, prefix=()):
        a = Activated()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        a.port = free_port(fam)
        a.host = host
        listen = ("[%s]:%d" if fam == socket.AF_INET6 else "%s:%d") \
            % (host, a.port)
        argv = list(prefix) + ["systemd-socket-activate", "-l", listen]
        if mode == "inetd":
            argv += ["--accept", "--inetd"]
        elif mode == "fds":
            argv += ["--accept"]
        elif mode != "listen":
            raise ValueError(mode)
        for k, v in (env or {}).items():
            argv += ["-E", "%s=%s" % (k, v)]
        argv += alpnd_cmd(*args)
        a.log = procs.log("activate")
        a.proc = procs.start(argv, stderr=open(a.log, "w"),
                             stdout=subprocess.DEVNULL)
        wait_log(a.log, r"^Listening on ")
        return a
    return start
