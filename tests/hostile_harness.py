"""hostile_harness - run one connection through a real alpnd process.

Python listens on an ephemeral loopback port, connects a client, accepts,
and starts alpnd (or alpnd-respond) with the accepted socket as stdin:
inetd mode, one process per connection, so every connection has its own
exit status and its own stderr.  Backends are Python threads with a
scripted behaviour (record, echo, reset, close, black-hole, refuse...).

After the process exits the harness checks that nothing was left behind:
no process carrying the case's marker in its environment, the backend's
and the client's sockets see end-of-file (nobody else holds them), and,
where a test asks for it, the process's descriptor table while it ran.
"""
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK_VAR = "ALPND_HOSTILE_MARK"

EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE = 0, 64, 65, 69
EX_SOFTWARE, EX_OSERR, EX_IOERR, EX_TEMPFAIL = 70, 71, 74, 75

SANITIZER_RE = re.compile(
    r"ERROR: (Address|Leak|Memory|Thread|UndefinedBehavior)Sanitizer|"
    r"runtime error:|SUMMARY: \w+Sanitizer|==\d+==\s*(ERROR|WARNING)|"
    r"LeakSanitizer has encountered")
VALGRIND_RE = re.compile(r"^==\d+== ", re.M)


def builds():
    """name -> (alpnd, alpnd-respond, wrapper argv prefix, time factor)."""
    b = {
        "normal": (ROOT / "alpnd", ROOT / "alpnd-respond", [], 1.0),
        "asan": (ROOT / "build/asan/alpnd", ROOT / "build/asan/alpnd-respond", [], 1.5),
    }
    if os.environ.get("ALPND_VALGRIND"):
        vg = ["valgrind", "--quiet", "--error-exitcode=99", "--trace-children=yes",
              "--child-silent-after-fork=yes", "--leak-check=full",
              "--errors-for-leak-kinds=definite", "--show-leak-kinds=definite",
              "--track-origins=yes"]
        supp = ROOT / "tests/hostile_valgrind.supp"
        if supp.exists():
            vg.append("--suppressions=%s" % supp)
        # ./alpnd is static-pie: memcheck cannot see its malloc; `make
        # valgrind` builds a dynamic copy
        dyn = ROOT / "build/valgrind/alpnd"
        b["valgrind"] = (dyn if dyn.exists() else ROOT / "alpnd", ROOT / "alpnd-respond", vg, 12.0)
    return b


