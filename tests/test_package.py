"""The Debian package (debian/, `make deb`): built from a copy of this
tree, checked with lintian (source and binary), then installed with
apt-get into a throw-away systemd machine (tests/test_deploy.py's
Container with dpkg=True: /usr an overlay on the host's, the host's dpkg
database copied, so apt-get works offline).  In there: nothing enabled or
started by the installation, the group and the certificate directory
made by sysusers.d/tmpfiles.d, alpnd.socket enabled in front of nginx
serving HTTPS and acme-tls/1, an upgrade to a rebuilt package (version
bumped) with a connection held through it, remove (everything stopped,
the renewal window's nftables table too), purge (nothing left but what
the administrator made), installing again, and a last purge with the
certificate directory emptied (the directory and the group go too)."""
import os
import re
import shutil
import ssl
import subprocess
import time

import pytest

from test_deploy import (CT_CLIENT, PY, ROOT, Container, _held_get,  # noqa: F401
                         procs, run)

CERTS = "/var/lib/dehydrated/alpn-certs"
CHALLENGE = "www.example.test"
# What the administrator makes in /etc below (nginx as the backend).
ADMIN_ETC = {"/etc/nginx/conf.d/nginx-backend.conf", "/etc/ssl/example.org",
             "/etc/ssl/example.org/fullchain.pem",
             "/etc/ssl/example.org/privkey.pem"}

pytestmark = pytest.mark.timeout(900)


def copy_tree(dest):
    """The working tree without .git, build outputs and packages (as
    `make deb` copies it)."""
    dest.mkdir()
    tar = subprocess.Popen(["tar", "-c", "--exclude=./build", "--exclude=./.git",
                            "--exclude=./*.deb", "--exclude=./alpnd",
                            "--exclude=./alpnd-respond", "."], cwd=ROOT,
                           stdout=subprocess.PIPE)
    run(["tar", "-x", "-C", dest], stdin=tar.stdout, timeout=60)
    assert tar.wait(60) == 0


def bump_version(src, suffix):
    """A new debian/changelog entry: VERSION+suffix."""
    ch = src / "debian/changelog"
    text = ch.read_text()
    old = run(["dpkg-parsechangelog", "-S", "Version"], cwd=src).stdout.strip()
    trailer = re.search(r"^ -- (.*?>)", text, re.M).group(1)
    date = run(["date", "-R"]).stdout.strip()
    ch.write_text("alpnd (%s%s) unstable; urgency=medium\n\n"
                  "  * Rebuilt for the upgrade test.\n\n -- %s  %s\n\n%s"
                  % (old, suffix, trailer, date, text))
    return old + suffix


def test_package(tmp_path, procs):
    if os.geteuid() != 0:
        pytest.skip("needs root (dpkg in a systemd-nspawn machine, "
                    "network namespaces)")
    for tool in ("dpkg-buildpackage", "dh", "lintian", "musl-gcc",
                 "systemd-nspawn", "nsenter", "unshare", "nginx", "nft"):
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed (tests/deps deb check)" % tool)
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    src = tmp_path / "src"
    copy_tree(src)
    debs = tmp_path / "debs"
    debs.mkdir()

    # The first package: source and binary, so lintian sees both.
    t0 = time.monotonic()
    run(["make", "-s", "deb", "DPKG_BUILDPACKAGE_OPTS=-us -uc"], cwd=src,
        timeout=600)
    v1 = run(["dpkg-parsechangelog", "-S", "Version"], cwd=src).stdout.strip()
    deb1 = "alpnd_%s_%s.deb" % (v1, arch)
    shutil.copy(src / deb1, debs)
    out1 = tmp_path / "out1"
    shutil.move(src / "build/deb", out1)
    lint_log = tmp_path / "lintian.log"
    lint = procs.start(["lintian", "--pedantic", "-I", "--fail-on",
                        "error,warning", out1 / ("alpnd_%s_%s.changes"
                                                 % (v1, arch))],
                       stdout=open(lint_log, "w"), stderr=subprocess.STDOUT)
    # The second: the same tree with the version bumped, binary only
    # (`make deb` as documented), built while lintian runs.
    v2 = bump_version(src, "+pkgtest1")
    run(["make", "-s", "deb"], cwd=src, timeout=600)
    deb2 = "alpnd_%s_%s.deb" % (v2, arch)
    shutil.copy(src / deb2, debs)
    assert lint.wait(600) == 0, lint_log.read_text()
    tags = lint_log.read_text()
    assert not re.search(r"^[EW]: ", tags, re.M), tags
    print("lintian:\n" + tags)
    print("built and linted in %.0f s" % (time.monotonic() - t0))

    ct = Container(tmp_path, procs, None, dpkg=True)
    try:
        _package_in_machine(ct, tmp_path, procs, debs, deb1, v1, deb2, v2)
        _make_install_in_machine(ct, src)
    finally:
        ct.close()


