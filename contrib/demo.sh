#!/bin/sh
# contrib/demo.sh - what `make demo` shows, on loopback only:
#   an HTTPS server (openssl s_server) with a certificate made now,
#   a TLS-ALPN-01 challenge certificate made by alpnd-respond --make,
#   alpnd under systemd-socket-activate --accept --inetd in front of both,
#   curl through the fallback, then an acme-tls/1 handshake that prints the
#   acmeIdentifier it received.  Everything it starts is stopped on exit.
# make demo has already installed the packages (tests/deps) and built.
set -eu
cd "$(dirname "$0")/.."

for t in openssl curl gnutls-cli systemd-socket-activate; do
	command -v "$t" >/dev/null 2>&1 || {
		echo "demo: $t is missing (tests/deps build demo installs it)" >&2
		exit 69
	}
done
for b in ./alpnd ./alpnd-respond; do
	[ -x "$b" ] || { echo "demo: $b not built (run make)" >&2; exit 69; }
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/alpnd-demo.XXXXXX")
pids=
cleanup() {
	for p in $pids; do
		kill "$p" 2>/dev/null || true
	done
	for p in $pids; do
		wait "$p" 2>/dev/null || true
	done
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() {
	if command -v python3 >/dev/null 2>&1; then
		python3 -c 'import socket; s = socket.socket()
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
	else
		echo $((20000 + $$ % 20000 + $1))
	fi
}
# wait_for CMD...: retry for up to 5 s
wait_for() {
	i=0
	until "$@" >/dev/null 2>&1; do
		i=$((i + 1))
		[ $i -lt 100 ] || { echo "demo: timed out: $*" >&2; exit 75; }
		sleep 0.05
	done
}
if [ -t 1 ]; then
	step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
	step() { printf '\n== %s\n' "$*"; }
fi

bport=$(port 1)
aport=$(port 2)
keyauth="demo-token-$(date +%s).demo-account-thumbprint"

step "HTTPS backend on 127.0.0.1:$bport (openssl s_server, certificate made now)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/backend.key" -out "$dir/backend.crt" -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    >/dev/null 2>&1
openssl s_server -quiet -www -accept "127.0.0.1:$bport" \
    -cert "$dir/backend.crt" -key "$dir/backend.key" \
    >"$dir/backend.log" 2>&1 </dev/null &
pids="$pids $!"
wait_for curl -sk --max-time 1 "https://127.0.0.1:$bport/"
echo "up"

step "challenge certificate: alpnd-respond --make localhost <key authorization>"
mkdir -p "$dir/certs"
if ! ./alpnd-respond --certs "$dir/certs" --make localhost "$keyauth"; then
	echo "demo: alpnd-respond --make failed" >&2
	exit 70
fi
ls -l "$dir/certs"
want=$(printf '%s' "$keyauth" | openssl dgst -sha256 -r | cut -c1-64)
echo "key authorization: $keyauth"
echo "SHA-256 expected : $want"

step "alpnd on 127.0.0.1:$aport (systemd-socket-activate --accept --inetd)"
echo "./alpnd -v --fallback 127.0.0.1:$bport --certs $dir/certs --respond ./alpnd-respond"
systemd-socket-activate --accept --inetd -l "127.0.0.1:$aport" \
    "$PWD/alpnd" -v --fallback "127.0.0.1:$bport" --certs "$dir/certs" \
    --respond "$PWD/alpnd-respond" 2>"$dir/alpnd.log" &
pids="$pids $!"
wait_for grep -q '^Listening on' "$dir/alpnd.log"

step "curl https://localhost:$aport/ (HTTP/2 + http/1.1 offered: fallback)"
curl -sk --max-time 10 --resolve "localhost:$aport:127.0.0.1" \
    "https://localhost:$aport/" | sed -n '1,8p'
echo "..."

step "acme-tls/1 handshake (openssl s_client -alpn acme-tls/1 -servername localhost)"
openssl s_client -connect "127.0.0.1:$aport" -servername localhost \
    -alpn acme-tls/1 </dev/null 2>/dev/null >"$dir/acme.out" || true
grep -E '^(ALPN protocol|Protocol|New,)' "$dir/acme.out" || true
openssl x509 -in "$dir/acme.out" -noout -subject -ext subjectAltName
openssl x509 -in "$dir/acme.out" -noout -text |
    grep '1\.3\.6\.1\.5\.5\.7\.1\.31' | sed 's/^ */acmeIdentifier extension: /'
got=$(openssl x509 -in "$dir/acme.out" -outform DER |
    od -An -v -tx1 | tr -d ' \n' |
    sed -n 's/.*06082b0601050507011f0101ff04220420\([0-9a-f]\{64\}\).*/\1/p')
echo "SHA-256 in the certificate: ${got:-?}"
if [ "$got" = "$want" ]; then
	echo "matches SHA-256(key authorization): a validator would accept it"
else
	echo "demo: the certificate does not carry the expected digest" >&2
	exit 1
fi

step "gnutls-cli --alpn=acme-tls/1 (the same check from GnuTLS)"
gnutls-cli --insecure --alpn=acme-tls/1 -p "$aport" localhost </dev/null \
    2>&1 | grep -E 'Application protocol|Handshake was completed|Description' || true

step "alpnd's log (one line per connection)"
sleep 0.2
grep -E '^alpnd' "$dir/alpnd.log" || true

step "done: stopping everything the demo started"
