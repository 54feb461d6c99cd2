#!/usr/bin/env bash
# Stop the test cluster started by slurm/testing/start.sh STATE_DIR:  slurm/testing/stop.sh STATE_DIR
# Cancels its jobs, then ends what it started and nothing else: the daemons named by the pid
# files under STATE_DIR and every process started with SLURM_CONF=STATE_DIR/slurm.conf in its
# environment (slurmstepd and job tasks; start.sh exports it to the daemons), except this
# script's own ancestors. STATE_DIR is kept (logs); delete it if you like.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
[ -d "$1" ] || exit 0
STATE=$(cd "$1" && pwd)
export SLURM_CONF=$STATE/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin

if [ -f "$SLURM_CONF" ] && [ -s "$STATE/run/slurmctld.pid" ] \
    && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null; then
    timeout 10 scancel --quiet --partition=debug >/dev/null 2>&1 || true
fi

python3 - "$STATE" "$$" <<'EOF'
import os, signal, sys, time
state, me = sys.argv[1], int(sys.argv[2])
conf = f"SLURM_CONF={state}/slurm.conf".encode()

def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0

keep, pid = set(), me  # this script and its ancestors (a shell that exported SLURM_CONF)
while pid > 1:
    keep.add(pid)
    pid = ppid(pid)
keep.add(os.getpid())

targets = set()
for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
    try:
        targets.add(int(open(f"{state}/run/{name}.pid").read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if conf in f.read().split(b"\0"):
                    targets.add(int(entry))
        except OSError:
            pass
targets -= keep

def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False

for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in targets:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in targets):
        time.sleep(0.2)
    if not any(alive(p) for p in targets):
        break
EOF
rm -f "$STATE"/run/*.pid
echo "[slurm-test] stopped cluster in $STATE" >&2
