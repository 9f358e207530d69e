#!/usr/bin/env bash
# Prints the four certificate Secrets that manifests/r3map-csi.yaml expects
# (it is rendered with certificates.generate=false, so that no CA key is
# ever committed): a CA, the region service's server certificate, the
# plugins' client certificate and the node plugins' migration certificate,
# the same set the chart generates at install. Needs openssl.
#
#   manifests/certificates.sh [NAMESPACE [RELEASE [CLUSTER_DOMAIN [DAYS]]]] | kubectl apply -f -
#
# Defaults: r3map-csi, r3map-csi, cluster.local, 3650 days.
set -euo pipefail
ns=${1:-r3map-csi}
release=${2:-r3map-csi}
domain=${3:-cluster.local}
days=${4:-3650}
command -v openssl >/dev/null || { echo "certificates.sh: needs openssl" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
printf '[req]\ndistinguished_name=dn\n[dn]\n' > req.cnf

# P-256 keys in PKCS#8: what rustls reads, and small.
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }

key ca
openssl req -config req.cnf -x509 -new -key ca.key -out ca.crt -days "$days" \
  -subj "/CN=$release-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"

# leaf NAME CN SAN...: server and client use at once (the migration
# certificate is both, and a client-only one costs nothing extra).
leaf() {
  local name=$1 cn=$2 san
  shift 2
  san=$(printf 'DNS:%s,' "$@")
  key "$name"
  openssl req -config req.cnf -new -key "$name.key" -out "$name.csr" -subj "/CN=$cn"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' \
    "${san%,}" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
    -days "$days" -extfile "$name.ext" -out "$name.crt" 2>/dev/null
}

svc=$release-regions
leaf region-server "$svc.$ns.svc" "$svc" "$svc.$ns" "$svc.$ns.svc" "$svc.$ns.svc.$domain"
leaf region-client r3map-csi-client r3map-csi-client
leaf migration r3map-node r3map-node

b64() { base64 -w0 < "$1"; }
secret() {
  local name=$1
  shift
  cat <<EOF
---
apiVersion: v1
kind: Secret
type: kubernetes.io/tls
metadata:
  name: $name
  namespace: $ns
  labels:
    app.kubernetes.io/name: r3map-csi
    app.kubernetes.io/instance: $release
    r3map.io/generated-certificate: "true"
data:
EOF
  local kv
  for kv in "$@"; do
    printf '  %s: %s\n' "${kv%%=*}" "$(b64 "${kv#*=}")"
  done
}
secret "$release-ca" tls.crt=ca.crt tls.key=ca.key
for n in region-server region-client migration; do
  secret "$release-$n" ca.crt=ca.crt tls.crt="$n.crt" tls.key="$n.key"
done
