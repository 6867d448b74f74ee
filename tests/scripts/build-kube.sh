#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from Debian bookworm's
# `kubernetes` source package (the only packaged source that still carries vendor/), once, into
#   ${FINETUNE_CACHE_DIR:-~/.cache/finetune-operator}/k8s-v1.20.2/bin/
# and installs the Debian packages the local control plane needs (etcd-server, rsync, Go 1.19,
# reflect2 1.0.2 sources). Idempotent; a file lock (flock) makes parallel callers wait for one build.
# With KUBE_BIN_DIR set, nothing is built: that directory must hold the three binaries.
# Prints the directory holding the binaries as the last line of stdout; progress goes to stderr.
set -euo pipefail

VERSION=v1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=${FINETUNE_CACHE_DIR:-${HOME:-/root}/.cache/finetune-operator}
OUT=$CACHE/k8s-$VERSION
BINS=(kube-apiserver kube-controller-manager kube-scheduler)
START=$(date +%s)

log() { echo "[build-kube $(( $(date +%s) - START ))s] $*" >&2; }

apt_install() {
  # Installs the named Debian packages when their files are missing; retries after `apt-get update`.
  local missing=("$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local opts=(-y -q -o DPkg::Lock::Timeout=600)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "${missing[@]}" >&2; then
    apt-get -q -o DPkg::Lock::Timeout=600 update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "${missing[@]}" >&2
  fi
}

need_runtime=()
command -v flock >/dev/null 2>&1 || { apt-get install -y -q util-linux >&2; }
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need_runtime+=(etcd-server)
command -v unshare >/dev/null 2>&1 || need_runtime+=(util-linux)
command -v openssl >/dev/null 2>&1 || need_runtime+=(openssl)
command -v setsid >/dev/null 2>&1 || need_runtime+=(util-linux)
# The default image map runs `python` images with the host's python3 (used by the tests).
[ -x /usr/bin/python3 ] || [ -x /usr/local/bin/python3 ] || need_runtime+=(python3)

mkdir -p "$CACHE"
exec 9>"$CACHE/k8s-$VERSION.lock"
if ! flock -n 9; then
  log "another process holds $CACHE/k8s-$VERSION.lock (building); waiting for it"
  flock 9
fi

apt_install "${need_runtime[@]}"

if [ -n "${KUBE_BIN_DIR:-}" ]; then
  for b in "${BINS[@]}"; do
    [ -x "$KUBE_BIN_DIR/$b" ] || { echo "KUBE_BIN_DIR=$KUBE_BIN_DIR lacks executable $b" >&2; exit 1; }
  done
  echo "$KUBE_BIN_DIR"
  exit 0
fi

if [ -f "$OUT/.complete" ]; then
  echo "$OUT/bin"
  exit 0
fi

log "cold build of Kubernetes $VERSION into $OUT (takes several minutes; cached afterwards)"
need_build=()
[ -x /usr/lib/go-1.19/bin/go ] || need_build+=(golang-1.19-go)
command -v rsync >/dev/null 2>&1 || need_build+=(rsync)
command -v make >/dev/null 2>&1 || need_build+=(make)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_build+=(golang-github-modern-go-reflect2-dev)
apt_install "${need_build[@]}"

WORK=$CACHE/k8s-$VERSION.work
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial" "$WORK/src"

# A private deb-src list derived from the system's sources (no host named here); system lists untouched.
SYS_SOURCES=/etc/apt/sources.list.d/debian.sources
if [ -f "$SYS_SOURCES" ]; then
  sed 's/^Types: deb$/Types: deb-src/' "$SYS_SOURCES" > "$WORK/apt/src.sources"
  APT_SRC_OPTS=(-o "Dir::Etc::sourcelist=$WORK/apt/src.sources")
else
  grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | sed 's/^deb /deb-src /' > "$WORK/apt/src.list"
  APT_SRC_OPTS=(-o "Dir::Etc::sourcelist=$WORK/apt/src.list")
fi
APT_SRC_OPTS+=(-o Dir::Etc::sourceparts=/dev/null -o "Dir::State::Lists=$WORK/apt/lists" -q)
log "fetching source index"
apt-get "${APT_SRC_OPTS[@]}" update >&2
log "downloading source package kubernetes=$DEB_VERSION"
(cd "$WORK/src" && apt-get "${APT_SRC_OPTS[@]}" source --download-only "kubernetes=$DEB_VERSION" >&2)
ORIG=$(ls "$WORK"/src/kubernetes_*.orig.tar.* | head -n1)
log "unpacking $(basename "$ORIG")"
mkdir -p "$WORK/k"
tar -xf "$ORIG" -C "$WORK/k" --strip-components=1

# Kubernetes 1.20 vendors reflect2 1.0.1, which crashes kube-apiserver under Go >= 1.18 when a
# custom resource is written; Debian's reflect2 1.0.2 sources fix that.
R2=$WORK/k/vendor/github.com/modern-go/reflect2
rm -f "$R2"/*.go "$R2"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R2"/
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R2"/ 2>/dev/null || true
rm -f "$R2"/*_test.go

log "compiling ${BINS[*]} with Go 1.19 (progress below)"
(
  cd "$WORK/k"
  export PATH=/usr/lib/go-1.19/bin:$PATH
  export GOCACHE=$WORK/gocache GOPATH=$WORK/gopath GOPROXY=off CGO_ENABLED=0 GOFLAGS=
  export KUBE_GIT_VERSION=$VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2
) &
BUILD_PID=$!
while kill -0 "$BUILD_PID" 2>/dev/null; do
  sleep 30
  kill -0 "$BUILD_PID" 2>/dev/null && log "still compiling"
done
wait "$BUILD_PID"

mkdir -p "$OUT/bin"
for b in "${BINS[@]}"; do
  f=$(find "$WORK/k/_output" -type f -name "$b" -perm -u+x | head -n1)
  [ -n "$f" ] || { echo "build produced no $b" >&2; exit 1; }
  install -m 0755 "$f" "$OUT/bin/$b"
done
"$OUT/bin/kube-apiserver" --version >&2
touch "$OUT/.complete"
rm -rf "$WORK"
log "done: $OUT/bin"
echo "$OUT/bin"
