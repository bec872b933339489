#!/usr/bin/env bash
# Put `vdev` on PATH, as the README's commands expect: a small launcher,
# $VDEV_BIN_DIR/vdev (default /usr/local/bin/vdev), that runs this checkout's
# .venv/bin/vdev, and bash completion generated from the command line
# (`vdev completion bash`) in $VDEV_COMPLETION_DIR (default
# /usr/local/share/bash-completion/completions, read by bash-completion).
#
# Run by scripts/setup.sh (skip it with VDEV_NO_LAUNCHER=1).  A `vdev` there
# that is not such a launcher is left alone.  The launcher runs the checkout
# whose set-up ran last.  Without write access it only says what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
venv_vdev="$repo/.venv/bin/vdev"
bindir=${VDEV_BIN_DIR:-/usr/local/bin}
compdir=${VDEV_COMPLETION_DIR:-/usr/local/share/bash-completion/completions}
launcher="$bindir/vdev"
marker="# vdev launcher, written by scripts/install-launcher.sh"

if [ ! -x "$venv_vdev" ]; then
    echo "install-launcher: $venv_vdev does not exist; run scripts/setup.sh first" >&2
    exit 1
fi
if [ -e "$launcher" ] && ! grep -qF "$marker" "$launcher" 2>/dev/null; then
    echo "install-launcher: $launcher exists and is not a vdev launcher: left alone." >&2
    echo "install-launcher: run $venv_vdev, or: export PATH=\"$repo/.venv/bin:\$PATH\"" >&2
    exit 0
fi
if ! mkdir -p "$bindir" 2>/dev/null || [ ! -w "$bindir" ]; then
    echo "install-launcher: cannot write to $bindir (not root?)." >&2
    echo "install-launcher: run $venv_vdev, or: export PATH=\"$repo/.venv/bin:\$PATH\"" >&2
    exit 0
fi
tmp=$(mktemp "$bindir/.vdev.XXXXXX")
cat > "$tmp" <<EOF
#!/bin/sh
$marker
# Runs the vdev of the checkout $repo.
exec "$venv_vdev" "\$@"
EOF
chmod 755 "$tmp"
mv -f "$tmp" "$launcher"
echo "install-launcher: $launcher runs $venv_vdev" >&2
case ":$PATH:" in
    *":$bindir:"*) ;;
    *) echo "install-launcher: $bindir is not on your PATH; add it: export PATH=\"$bindir:\$PATH\"" >&2 ;;
esac

if mkdir -p "$compdir" 2>/dev/null && [ -w "$compdir" ]; then
    tmp=$(mktemp "$compdir/.vdev.XXXXXX")
    if "$venv_vdev" completion bash > "$tmp"; then
        chmod 644 "$tmp"
        mv -f "$tmp" "$compdir/vdev"
        echo "install-launcher: bash completion in $compdir/vdev (new shells; now: source $compdir/vdev)" >&2
    else
        rm -f "$tmp"
        echo "install-launcher: could not generate the bash completion" >&2
    fi
fi
