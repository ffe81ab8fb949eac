#!/usr/bin/env bash
# Install stunnel (Debian's stunnel4 package, unpacked, no system install) under .tools/ (gitignored):
# the TLS terminator the Kafka security tests put in front of the embedded broker, which
# speaks no TLS itself (docs/operations.md "Security: Kafka"; infra/stunnel.py starts it).
#
# `apt-get download` fetches the .deb (refreshing the package lists once when they do not
# know it) and `dpkg -x` unpacks it: the binary links the system's OpenSSL. Idempotent: a
# second run only checks. Prints the binary's path last.
#
#   scripts/install_stunnel.sh            # install if missing
#   HISAM_TOOLS=DIR scripts/...           # elsewhere (infra/stunnel.py reads the same variable)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${HISAM_TOOLS:-.tools}
TARGET="$TOOLS/stunnel"
BIN="$TARGET/usr/bin/stunnel4"

if ! "$BIN" -version >/dev/null 2>&1; then
  rm -rf "$TARGET.tmp"
  mkdir -p "$TARGET.tmp"
  fetch() { (cd "$TARGET.tmp" && apt-get download -q stunnel4 >/dev/null 2>&1); }
  if ! fetch; then
    # A fresh machine's package lists may not know the package yet.
    apt-get update -q >/dev/null 2>&1 || true
    if ! fetch; then
      echo "could not fetch Debian's stunnel4 package with apt-get download (apt sources reachable?)" >&2
      exit 1
    fi
  fi
  dpkg -x "$TARGET.tmp"/stunnel4_*.deb "$TARGET.tmp"
  rm -f "$TARGET.tmp"/stunnel4_*.deb
  rm -rf "$TARGET"
  mv "$TARGET.tmp" "$TARGET"
  if ! "$BIN" -version >/dev/null 2>&1; then
    "$BIN" -version >&2 || true
    echo "the unpacked stunnel4 does not run (missing system libraries?)" >&2
    exit 1
  fi
fi
echo "$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
