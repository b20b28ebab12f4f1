# Shared helpers for snapgate's scripts. Source it; do not run it.

# ensure_packages PKG...: apt-get install whatever of PKG... is missing.
# Idempotent: installs nothing (and touches no network) when all are present.
ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# repo_root: the checkout this script belongs to.
repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}
