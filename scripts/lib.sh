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

# ensure_node_modules SRC DEST: the npm packages SRC/package-lock.json pins,
# installed in DEST/node_modules (`npm ci`, install scripts off). Cached: does
# nothing while DEST was installed from the same lock file. Prints DEST.
ensure_node_modules() {
    local src=$1 dest=$2 hash
    hash=$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$dest/.installed" 2>/dev/null)" != "$hash" ]; then
        echo "==> npm ci in $dest" >&2
        rm -rf "$dest"
        mkdir -p "$dest"
        cp "$src/package.json" "$src/package-lock.json" "$dest/"
        (cd "$dest" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
        echo "$hash" >"$dest/.installed"
    fi
    echo "$dest"
}
