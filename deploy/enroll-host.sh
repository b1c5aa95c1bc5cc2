#!/usr/bin/env bash
# Enroll one host: run on the operator's machine; it creates a join token and
# runs the enrollment on the host over ssh. Usage:
#   deploy/enroll-host.sh HOST COORDINATOR_ADDR [--label k=v]...
# Needs: rekey (with REKEY_OPERATOR_DIR set), ssh access to HOST, rekey-agent
# installed on HOST. The token travels only over ssh, on the remote command's
# stdin (never in a command line, local or remote: `ps` would show it), and is
# single use.
set -euo pipefail
host=${1:?usage: enroll-host.sh HOST COORDINATOR_ADDR [--label k=v]...}
coord=${2:?usage: enroll-host.sh HOST COORDINATOR_ADDR [--label k=v]...}
shift 2
json=$(rekey token create --host "$host" --ttl 15m "$@" -o json)
token=$(printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
fp=$(printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_fingerprint"])')
printf '%s\n' "$token" | ssh "$host" "sudo rekey-agent enroll --token - --coordinator '$coord' --ca-fingerprint '$fp' --state-dir /var/lib/rekey-agent && sudo systemctl enable --now rekey-agent"
echo "enrolled $host; check with: rekey agents"