def _package_in_machine(ct, tmp_path, procs, debs, deb1, v1, deb2, v2):
    shutil.copytree(debs, ct.root / "var/tmp/debs")
    client = tmp_path / "ct-client.py"
    client.write_text(CT_CLIENT)
    upper = tmp_path / "usr-upper"   # what changed in the machine's /usr

    def sh(script, **kw):
        return ct.sh("set -e; export DEBIAN_FRONTEND=noninteractive; "
                     + script, **kw)

    def out(script):
        return sh(script).stdout.strip()

    def apt(args):
        r = sh("cd /var/tmp/debs && apt-get -q -y %s" % args, check=False,
               timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        print("# apt-get %s\n%s%s" % (args, re.sub(
            r"^\(Reading database.*\n", "", r.stdout, flags=re.M), r.stderr))
        return r.stdout + r.stderr

    def ask(host, mode="get"):
        r = ct.host("%s %s %s 443 %s" % (PY, client, host, mode), check=False)
        return (r.stdout + r.stderr).strip()

    def etc_files():
        return set(out("find /etc -xdev").split("\n"))

    def active_units():
        return out("systemctl list-units --plain --no-legend "
                   "--state=active,activating,reloading,deactivating "
                   "'alpnd*'")

    def nothing_runs():
        assert active_units() == ""
        assert out("ss -Htln 'sport = :443 or sport = :4443'") == ""
        assert ct.sh("pgrep -x alpnd", check=False).stdout == ""
        assert out("nft list ruleset") == ""

    def check_installed(version):
        assert out("dpkg-query -W -f '${Status} ${Version}' alpnd") == \
            "install ok installed " + version
        assert out("alpnd --version 2>&1") == "alpnd " + \
            re.sub(r"-[^-]*$", "", version)
        # sysusers.d and tmpfiles.d applied by the postinst
        assert out("getent group alpnd-certs").startswith("alpnd-certs:")
        assert out("stat -c '%A %G' " + CERTS) == "drwxr-s--- alpnd-certs"
        units = sorted(p.name for p in (ROOT / "units").iterdir())
        assert out("cd /lib/systemd/system && ls alpnd*").split() == units
        for f in ("/usr/sbin/alpnd-respond", "/usr/sbin/alpnd-redirect",
                  "/usr/share/man/man8/alpnd.8.gz",
                  "/usr/share/man/man8/alpnd-respond.8.gz",
                  "/usr/share/doc/alpnd/examples/nginx-backend.conf"):
            sh("test -e " + f)
        sh("test -x /usr/share/doc/alpnd/examples/dehydrated-hook")
        assert "/etc/default/alpnd " in out(
            "dpkg-query -W -f '${Conffiles}' alpnd")

    def usr_changes():
        return sorted(str(p.relative_to(upper)) for p in upper.rglob("*")
                      if not p.is_dir())

    # A policy-rc.d that forbids every service action (Docker images ship
    # one) would keep the maintainer scripts from reloading and stopping
    # anything; a server has none.  Removed in the machine only.
    sh("rm -f /usr/sbin/policy-rc.d")
    etc_before = etc_files()
    usr_before = usr_changes()

    # -- install: nothing enabled, nothing started, port 443 left alone
    apt("install ./" + deb1)
    check_installed(v1)
    assert out("systemctl is-enabled alpnd.socket || true") == "disabled"
    nothing_runs()

    # The administrator: nginx moves to 127.0.0.1:8443 with the shipped
    # snippet, a challenge certificate, then alpnd.socket (README).
    sh(r"""
alpnd-respond --certs %s --make %s token.thumbprint
mkdir -p /etc/ssl/example.org /var/www/html /var/log/nginx /var/lib/nginx
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -days 2 -subj /CN=example.org -keyout /etc/ssl/example.org/privkey.pem \
    -out /etc/ssl/example.org/fullchain.pem 2>/dev/null
echo "nginx behind alpnd" > /var/www/html/index.html
cp /usr/share/doc/alpnd/examples/nginx-backend.conf /etc/nginx/conf.d/
systemctl start nginx
systemctl enable --now alpnd.socket
""" % (CERTS, CHALLENGE))
    certs_before = out("cd %s && ls -ln && sha256sum *" % CERTS)
    cert = out("cat %s/%s.crt.pem" % (CERTS, CHALLENGE))
    want = "acme-tls/1 " + ssl.PEM_cert_to_DER_cert(cert).hex()
    assert ask("10.205.0.2") == "nginx behind alpnd"
    assert ask("fd00:a3::2") == "nginx behind alpnd"
    assert ask("10.205.0.2", "acme") == want

    # -- upgrade with a connection held through it
    held = procs.start(["ip", "netns", "exec", ct.ns, PY, client,
                        "10.205.0.2", "443", "held"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       text=True)
    assert _held_get(held) == "nginx behind alpnd"
    cursor = re.search(r"cursor: (\S+)", out(
        "journalctl -n 0 --show-cursor")).group(1)
    apt("install ./" + deb2)
    check_installed(v2)
    assert _held_get(held) == "nginx behind alpnd", "upgrade cut a relay"
    assert ask("fd00:a3::2") == "nginx behind alpnd"
    assert ask("10.205.0.2", "acme") == want
    assert out("systemctl is-enabled alpnd.socket") == "enabled"
    # The listening-socket service was reloaded, not restarted: it runs,
    # and its process runs the new alpnd (a process still running the
    # replaced binary shows "/usr/sbin/alpnd (deleted)").
    j = out("journalctl --no-pager --after-cursor '%s' -u alpnd.service"
            % cursor)
    pid = out("systemctl show -P MainPID alpnd.service")
    assert pid != "0", "alpnd.service does not run after the upgrade\n" + j
    assert out("readlink /proc/%s/exe" % pid) == "/usr/sbin/alpnd", j
    assert re.search(r"Reloaded alpnd\.service", j), j
    assert not re.search(r"Stopping alpnd|Stopped alpnd|Deactivated", j), j
    assert _held_get(held) == "nginx behind alpnd"
    held.stdin.close()
    procs.stop(held)

    # -- remove: everything of the package stops, the renewal window too
    sh("systemctl start alpnd-redirect.socket")
    assert "alpnd_redirect" in out("nft list ruleset")
    apt("remove alpnd")
    nothing_runs()
    assert out("dpkg-query -W -f '${Status}' alpnd") == \
        "deinstall ok config-files"
    sh("test -e /etc/default/alpnd && ! test -e /usr/sbin/alpnd")
    assert out("ls /lib/systemd/system | grep alpnd || true") == ""

    # -- purge: the configuration goes; the administrator's certificates
    # stay untouched, and with them their directory and group
    apt("purge alpnd")
    assert out("dpkg-query -W -f '${Status}' alpnd 2>&1 || true") in (
        "", "unknown ok not-installed",
        "dpkg-query: no packages found matching alpnd")
    assert out("cd %s && ls -ln && sha256sum *" % CERTS) == certs_before
    assert out("getent group alpnd-certs").startswith("alpnd-certs:")
    left = etc_files() - etc_before - ADMIN_ETC
    assert left == set(), left
    assert etc_before - etc_files() == set()
    assert out("grep -rl alpnd /var/lib/systemd/deb-systemd-helper-* "
               "2>/dev/null || true") == ""
    assert usr_changes() == usr_before   # nothing of the package in /usr

    # -- install again: the old certificate is served, nothing enabled
    apt("install ./" + deb2)
    check_installed(v2)
    assert out("systemctl is-enabled alpnd.socket || true") == "disabled"
    nothing_runs()
    sh("systemctl start alpnd.socket")
    assert ask("fd00:a3::2", "acme") == want
    assert ask("10.205.0.2") == "nginx behind alpnd"

    # -- the administrator clears the certificates; purge then removes
    # the directory and the group as well
    sh("alpnd-respond --certs %s --clean %s" % (CERTS, CHALLENGE))
    apt("purge alpnd")
    nothing_runs()
    sh("! test -e " + CERTS)
    assert ct.sh("getent group alpnd-certs", check=False).returncode == 2
    left = etc_files() - etc_before - ADMIN_ETC
    assert left == set(), left
    assert etc_before - etc_files() == set()
    assert usr_changes() == usr_before


def _make_install_in_machine(ct, src):
    """`make install` without DESTDIR makes the group and the directory
    itself (systemd-sysusers, systemd-tmpfiles --create); the package is
    purged, the group and the directory are gone at this point."""
    shutil.copytree(src, ct.root / "var/tmp/src", ignore=shutil.ignore_patterns(
        "build", "*.deb"))
    r = ct.sh("make -s -C /var/tmp/src install ALPND_LIBC=musl 2>&1",
              check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "systemd-sysusers /usr/local/lib/sysusers.d/alpnd.conf" in r.stdout
    assert ct.sh("getent group alpnd-certs").stdout.startswith("alpnd-certs:")
    assert ct.sh("stat -c '%A %U %G' " + CERTS).stdout.strip() == \
        "drwxr-s--- root alpnd-certs"
    ct.sh("make -s -C /var/tmp/src uninstall")
    ct.sh("! test -e /usr/local/lib/sysusers.d/alpnd.conf")
