#!/usr/bin/env bash
# Start/stop the services hisam needs outside of pytest (tests start their own through
# fixtures): the Kafka-compatible broker (noida-db, from PyPI) and a private Redis, both
# on free 127.0.0.1 ports with their data under one directory. Never uses a system Redis
# on 6379, which other software may rely on.
#
#   scripts/services.sh install      # apt-get install redis-server when missing (needs root)
#   scripts/services.sh start [DIR]  # start both; writes DIR/env (HISAM_KAFKA_BOOTSTRAP, HISAM_REDIS_URL)
#   scripts/services.sh stop  [DIR]  # stop both
#   scripts/services.sh env   [DIR]  # print the exports for the running services
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HISAM_VENV:-.venv}
CMD=${1:-}
DIR=${2:-${HISAM_SERVICES_DIR:-${TMPDIR:-/tmp}/hisam-services}}

free_port() {
  "$VENV/bin/python" -c 'from infra.services import free_port; print(free_port())'
}

wait_port() {  # host port seconds
  "$VENV/bin/python" -c "import sys; from infra.services import wait_for_port; wait_for_port('$1', $2, $3)"
}

install_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server present: $(command -v redis-server)"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "redis-server is missing; install it as root: apt-get install -y redis-server" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
  # The package enables a system service on 6379; hisam never uses it.
}

start() {
  mkdir -p "$DIR/kafka" "$DIR/redis"
  if [ -f "$DIR/env" ]; then
    echo "services already started in $DIR (stop them first)" >&2
    return 1
  fi
  command -v redis-server >/dev/null 2>&1 || install_redis
  [ -x "$VENV/bin/noida-db" ] || { echo "noida-db missing: run scripts/setup.sh" >&2; return 1; }
  local kport rport
  kport=$(free_port)
  "$VENV/bin/noida-db" up --only kafka --kafka-port "$kport" --data-dir "$DIR/kafka" >/dev/null 2>&1
  wait_port 127.0.0.1 "$kport" 20
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR/redis" \
    --logfile "$DIR/redis/redis.log" --daemonize yes --pidfile "$DIR/redis/redis.pid"
  wait_port 127.0.0.1 "$rport" 10
  cat > "$DIR/env" <<ENV
export HISAM_KAFKA_BOOTSTRAP=127.0.0.1:$kport
export HISAM_REDIS_URL=redis://127.0.0.1:$rport/0
ENV
  cat "$DIR/env"
}

stop() {
  if [ -d "$DIR/kafka" ]; then
    "$VENV/bin/noida-db" down --data-dir "$DIR/kafka" >/dev/null 2>&1 || true
  fi
  if [ -f "$DIR/redis/redis.pid" ]; then
    kill "$(cat "$DIR/redis/redis.pid")" 2>/dev/null || true
    rm -f "$DIR/redis/redis.pid"
  fi
  rm -f "$DIR/env"
  echo "services in $DIR stopped"
}

case "$CMD" in
  install) install_redis ;;
  start) start ;;
  stop) stop ;;
  env) cat "$DIR/env" ;;
  *) echo "usage: $0 install|start|stop|env [DIR]" >&2; exit 2 ;;
esac
