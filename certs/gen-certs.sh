#!/usr/bin/env bash
# Makes a CA and a serving certificate for the webhook, offline, with openssl.
# For local trials and tests; in clusters prefer the chart's helm or
# cert-manager modes (see README.md).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: certs/gen-certs.sh [--out DIR] [--service NAME] [--namespace NS] [--days N] [--ip IP]...

Writes DIR/ca.crt, DIR/ca.key, DIR/tls.crt and DIR/tls.key (default DIR:
./certs-out). The serving certificate's SANs cover the Service (NAME, NAME.NS,
NAME.NS.svc, NAME.NS.svc.cluster.local), localhost, 127.0.0.1 and each --ip.
The files are made in a temporary directory and moved into DIR only when all
of them were made, so a failure never leaves a half-written set.

  --out DIR        where to write (created if missing)
  --service NAME   the webhook's Service name (default velero-vm-restore-webhook)
  --namespace NS   its namespace (default velero)
  --days N         validity in days, a whole number from 1 to 36500 (default 365)
  --ip IP          an extra IPv4 or IPv6 SAN (repeatable)
  -h, --help       this text

Example:
  certs/gen-certs.sh --out ./certs-out --service vm-restore-velero-vm-restore-webhook --namespace velero
EOF
}

fail() {
  echo "gen-certs.sh: $*" >&2
  echo "Run certs/gen-certs.sh --help for usage." >&2
  exit 2
}

# value OPTION REMAINING_ARGS...: the option's value, or a clear error.
value() {
  local option=$1
  shift
  [[ $# -ge 1 && -n $1 && $1 != --* ]] || fail "$option needs a value"
  printf '%s' "$1"
}

dns_label='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
out=./certs-out
service=velero-vm-restore-webhook
namespace=velero
days=365
ips=(127.0.0.1)
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$(value "$@"); shift 2 ;;
    --service) service=$(value "$@"); shift 2 ;;
    --namespace) namespace=$(value "$@"); shift 2 ;;
    --days) days=$(value "$@"); shift 2 ;;
    --ip) ips+=("$(value "$@")"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown argument $1" ;;
  esac
done

[[ $days =~ ^[0-9]+$ ]] && ((10#$days >= 1 && 10#$days <= 36500)) \
  || fail "--days must be a whole number of days from 1 to 36500, not '$days'"
[[ $service =~ $dns_label ]] || fail "--service must be a DNS label (lowercase letters, digits, '-'), not '$service'"
[[ $namespace =~ $dns_label ]] || fail "--namespace must be a DNS label (lowercase letters, digits, '-'), not '$namespace'"
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl is required (apt-get install openssl)" >&2; exit 1; }
for ip in "${ips[@]}"; do
  python3 -c 'import ipaddress, sys; ipaddress.ip_address(sys.argv[1])' "$ip" 2>/dev/null \
    || fail "--ip must be an IPv4 or IPv6 address, not '$ip'"
done
if [[ -e $out && ! -d $out ]]; then
  fail "--out $out exists and is not a directory"
fi

mkdir -p "$out"
work=$(mktemp -d "${out%/}/.gen-certs.XXXXXX")
trap 'rm -rf "$work"' EXIT
umask 077
san="DNS:${service},DNS:${service}.${namespace},DNS:${service}.${namespace}.svc,DNS:${service}.${namespace}.svc.cluster.local,DNS:localhost"
for ip in "${ips[@]}"; do san+=",IP:${ip}"; done

run() {
  local log
  if ! log=$("$@" 2>&1); then
    echo "gen-certs.sh: openssl failed: $log" >&2
    exit 1
  fi
}
run openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=velero-vm-restore-webhook CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$work/ca.key" -out "$work/ca.crt"
run openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=${service}.${namespace}.svc" -keyout "$work/tls.key" -out "$work/tls.csr"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$work/ext"
run openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -days "$days" -extfile "$work/ext" -out "$work/tls.crt"
chmod 644 "$work/ca.crt" "$work/tls.crt"
# Keys first, certificates last: a reader that sees the new certificate also
# finds its key.
for file in ca.key tls.key ca.crt tls.crt; do
  mv -f "$work/$file" "$out/$file"
done
echo "wrote $out/{ca.crt,ca.key,tls.crt,tls.key} (SANs: $san)"
