#!/usr/bin/env bash
# Browser test: matrix-js-sdk with its Rust crypto (the stack of Element Web) in headless
# Debian Chromium, against a real outpost node on loopback. Installs what it needs (Chromium
# from Debian, npm packages from package-lock.json), builds the node and the page, runs the
# scenario (register/login two users, encrypted DM, messages decrypted in the browser, media),
# then fails on any 5xx / unexpected 404 / M_UNRECOGNIZED in the node's request log.
#
#   tests/browser/run.sh          # exit 0 = passed
#   KEEP=1 tests/browser/run.sh   # keep the temp dir with the node's data and log
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$HERE"

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # `npm ci` trips over npm's lock files without platform-specific optional packages (rollup);
  # `npm install` honours the pinned versions and the lock file and adds what this platform needs.
  npm install --no-audit --no-fund --loglevel=error
fi
npx vite build

# The same target set as scripts/test, so this is a no-op after it (a narrower build would
# unify features differently and recompile half the dependency tree).
(cd "$ROOT" && cargo build --locked --workspace --all-targets)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/outpost"

TMP="$(mktemp -d -t outpost-browser-XXXXXX)"
LOG="$TMP/node.log"
NODE_PID=""
cleanup() {
  if [ -n "$NODE_PID" ]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$TMP"; else echo "kept $TMP"; fi
}
trap cleanup EXIT

# Port 0: the node picks a free port and logs its URL.
env -u RUST_LOG NO_COLOR=1 RUST_LOG="info,outpost::http=debug,ruma_state_res=warn" \
  "$BIN" run --data-dir "$TMP/data" --client-addr 127.0.0.1:0 \
  --no-mdns --listen /ip4/127.0.0.1/udp/0/quic-v1 --listen /ip4/127.0.0.1/tcp/0 >"$LOG" 2>&1 &
NODE_PID=$!
URL=""
for _ in $(seq 1 200); do
  URL="$(grep -o 'client_url=http://127\.0\.0\.1:[0-9]*' "$LOG" | head -n1 | cut -d= -f2 || true)"
  [ -n "$URL" ] && break
  kill -0 "$NODE_PID" 2>/dev/null || { cat "$LOG"; echo "outpost exited early"; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG"; echo "outpost did not report its URL"; exit 1; }
echo "outpost at $URL"

status=0
node run-test.mjs --homeserver "$URL" --log "$LOG" || status=$?
if [ "$status" -ne 0 ]; then
  echo "----- last 80 lines of the node log -----"
  tail -n 80 "$LOG"
fi
exit "$status"
