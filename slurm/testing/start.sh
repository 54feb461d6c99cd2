#!/usr/bin/env bash
# Start a two-node SLURM test cluster on this one machine:   slurm/testing/start.sh STATE_DIR
#
# Installs slurmctld, slurmd, slurm-client and munge from Debian when missing (root + apt-get),
# creates a munge key and a slurm.conf under STATE_DIR (free ports, state, spool, logs, munge
# socket all under STATE_DIR, so it touches no system-wide SLURM or munge set-up), starts munged,
# slurmctld and two slurmd (nodes n1 and n2, both on 127.0.0.1 with distinct ports) and waits
# until both nodes are idle. Idempotent: a cluster already running from STATE_DIR is reused.
# Clients use it with:   export SLURM_CONF=STATE_DIR/slurm.conf   (also in STATE_DIR/env)
# Stop it with slurm/testing/stop.sh STATE_DIR.
#
# Exit status: 0 running; 3 cannot install SLURM here (not root or no apt-get); 1 other failure.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
mkdir -p "$1"
STATE=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=$STATE/slurm.conf
CPUS=${MEMTRON_TEST_SLURM_CPUS:-1}   # per node; the two nodes share this machine's cores
WAIT_S=${MEMTRON_TEST_SLURM_WAIT_S:-90}
export SLURM_CONF=$CONF

log() { echo "[slurm-test] $*" >&2; }

# ------------------------------------------------------------------ packages
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "SLURM is not installed and cannot be installed here (need root and apt-get): ${need[*]}"
        exit 3
    fi
    log "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin:/sbin
if [ "$(id -u)" != 0 ]; then
    log "the test cluster runs its daemons as root (SlurmUser=root); run as root"
    exit 3
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ------------------------------------------------------------------ already running?
if [ -f "$CONF" ] && alive "$STATE/run/munged.pid" && alive "$STATE/run/slurmctld.pid" \
    && alive "$STATE/run/slurmd-n1.pid" && alive "$STATE/run/slurmd-n2.pid" \
    && scontrol ping >/dev/null 2>&1; then
    log "cluster already running from $STATE"
    exit 0
fi
"$HERE/stop.sh" "$STATE" >/dev/null 2>&1 || true   # half-started leftovers

mkdir -p "$STATE"/{munge,ctld,spool,run,log}
chmod 700 "$STATE/munge"

# ------------------------------------------------------------------ munge
if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$STATE/munge/munge.key"
munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"

# ------------------------------------------------------------------ slurm.conf
read -r P_CTLD P_N1 P_N2 < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
# Random first job id: concurrent test clusters then derive different master ports from it.
FIRST_JOB_ID=$(( (RANDOM * 32768 + RANDOM) % 900000 + 1000 ))
HOST=$(hostname -s)
sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|$P_CTLD|g" \
    -e "s|@SLURMD_PORT@|$P_N1|g" -e "s|@PORT_N1@|$P_N1|g" -e "s|@PORT_N2@|$P_N2|g" \
    -e "s|@CPUS@|$CPUS|g" -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" \
    "$HERE/slurm.conf.in" > "$CONF"
echo "export SLURM_CONF=$CONF" > "$STATE/env"

# ------------------------------------------------------------------ daemons
dump_logs() {
    for f in "$STATE"/log/*.log; do
        [ -f "$f" ] && { echo "----- $f"; tail -n 40 "$f"; } >&2
    done
}
slurmctld -f "$CONF" -c || { log "slurmctld failed to start"; dump_logs; exit 1; }
for node in n1 n2; do
    mkdir -p "$STATE/spool/$node"
    slurmd -f "$CONF" -N "$node" || { log "slurmd $node failed to start"; dump_logs; exit 1; }
done

deadline=$((SECONDS + WAIT_S))
while :; do
    states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    case "$states" in
        *n1=idle*n2=idle*) break ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
        log "nodes not idle after ${WAIT_S}s: ${states:-no answer from slurmctld}"
        dump_logs
        exit 1
    fi
    sleep 1
done
log "cluster up from $STATE: $states(SLURM_CONF=$CONF)"
