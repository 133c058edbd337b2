#!/usr/bin/env bash
# The README's first command: start fleetd (if it is not running), run an 8x2 fleet of the
# bundled SMP guest, show it healthy, and say how to look around and stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PATH="$PWD/$BIN:$PATH"

sock=$(python3 -c 'import sys; sys.path.insert(0, "."); from fleetd.paths import default_socket; print(default_socket())')
state=$(python3 -c 'import sys; sys.path.insert(0, "."); from fleetd.paths import default_state_dir; print(default_state_dir())')
mkdir -p "$state"
log="$state/fleetd.log"

if fleetctl info >/dev/null 2>&1; then
  echo "fleetd already running at $sock"
else
  echo "starting fleetd (socket $sock, state $state, log $log)"
  setsid nohup fleetd >>"$log" 2>&1 < /dev/null &
  for _ in $(seq 100); do fleetctl info >/dev/null 2>&1 && break; sleep 0.1; done
  fleetctl info >/dev/null || { echo "fleetd did not start; see $log"; tail -20 "$log"; exit 1; }
fi
fleetctl info | sed -n '1,12p'
fleetctl rm demo >/dev/null 2>&1 || true
echo
echo "$ fleetctl start --name demo --replicas 8 --cpus 2"
fleetctl start --name demo --replicas 8 --cpus 2
echo
echo "$ fleetctl ps"
fleetctl ps
cat <<MSG

All 8 replicas above are healthy: each guest reported both vCPUs online and is sending
per-CPU heartbeats; each vCPU thread is pinned to the host CPU shown.

Look around:   source .venv/bin/activate
               fleetctl logs -f demo-0        # the guest's serial console log
               fleetctl console demo-0        # interactive (type: panic, hang, stall 1, exit 3; Ctrl-] detaches)
               fleetctl events -f             # every state/health change as it happens
               fleetctl inspect demo-0        # vCPU threads, host CPUs, health checks
               fleetctl inject demo-3 kill    # SIGKILL its QEMU: watch it get detected and restarted
Stop it all:   make stop                      # = fleetctl daemon stop --stop-guests
MSG
