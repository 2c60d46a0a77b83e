#!/usr/bin/env bash
# Benchmark of a recovery site that keeps its replica stores on Azure Blob (Azurite on
# loopback) against one that keeps them in a local directory, in one run, each with the same
# agent -> process server -> master target pipeline and sealed stores:
# - initial sync: an image (half compressible) copied until its first recovery point is in the
#   store; MB/s;
# - churn: 64 KiB random writes capped at RATE MB/s for SECONDS; the recovery point lag (the
#   age of the newest point's mark, sampled every 0.5 s: p50, p99, max) and, once the churn
#   ends, how long a new mark takes to become a point;
# - failover materialization: the newest point written as a fixed VHD (`master-target export
#   --format vhd`); MB/s;
# - dedup: a second machine cloned from the same template image; the bytes of chunks held for
#   both over those held for the first (`store usage`), after the first's churn.
# Usage: bench/azure.sh [IMAGE_MIB] [SECONDS] [RATE_MB]. With WRITE_DOCS=1 the report goes
# into docs/benchmarks.md. Needs: fio (nbd engine), python3, azurite-blob (npm azurite).
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-512}
secs=${2:-20}
rate=${3:-20}
for tool in fio python3 azurite-blob; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install fio python3; npm install -g azurite" >&2; exit 1; }
done
source bench/common.sh
bench_start azure

# Azurite, its data on this machine's disk.
azport=$(free_port)
mkdir -p "$work/azurite"
azurite-blob --blobHost 127.0.0.1 --blobPort "$azport" --location "$work/azurite" \
  --disableTelemetry --skipApiVersionCheck --loose --silent >"$work/azurite.log" 2>&1 & pids+=($!)
wait_port "$azport"
export AZURE_STORAGE_USE_EMULATOR=true
export AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:$azport

"$bin" pki init "$work/ca" >/dev/null
for name in ps1:process-server mt1:master-target; do
  "$bin" pki issue "$work/ca" --name "${name%%:*}" --role "${name#*:}" --host 127.0.0.1 >/dev/null
done
for m in web01 web02; do "$bin" pki issue "$work/ca" --name "$m" --role agent >/dev/null; done
"$bin" store keygen "$work/site.key" >/dev/null

log "writing the template image (${mib} MiB, half compressible)"
truncate -s "${mib}M" "$work/template.img"
fio --name=fill --filename="$work/template.img" --rw=write --bs=1m --size="${mib}M" \
  --buffer_compress_percentage=50 --refill_buffers --end_fsync=1 --output=/dev/null

# The points of machine $2's disk on the master target of site directory $1, as JSON.
points() { "$bin" master-target points "$1/retention" --machine "$2" --disk d0 --output json 2>/dev/null || true; }
# The seq of the newest point made in the store (a checkpoint), 0 if none (or none listed yet).
checkpoint_seq() {
  points "$1" "$2" | python3 -c 'import json, sys
try:
    listed = json.load(sys.stdin)
except ValueError:
    listed = []
p = [x for x in listed if isinstance(x, dict) and x.get("checkpoint")] if isinstance(listed, list) else []
print(p[-1]["seq"] if p else 0)'
}
# Waits (10 minutes at most) until machine $2 has a point made in the store at seq $3 or later.
wait_checkpoint() {
  local deadline=$(( $(date +%s) + 600 ))
  until [ "$(checkpoint_seq "$1" "$2")" -ge "$3" ]; do
    for p in "$mt_pid" "$ps_pid" "$agent_pid"; do
      kill -0 "$p" 2>/dev/null || { echo "a process of the pipeline stopped; see $1/*.err" >&2; exit 1; }
    done
    [ "$(date +%s)" -lt "$deadline" ] || { echo "no point of $2 at seq $3 within 10 minutes; see $1/*.err" >&2; exit 1; }
    sleep 0.1
  done
}
# Starts machine $2's agent on image $3 for site directory $1; sets agent_pid, nbd.
start_agent() {
  nbd=$(free_port)
  "$bin" agent --disk "d0=$3" --listen "127.0.0.1:$nbd" --log-dir "$1/log-$2" --mark-interval 0.5 \
    --process-server "$ps_addr" --tls "$work/ca/issued/$2" --name "$2" >/dev/null 2>"$1/agent-$2.err" & pids+=($!)
  agent_pid=$!
  wait_port "$nbd"
}
# The bytes of chunks held for machine $2's store under root $1 (its group's, the stores under
# one root being one group).
chunk_bytes() {
  "$bin" store usage "$1/$2/lineage-0" --key-file "$work/site.key" --output json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["chunk_bytes"])'
}

