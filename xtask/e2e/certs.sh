#!/usr/bin/env bash
# Generates the single-node cluster's PKI into $1 with openssl: one CA, the
# apiserver's serving certificate (127.0.0.1, localhost, the node name, the
# `kubernetes` Service's first IP), client certificates for every component
# (their CN/O are the RBAC identities the Node and RBAC authorizers expect),
# the kubelet's serving certificate and the service-account key pair.
# Usage: certs.sh DIR NODE_NAME
set -euo pipefail
dir="$1"
node="$2"
mkdir -p "$dir"
cd "$dir"
days=2

openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$days" \
    -subj "/CN=ergon-e2e-ca" 2>/dev/null

# issue NAME SUBJECT [SAN]
issue() {
    local name="$1" subject="$2" san="${3:-}"
    openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subject" 2>/dev/null
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [ -n "$san" ]; then
            echo "extendedKeyUsage=serverAuth,clientAuth"
            echo "subjectAltName=$san"
        else
            echo "extendedKeyUsage=clientAuth"
        fi
    } >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" \
        -days "$days" -extfile "$name.ext" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

issue apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:$node,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
issue admin "/O=system:masters/CN=ergon-e2e-admin"
issue controller-manager "/CN=system:kube-controller-manager"
issue scheduler "/CN=system:kube-scheduler"
issue kubelet-client "/O=system:nodes/CN=system:node:$node"
issue kubelet "/CN=$node" "IP:127.0.0.1,DNS:localhost,DNS:$node"

openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
chmod 600 ./*.key
