#!/usr/bin/env bash
# Makes a CA and a serving certificate for the webhook, offline, with openssl.
# For local trials and tests; in clusters prefer cert-manager (see README.md).
#
#   certs/gen-certs.sh [--out DIR] [--service NAME] [--namespace NS] [--days N] [--ip IP]...
#
# Writes DIR/ca.crt, DIR/ca.key, DIR/tls.crt, DIR/tls.key. The serving
# certificate's SANs cover the Service (NAME, NAME.NS, NAME.NS.svc,
# NAME.NS.svc.cluster.local), localhost, 127.0.0.1 and any --ip.
set -euo pipefail

out=./certs-out
service=velero-vm-restore-webhook
namespace=velero
days=365
ips=(127.0.0.1)
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --service) service=$2; shift 2 ;;
    --namespace) namespace=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --ip) ips+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gen-certs.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl is required (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$out"
umask 077
san="DNS:${service},DNS:${service}.${namespace},DNS:${service}.${namespace}.svc,DNS:${service}.${namespace}.svc.cluster.local,DNS:localhost"
for ip in "${ips[@]}"; do san+=",IP:${ip}"; done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=velero-vm-restore-webhook CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=${service}.${namespace}.svc" -keyout "$out/tls.key" -out "$out/tls.csr" 2>/dev/null
extfile=$(mktemp)
trap 'rm -f "$extfile" "$out/tls.csr" "$out/ca.srl"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san" > "$extfile"
openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -extfile "$extfile" -out "$out/tls.crt" 2>/dev/null
chmod 644 "$out/ca.crt" "$out/tls.crt"
echo "wrote $out/{ca.crt,ca.key,tls.crt,tls.key} (SANs: $san)"
