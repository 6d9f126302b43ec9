#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test.
#   scripts/test.sh              all tests
#   scripts/test.sh store::      only tests whose name matches
# Tests that talk to Mosquitto / PostgreSQL read MQTT_URL / DATABASE_URL; when
# those are unset they use an embedded equivalent, when set they must reach it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/venv.sh
cargo test --locked "$@"