# One site: $1 its name (local or azure), $2 its store root.
run_site() {
  local kind=$1 root=$2
  local dir=$work/$kind
  mkdir -p "$dir"
  local t0 mt_metrics
  start_servers "$dir" --store-root "$root" --store-key-file "$work/site.key" --point-every 1
  cp --sparse=always "$work/template.img" "$dir/web01.img"
  cp --sparse=always "$work/template.img" "$dir/web02.img"

  log "$kind: initial sync of web01 to its first point"
  t0=$(now)
  start_agent "$dir" web01 "$dir/web01.img"
  wait_checkpoint "$dir" web01 1
  echo "$kind initial $(elapsed "$t0")" >>"$work/results"

  log "$kind: ${rate} MB/s of 64 KiB random writes for ${secs} s"
  rm -f "$dir/churn-done"
  python3 - "$bin" "$dir" "$dir/churn-done" >"$dir/lags.txt" <<'EOF' &
import json, subprocess, sys, time
bin, dir, stop = sys.argv[1:4]
import os
# One sample every 0.5 s whatever a listing takes, so that both sites are sampled alike.
next_at = time.monotonic()
while not os.path.exists(stop):
    next_at += 0.5
    out = subprocess.run([bin, "master-target", "points", f"{dir}/retention", "--machine", "web01",
                          "--disk", "d0", "--output", "json"], capture_output=True, text=True).stdout
    try:
        listed = json.loads(out)
    except ValueError:
        listed = []
    made = [p for p in listed if isinstance(p, dict) and p.get("checkpoint") and p.get("time_unix_ns")] if isinstance(listed, list) else []
    if made:
        print(f"{time.time() - made[-1]['time_unix_ns'] / 1e9:.3f}", flush=True)
    time.sleep(max(0.0, next_at - time.monotonic()))
EOF
  local sampler=$!
  fio --name=churn --ioengine=nbd --uri="nbd://127.0.0.1:$nbd/d0" --rw=randwrite --bs=64k --iodepth=4 \
    --rate="${rate}m" --size="${mib}M" --time_based --runtime="$secs" --randseed=1 --output=/dev/null
  local mark
  mark=$("$bin" agent mark --log-dir "$dir/log-web01" --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["seq"])')
  t0=$(now)
  wait_checkpoint "$dir" web01 "$mark"
  echo "$kind last-mark $(elapsed "$t0")" >>"$work/results"
  touch "$dir/churn-done"
  wait "$sampler" || true
  python3 - "$kind" "$dir/lags.txt" >>"$work/results" <<'EOF'
import sys
kind, path = sys.argv[1:3]
lags = sorted(float(l) for l in open(path) if l.strip())
pick = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))] if lags else float("nan")
print(f"{kind} lag-p50 {pick(0.5):.3f}")
print(f"{kind} lag-p99 {pick(0.99):.3f}")
print(f"{kind} lag-max {lags[-1] if lags else float('nan'):.3f}")
EOF

  log "$kind: materializing the newest point as a fixed VHD"
  t0=$(now)
  "$bin" master-target export "$dir/retention" --machine web01 --disk d0 --at latest --format vhd \
    --out "$dir/web01.vhd" >/dev/null
  echo "$kind export $(elapsed "$t0")" >>"$work/results"
  rm -f "$dir/web01.vhd"
  kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true

  log "$kind: web02, cloned from the same template"
  echo "$kind stored-one $(chunk_bytes "$root" web01)" >>"$work/results"
  start_agent "$dir" web02 "$dir/web02.img"
  wait_checkpoint "$dir" web02 1
  echo "$kind stored-two $(chunk_bytes "$root" web02)" >>"$work/results"
  awk '/^VmHWM/ { print k " mt-rss-kib " $2 }' k="$kind" "/proc/$mt_pid/status" >>"$work/results"
  kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true
}

run_site local "$work/local/stores"
run_site azure "azure://bench-$$/site-b"

report=$work/report.md
python3 - "$work/results" "$report" "$mib" "$secs" "$rate" <<'EOF'
import sys
results, out, mib, secs, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
r = {}
for line in open(results):
    kind, what, value = line.split()
    r[(kind, what)] = float(value)
get = lambda k, w: r[(k, w)]
rows = [
    ("initial sync to the first point, MB/s", lambda k: mib * 1.048576 / get(k, "initial"), "higher"),
    (f"point lag under {rate} MB/s churn, p50 s", lambda k: get(k, "lag-p50"), "lower"),
    (f"point lag under {rate} MB/s churn, p99 s", lambda k: get(k, "lag-p99"), "lower"),
    (f"point lag under {rate} MB/s churn, max s", lambda k: get(k, "lag-max"), "lower"),
    ("a mark after the churn to its point, s", lambda k: get(k, "last-mark"), "lower"),
    ("failover materialization (fixed VHD), MB/s", lambda k: mib * 1.048576 / get(k, "export"), "higher"),
    ("chunk bytes held for web01 and its clone web02 / for web01", lambda k: get(k, "stored-two") / get(k, "stored-one"), "lower"),
    ("master target peak RSS, MiB", lambda k: get(k, "mt-rss-kib") / 1024, "lower"),
]
with open(out, "w") as f:
    f.write(f"A {mib:.0f} MiB image (half compressible), sealed stores, a point at most every second; churn of 64 KiB random writes at {rate} MB/s for {secs} s; Azure Blob is Azurite on the same machine.\n\n")
    f.write("| Measure | Local directory | Azure Blob (Azurite) | Azure / local |\n|---|---|---|---|\n")
    for name, value, _ in rows:
        a, b = value("local"), value("azure")
        ratio = f"{b / a:.2f}x" if a else "-"
        f.write(f"| {name} | {a:.2f} | {b:.2f} | {ratio} |\n")
EOF
cat "$report"
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  python3 bench/write-docs.py 'Azure site (`bench/azure.sh`)' "$report"
fi
