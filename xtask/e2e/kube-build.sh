#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
# the pause binary from the orig tarball of Debian bookworm's `kubernetes`
# source package (the only Debian source of Kubernetes that still carries
# vendor/ and so builds offline), with Debian's Go 1.19.
#
# Why a script and not Rust: it is a sequence of apt/tar/go commands whose
# output is the useful diagnostic; `cargo xtask e2e` calls it and reads the
# last line (the directory of the binaries).
#
# Cached by content: the binaries live in $WORK/kube/<key>/bin where <key> is
# the sha256 of the tarball plus the build flags; a warm run only checks the
# stamp. Everything is written under $WORK (default /var/cache/ergon-e2e),
# never in the repository.
set -euo pipefail

WORK="${ERGON_E2E_WORK:-/var/cache/ergon-e2e}"
KUBE_PKG_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBE_GIT_VERSION="v1.20.2"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
GO=/usr/lib/go-1.19/bin/go

log() { printf 'kube-build: %s\n' "$*" >&2; }

mkdir -p "$WORK/src"
# One build at a time (a background build of `cargo xtask test` and an
# `cargo xtask e2e` would share the tree and the cache).
exec 9>"$WORK/kube-build.lock"
flock 9

# 1. The orig tarball, through a private apt config so the machine's own
# sources list is not touched.
tarball="$(ls "$WORK"/src/kubernetes_*.orig.tar.gz 2>/dev/null | head -n1 || true)"
if [ -z "$tarball" ]; then
    archive="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    archive="${archive:-http://deb.debian.org/debian}"
    apt_dir="$WORK/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    echo "deb-src [trusted=yes] $archive bookworm main" >"$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    log "fetching the kubernetes $KUBE_PKG_VERSION source package from $archive"
    apt-get "${apt_opts[@]}" update -qq \
        || { log "apt-get update of the private deb-src list failed: is $archive reachable?"; exit 1; }
    (cd "$WORK/src" && apt-get "${apt_opts[@]}" source --download-only "kubernetes=$KUBE_PKG_VERSION") \
        || { log "apt-get source kubernetes=$KUBE_PKG_VERSION failed (see above)"; exit 1; }
    tarball="$(ls "$WORK"/src/kubernetes_*.orig.tar.gz | head -n1)"
fi

VERSION_PACKAGES="k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version k8s.io/kubernetes/vendor/k8s.io/component-base/version"
flags="GO111MODULE=off CGO_ENABLED=0 go1.19 $KUBE_GIT_VERSION ${BINARIES[*]} pause-gcc-static $VERSION_PACKAGES reflect2-debian-1.0.2"
key="$( { sha256sum "$tarball" | cut -d' ' -f1; echo "$flags"; } | sha256sum | cut -c1-16)"
out="$WORK/kube/$key"
if [ -f "$out/stamp" ]; then
    log "cached: $out/bin"
    echo "$out/bin"
    exit 0
fi

[ -x "$GO" ] || { log "$GO missing: apt-get install golang-1.19-go"; exit 1; }

# 2. GOPATH mode: module mode fails on this tree (-mod=vendor needs go.mod updates).
gopath="$WORK/gopath"
tree="$gopath/src/k8s.io/kubernetes"
tarball_sha="$(sha256sum "$tarball" | cut -c1-16)"
if [ ! -f "$tree/.ergon-unpacked-$tarball_sha" ]; then
    log "unpacking $(basename "$tarball")"
    rm -rf "$tree"
    mkdir -p "$tree"
    tar -xzf "$tarball" -C "$tree" --strip-components=1
    touch "$tree/.ergon-unpacked-$tarball_sha"
fi

export GOPATH="$gopath" GO111MODULE=off CGO_ENABLED=0
export GOCACHE="$WORK/gocache" PATH="/usr/lib/go-1.19/bin:$PATH"
cd "$tree"

# The tree vendors reflect2 1.0.1, which predates Go 1.18's map iterator:
# built with Go 1.19 the apiserver dies with SIGSEGV (in
# reflect2.UnsafeIterate, from json-iterator) the first time it encodes a
# custom resource. Debian's reflect2 1.0.2 has the fix and the same API.
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -f "$reflect2/go_above_118.go" ] \
    || { log "$reflect2 missing: apt-get install golang-github-modern-go-reflect2-dev"; exit 1; }
rsync -a --delete --exclude go.mod "$reflect2/" vendor/github.com/modern-go/reflect2/

# 3. The generated OpenAPI definitions are not in the tarball.
if [ ! -f pkg/generated/openapi/zz_generated.openapi.go ]; then
    log "make gen_openapi"
    make gen_openapi >"$WORK/gen_openapi.log" 2>&1 \
        || { tail -n 40 "$WORK/gen_openapi.log" >&2; log "make gen_openapi failed (log: $WORK/gen_openapi.log)"; exit 1; }
fi

# Both version packages, as hack/lib/version.sh sets them: the apiserver's
# /version answers from client-go's, and without it reports v0.0.0-master
# (which Helm's kubeVersion check then refuses).
major="${KUBE_GIT_VERSION#v}"; minor="${major#*.}"; major="${major%%.*}"; minor="${minor%%.*}"
ldflags="-s -w"
for v in $VERSION_PACKAGES; do
    ldflags="$ldflags -X $v.gitVersion=$KUBE_GIT_VERSION -X $v.gitMajor=$major -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
done
mkdir -p "$out/bin.tmp"
for b in "${BINARIES[@]}"; do
    log "go build $b"
    start=$SECONDS
    go build -ldflags "$ldflags" -o "$out/bin.tmp/$b" "./cmd/$b"
    log "$b built in $((SECONDS - start)) s"
done

# 4. The pod sandbox image's binary, from the same tree.
gcc -Os -static -DVERSION="$KUBE_GIT_VERSION" -o "$out/bin.tmp/pause" build/pause/linux/pause.c \
    || { log "gcc -static of pause.c failed: apt-get install gcc libc6-dev"; exit 1; }

rm -rf "$out/bin"
mv "$out/bin.tmp" "$out/bin"
echo "$flags" >"$out/stamp"
# Binaries of other sources or flags are stale: 350 MB each.
find "$WORK/kube" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
log "built into $out/bin"
echo "$out/bin"
