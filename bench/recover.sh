#!/usr/bin/env bash
# Benchmark of instant recovery, all on 127.0.0.1, in one run. For a 4 GiB and a 64 GiB disk
# (DATA_MIB of random data at spread offsets, the rest never written), replicated through
# agent -> process server -> master target:
# - the time from starting `master-target recover` to the first 4 KiB read served over NBD
#   (qemu-io), the median of ROUNDS runs, each into a new target;
# - for the 4 GiB disk, the time to materialize it first (`master-target export`), and to copy
#   its replica image with `cp --sparse=always` (the least a restore that copies first costs).
# Usage: bench/recover.sh [DATA_MIB] [ROUNDS]. With WRITE_DOCS=1 the report goes into
# docs/benchmarks.md. Needs: qemu-io (qemu-utils), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
data_mib=${1:-256}
rounds=${2:-5}
for tool in qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install qemu-utils python3" >&2; exit 1; }
done
source bench/common.sh
bench_start recover

"$bin" pki init "$work/ca" >/dev/null
"$bin" pki issue "$work/ca" --name ps1 --role process-server --host 127.0.0.1 >/dev/null
"$bin" pki issue "$work/ca" --name mt1 --role master-target --host 127.0.0.1 >/dev/null
"$bin" pki issue "$work/ca" --name web01 --role agent >/dev/null

# Replicates a disk of $2 GiB into $1/retention, until its first recovery point.
replicate() {
  local dir=$1 gib=$2
  mkdir -p "$dir"
  truncate -s "${gib}G" "$dir/disk.img"
  local step=$(( gib * 1024 / data_mib ))
  for i in $(seq 0 $(( data_mib - 1 ))); do
    dd if=/dev/urandom of="$dir/disk.img" bs=1M count=1 seek=$(( i * step )) conv=notrunc status=none
  done
  local mt ps
  mt=$(free_port); ps=$(free_port)
  "$bin" master-target --listen "127.0.0.1:$mt" --tls "$work/ca/issued/mt1" --retention "$dir/retention" \
    >/dev/null 2>"$dir/mt.err" & pids+=($!); local mt_pid=$!
  wait_port "$mt"
  "$bin" process-server --listen "127.0.0.1:$ps" --tls "$work/ca/issued/ps1" --cache "$dir/cache" \
    --master-target "127.0.0.1:$mt" >/dev/null 2>"$dir/ps.err" & pids+=($!); local ps_pid=$!
  wait_port "$ps"
  "$bin" agent --disk "d0=$dir/disk.img" --listen 127.0.0.1:0 --log-dir "$dir/log" \
    --process-server "127.0.0.1:$ps" --tls "$work/ca/issued/web01" --mark-interval 1 \
    >/dev/null 2>"$dir/agent.err" & pids+=($!); local agent_pid=$!
  local start
  start=$(now)
  until "$bin" master-target points "$dir/retention" --machine web01 --disk d0 --output json 2>/dev/null | grep -q '"seq"'; do
    sleep 0.5
  done
  log "${gib} GiB disk replicated to its first point in $(elapsed "$start") s"
  for p in "$agent_pid" "$ps_pid" "$mt_pid"; do kill "$p"; wait "$p" 2>/dev/null || true; done
}

# The seconds from starting a recovery of $1 to the first read served, one round.
first_read() {
  local dir=$1 port
  port=$(free_port)
  rm -f "$dir/target.img" "$dir/target.img.held" "$dir/target.img.recovery"
  local start
  start=$(now)
  "$bin" master-target recover "$dir/retention" --machine web01 --disk d0 --at latest \
    --target "$dir/target.img" --listen "127.0.0.1:$port" >/dev/null 2>"$dir/recover.err" & local pid=$!
  until qemu-io -f raw -r -c 'read 0 4k' "nbd://127.0.0.1:$port/d0" >/dev/null 2>&1; do sleep 0.002; done
  elapsed "$start"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

report=$work/report.md
declare -A first
for gib in 4 64; do
  log "replicating a ${gib} GiB disk (${data_mib} MiB of data)"
  replicate "$work/d$gib" "$gib"
  first[$gib]=$(for _ in $(seq 1 "$rounds"); do first_read "$work/d$gib"; done | median)
  log "${gib} GiB: first read after ${first[$gib]} s"
done
log "materializing the 4 GiB disk"
start=$(now)
"$bin" master-target export "$work/d4/retention" --machine web01 --disk d0 --at latest --out "$work/export.img" >/dev/null
export_s=$(elapsed "$start")
start=$(now)
cp --sparse=always "$work/d4/retention/replicas/web01/d0.img" "$work/copy.img"
sync "$work/copy.img"
cp_s=$(elapsed "$start")

python3 - "$report" "${first[4]}" "${first[64]}" "$export_s" "$cp_s" "$data_mib" "$rounds" <<'EOF'
import sys
out, f4, f64, export, cp, data, rounds = sys.argv[1], *map(float, sys.argv[2:6]), sys.argv[6], sys.argv[7]
with open(out, "w") as f:
    f.write(f"Disks of 4 GiB and 64 GiB with {data} MiB of data each; the first read is the median of {rounds} runs, each into a new target.\n\n")
    f.write("| Measure | Seconds |\n|---|---|\n")
    f.write(f"| first read served, 4 GiB disk | {f4:.3f} |\n")
    f.write(f"| first read served, 64 GiB disk | {f64:.3f} |\n")
    f.write(f"| materialize the 4 GiB disk first (`master-target export`) | {export:.3f} |\n")
    f.write(f"| copy its replica image (`cp --sparse=always` + sync) | {cp:.3f} |\n\n")
    f.write(f"- 64 GiB / 4 GiB time to the first read: **{f64 / f4:.2f}x** (target: within 1.2x).\n")
    f.write(f"- First read / materializing first: **1/{export / f4:.0f}** (target: under 1/50); against the plain copy: 1/{cp / f4:.0f}.\n")
EOF
cat "$report"
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  python3 bench/write-docs.py 'Instant recovery (`bench/recover.sh`)' "$report"
fi