def sanitizer_env(env=None):
    e = dict(os.environ if env is None else env)
    e["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0"
    e["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    e.pop("LISTEN_FDS", None)
    e.pop("LISTEN_PID", None)
    e.pop("JOURNAL_STREAM", None)
    return e


def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def marked_pids(mark):
    """PIDs of live processes whose environment carries mark."""
    needle = ("%s=%s" % (MARK_VAR, mark)).encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % d, "rb") as f:
                env = f.read()
            with open("/proc/%s/stat" % d, "rb") as f:
                st = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and b") Z " not in st:
            out.append(int(d))
    return out


def fd_table(pid):
    """{fd: link target} of a live process, or None."""
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return None
    t = {}
    for fd in fds:
        try:
            t[int(fd)] = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            pass
    return t


def drain(sock, timeout):
    """Read until EOF/RST or timeout: (bytes, 'eof'|'rst'|'timeout')."""
    got = bytearray()
    end = time.monotonic() + timeout
    sock.setblocking(False)
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return bytes(got), "timeout"
        r, _, _ = select.select([sock], [], [], min(left, 0.2))
        if not r:
            continue
        try:
            b = sock.recv(262144)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(got), "rst"
        except BlockingIOError:
            continue
        except OSError:
            return bytes(got), "rst"
        if not b:
            return bytes(got), "eof"
        got += b


def set_linger0(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- backends ------------------------------------------------------------------
@dataclass
class Conn:
    data: bytearray = field(default_factory=bytearray)
    end: str = ""             # 'eof', 'rst', 'timeout', '' while open
    t_accept: float = 0.0
    t_end: float = 0.0
    fds: dict = None          # the relay's descriptor table, while relaying
    sent: int = 0


class Backend:
    """A scripted server.  behaviour:
    record      read to EOF, then send `reply` and close (default)
    echo        send back everything, half-close after EOF
    first       send `reply` at once, then read to EOF and close
    halfclose   send `reply`, shutdown(SHUT_WR), then read to EOF
    flood       send `size` bytes without reading, then read to EOF
    reset       read `after` bytes (0: none), then close with RST
    close       close as soon as accepted (reads nothing)
    blackhole   accept, then neither read nor write until torn down
    refuse      nothing listens: connect() gets ECONNREFUSED
    synblock    listen queue full: SYNs are dropped, connect() hangs
    """

    def __init__(self, behaviour="record", reply=b"", unix_dir=None, size=0,
                 after=0, host="127.0.0.1", run=None):
        self.behaviour = behaviour
        self.reply = reply
        self.size = size
        self.after = after
        self.run = run
        self.conns = []
        self.stop = threading.Event()
        self.threads = []
        self.plugs = []
        self.lsock = None
        if behaviour == "refuse":
            if unix_dir:
                self.addr = "unix:%s/refused.sock" % unix_dir
            else:
                self.addr = "%s:%d" % (host, free_port(host))
            return
        if unix_dir:
            path = "%s/be-%s.sock" % (unix_dir, uuid.uuid4().hex[:8])
            self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.lsock.bind(path)
            self.addr = "unix:" + path
        else:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.lsock = socket.socket(fam, socket.SOCK_STREAM)
            self.lsock.bind((host, 0))
            port = self.lsock.getsockname()[1]
            self.addr = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
        if behaviour == "synblock":
            self.lsock.listen(0)
            for _ in range(3):
                p = socket.socket(self.lsock.family, socket.SOCK_STREAM)
                p.setblocking(False)
                try:
                    p.connect(self.lsock.getsockname())
                except (BlockingIOError, OSError):
                    pass
                self.plugs.append(p)
            return
        self.lsock.listen(16)
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept_loop(self):
        while not self.stop.is_set():
            r, _, _ = select.select([self.lsock], [], [], 0.05)
            if not r:
                continue
            try:
                s, _ = self.lsock.accept()
            except OSError:
                continue
            c = Conn(t_accept=time.monotonic())
            self.conns.append(c)
            t = threading.Thread(target=self._serve, args=(s, c), daemon=True)
            t.start()
            self.threads.append(t)

    def _snap(self, c):
        if self.run is not None and self.run.pid:
            c.fds = fd_table(self.run.pid)

    def _read_to_end(self, s, c, limit=None):
        """Read until EOF (or `limit` bytes); mark c.end."""
        s.settimeout(0.1)
        while not self.stop.is_set():
            if limit is not None and len(c.data) >= limit:
                return True
            try:
                b = s.recv(262144)
            except socket.timeout:
                continue
            except OSError:
                c.end, c.t_end = "rst", time.monotonic()
                return False
            if not b:
                c.end, c.t_end = "eof", time.monotonic()
                return True
            c.data += b
        return False

    def _send(self, s, c, data):
        try:
            s.settimeout(5)
            s.sendall(data)
            c.sent += len(data)
            return True
        except OSError:
            return False

    def _serve(self, s, c):
        b = self.behaviour
        try:
            if b == "record":
                if self._read_to_end(s, c) and c.end == "eof":
                    self._snap(c)
                    self._send(s, c, self.reply)
            elif b == "echo":
                s.settimeout(0.1)
                while not self.stop.is_set():
                    try:
                        d = s.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        c.end = "rst"
                        break
                    if not d:
                        c.end = "eof"
                        self._snap(c)
                        s.shutdown(socket.SHUT_WR)
                        break
                    c.data += d
                    self._send(s, c, d)
                c.t_end = time.monotonic()
            elif b == "first":
                self._send(s, c, self.reply)
                self._read_to_end(s, c)
            elif b == "halfclose":
                self._send(s, c, self.reply)
                s.shutdown(socket.SHUT_WR)
                self._read_to_end(s, c)
            elif b == "flood":
                s.settimeout(0.2)
                chunk = b"F" * 65536
                end = time.monotonic() + 10
                while c.sent < self.size and not self.stop.is_set() and time.monotonic() < end:
                    try:
                        n = s.send(chunk[:self.size - c.sent])
                        c.sent += n
                    except socket.timeout:
                        continue
                    except OSError:
                        c.end = "rst"
                        break
                if not c.end:
                    self._read_to_end(s, c)
            elif b == "reset":
                if self.after:
                    self._read_to_end(s, c, limit=self.after)
                set_linger0(s)
            elif b == "close":
                pass
            if b in ("reset", "close") and not c.end:
                c.end, c.t_end = "self", time.monotonic()   # we closed it ourselves
            elif b == "blackhole":
                self.stop.wait()
        finally:
            if b == "blackhole" or self.stop.is_set():
                # torn down: whatever alpnd left must be closed by now
                d, how = drain(s, 2.0)
                c.data += d
                if not c.end:
                    c.end = how
            s.close()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(5)
        if self.lsock:
            self.lsock.close()
        for p in self.plugs:
            p.close()


# --- one connection through a process --------------------------------------------
@dataclass
class Run:
    pid: int = 0
    rc: int = None
    elapsed: float = None
    stderr: str = ""
    client_got: bytes = b""
    client_end: str = ""
    client_error: str = ""
    client_sent: int = 0
    leaked_pids: list = field(default_factory=list)
    client_eof_after_exit: str = ""
    fds: dict = None
    notes: list = field(default_factory=list)
    tls: dict = None
    flight: bytes = b""


class Client:
    """The client side of one case: a TCP socket and a script of actions.

    ("send", b)            sendall
    ("drip", b, secs)      one byte at a time, secs apart (stops on error)
    ("sleep", secs)
    ("shut",)              shutdown(SHUT_WR): half-close
    ("rst",)               close with RST (SO_LINGER 0)
    ("read", secs)         read until EOF/RST, at most secs
    ("readn", n, secs)     read until n bytes arrived (or EOF/RST/timeout)
    ("call", f)            f(run), e.g. to change the process's limits
    ("fds",)               snapshot the server process's descriptor table
    ("tls", sni, [alpn])   real TLS handshake (Python ssl); ends the script
    ("flight", secs)       read the server's plaintext first flight
    ("wait_backend", be, secs)  wait until backend be accepted a connection
    """

    def __init__(self, sock, run):
        self.s = sock
        self.run = run
        self.closed = False
        self.sock_dead = False

    def do(self, script):
        s = self.s
        for a in script:
            op = a[0]
            try:
                if op == "send":
                    s.sendall(a[1])
                    self.run.client_sent += len(a[1])
                elif op == "drip":
                    for i in range(len(a[1])):
                        s.send(a[1][i:i + 1])
                        self.run.client_sent += 1
                        time.sleep(a[2])
                        if self.run.rc is not None:
                            raise BrokenPipeError("server exited while dripping")
                elif op == "sleep":         # cut short once the process exited
                    end = time.monotonic() + a[1]
                    while time.monotonic() < end and self.run.rc is None:
                        time.sleep(min(0.02, max(0.0, end - time.monotonic())))
                elif op == "shut":
                    s.shutdown(socket.SHUT_WR)
                elif op == "rst":
                    set_linger0(s)
                    s.close()
                    self.closed = True
                elif op == "read":
                    got, how = drain(s, a[1])
                    self.run.client_got += got
                    self.run.client_end = how
                    if how != "timeout":
                        self.sock_dead = True
                elif op == "readn":
                    end = time.monotonic() + a[2]
                    s.settimeout(0.1)
                    while len(self.run.client_got) < a[1] and time.monotonic() < end:
                        try:
                            b = s.recv(65536)
                        except socket.timeout:
                            continue
                        if not b:
                            self.run.client_end = "eof"
                            self.sock_dead = True
                            break
                        self.run.client_got += b
                elif op == "call":
                    a[1](self.run)
                elif op == "fds":
                    self.run.fds = fd_table(self.run.pid)
                elif op == "tls":
                    tls_handshake(s, a[1], a[2], self.run, *a[3:])
                    self.closed = True
                    return
                elif op == "flight":
                    self.run.flight = read_flight(s, a[1] if len(a) > 1 else 3.0)
                elif op == "wait_backend":
                    end = time.monotonic() + a[2]
                    while not a[1].conns and time.monotonic() < end:
                        time.sleep(0.01)
                else:
                    raise ValueError(op)
            except (BrokenPipeError, ConnectionResetError, OSError) as e:
                self.run.client_error = "%s: %s" % (op, e)
                return

    def finish(self, timeout):
        """After the server exited: the client must see EOF/RST soon."""
        if self.closed:
            return "closed"
        if self.sock_dead:
            self.s.close()
            return self.run.client_end
        got, how = drain(self.s, timeout)
        self.run.client_got += got
        self.s.close()
        return how


def spawn(argv, stdin, env, preexec=None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE):
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                            env=env, close_fds=True, preexec_fn=preexec)


def _close_stderr(then=None):
    def pre():
        os.close(2)
        if then:
            then()
    return pre


def run_connection(argv, script, run, env, preexec=None, family="tcp4",
                   wait_max=10.0, stdio="pipe", presend=b""):
    """Connect a client, hand the accepted socket to argv as fd 0, play the
    client script, wait for the process.  stdio: "pipe" (stdout /dev/null,
    stderr captured), "stdout" (fd 1 is the socket too), "socket" (fds 0,
    1 and 2 are the socket: inetd without an error stream), "closed" (fd 2
    closed, as some launchers leave it), "brokenpipe" (fd 2 a pipe nobody
    reads any more)."""
    if family == "unix":            # a unix stream client (socketpair)
        cs, ss = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        # "mapped": an IPv4 client on a dual-stack IPv6 listener, as with
        # systemd's ListenStream=443: the peer is ::ffff:127.0.0.1
        host = {"tcp6": "::1", "mapped": "::"}.get(family, "127.0.0.1")
        fam = socket.AF_INET6 if family in ("tcp6", "mapped") else socket.AF_INET
        ls = socket.socket(fam, socket.SOCK_STREAM)
        if family == "mapped":
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((host, 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        cs = socket.create_connection(("127.0.0.1" if family == "mapped" else host, port))
        cs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ss, _ = ls.accept()
        ls.close()
    if presend:             # already queued when the process starts
        cs.sendall(presend)
        run.client_sent += len(presend)
    t0 = time.monotonic()
    if stdio == "closed":
        preexec = _close_stderr(preexec)
    errw = subprocess.PIPE
    if stdio == "socket":
        errw = ss
    elif stdio == "brokenpipe":         # the log reader went away: EPIPE
        r, errw = os.pipe()
        os.close(r)
    p = spawn(argv, ss, env, preexec,
              stdout=ss if stdio in ("stdout", "socket") else subprocess.DEVNULL,
              stderr=errw)
    if stdio == "brokenpipe":
        os.close(errw)
    ss.close()
    run.pid = p.pid
    err = []
    et = threading.Thread(target=lambda: err.append(p.stderr.read() if p.stderr else b""),
                          daemon=True)
    et.start()

    def waiter():
        p.wait()
        run.elapsed = time.monotonic() - t0
        run.rc = p.returncode
    wt = threading.Thread(target=waiter, daemon=True)
    wt.start()
    cl = Client(cs, run)
    cl.do(script)
    wt.join(max(0.0, wait_max - (time.monotonic() - t0)))
    if p.poll() is None:
        run.notes.append("process still running after %.1fs: killed" % wait_max)
        run.fds = run.fds or fd_table(p.pid)
        p.kill()
        wt.join(5)
    et.join(5)
    run.stderr = (err[0] if err else b"").decode("utf-8", "replace")
    run.client_eof_after_exit = cl.finish(2.0)
    return p


# --- TLS client operations (real TLS via Python ssl, or raw records) -------------
def tls_handshake(sock, sni, alpn, run, timeout=5.0):
    """A real TLS client handshake (Python ssl / OpenSSL) on sock; the
    peer certificate and the agreed ALPN go into run.tls."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    sock.settimeout(timeout)
    t = ctx.wrap_socket(sock, server_hostname=sni, do_handshake_on_connect=False)
    try:
        t.do_handshake()
        run.tls = {"cert": t.getpeercert(binary_form=True),
                   "alpn": t.selected_alpn_protocol(), "version": t.version()}
        try:            # RFC 8737 section 3: the server closes right away
            while t.recv(4096):
                pass
        except (ssl.SSLError, OSError):
            pass
    except (ssl.SSLError, OSError) as e:
        run.tls = {"error": str(e)}
    finally:
        t.close()


def read_flight(sock, timeout=3.0):
    """Read plaintext records until ServerHelloDone, an alert, a
    ChangeCipherSpec (TLS 1.3), EOF or timeout."""
    import hostile_lib as H
    got = b""
    end = time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < end:
        try:
            b = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not b:
            break
        got += b
        recs, _ = H.parse_records(got)
        if any(ct in (H.CT_ALERT, H.CT_CCS) for ct, _, _ in recs):
            break
        if any(t == H.HS_SERVER_HELLO_DONE for t, _ in H.handshake_messages(recs)):
            break
    return got


def wait_epoll(pid, timeout=3.0):
    """Wait until pid has an epoll descriptor (it is idle in its event
    loop); return its descriptor table."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t = fd_table(pid) or {}
        if any("eventpoll" in v for v in t.values()):
            return t
        time.sleep(0.01)
    return fd_table(pid) or {}
