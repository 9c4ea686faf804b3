#!/usr/bin/env bash
# The test command behind `make test` and CI: static checks, then the three test tiers.
# Starts every server the tests need (PostgreSQL, Redis, Kafka) and stops them on exit;
# nothing started by hand is assumed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export BILTEN_TEST_RUN_DIR="${BILTEN_TEST_RUN_DIR:-$(mktemp -d /tmp/bilten-test.XXXXXX)}"
# The PostgreSQL server runs as the postgres user: it must be able to enter the run dir.
chmod 0755 "$BILTEN_TEST_RUN_DIR"
export BILTEN_PG_DIR="$BILTEN_TEST_RUN_DIR/pg" BILTEN_REDIS_DIR="$BILTEN_TEST_RUN_DIR/redis"
export BILTEN_KAFKA_DIR="$BILTEN_TEST_RUN_DIR/kafka"

cleanup() {
  bash dev/kafka.sh stop >/dev/null 2>&1 || true
  bash dev/redis.sh stop >/dev/null 2>&1 || true
  bash dev/postgres.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== static checks"
$BIN/ruff check services schema_registry tests scripts
$BIN/ruff format --check services schema_registry tests scripts docs
$BIN/mypy
$BIN/python scripts/proto.py check
$BIN/python scripts/proto.py lint
$BIN/python scripts/proto.py breaking "${BUF_AGAINST:-main}"

echo "== servers for the integration tiers"
bash dev/postgres.sh start >/dev/null
export BILTEN_TEST_POSTGRES_DSN="$(bash dev/postgres.sh dsn)"
export BILTEN_REQUIRE_SERVICES=1  # service-backed tests fail instead of skipping
bash dev/redis.sh start >/dev/null
eval "$(bash dev/redis.sh env)"
bash dev/kafka.sh start >/dev/null
eval "$(bash dev/kafka.sh env)"

echo "== tests"
set +e
# Each test has its own limit (pytest-timeout, pyproject.toml); this one bounds the run as
# a whole, so that a hang nothing else catches still ends with the output of what ran
# rather than at CI's outer limit with none. A normal run takes 10-15 min on 2 cores.
timeout --signal=TERM --kill-after=60 "${BILTEN_TEST_TIMEOUT:-2700}" \
  $BIN/pytest -q -n 2 --dist loadgroup -p no:cacheprovider --durations=25 "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
  echo "pytest ran past ${BILTEN_TEST_TIMEOUT:-2700} s and was stopped" >&2
fi
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
