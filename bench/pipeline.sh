#!/usr/bin/env bash
# Benchmark of replication: the same fio job (4 KiB random writes, queue depth 16, nbd engine)
# against the agent with capture only, with asynchronous replication through a process server
# to a master target, and with synchronous replication (--sync); all on 127.0.0.1, in one run.
# Reports IOPS, write latency (p50, p99) and the RPO the master target measured.
# Usage: bench/pipeline.sh [SECONDS_PER_JOB] [IMAGE_MIB]. With WRITE_DOCS=1 the table goes into
# docs/benchmarks.md. Needs: fio (nbd engine), curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
mib=${2:-512}
for tool in fio curl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install fio curl python3" >&2; exit 1; }
done
cargo build --release -q
bin=$PWD/target/release/boomerang
work=$(mktemp -d /var/tmp/boomerang-pipeline-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf '== %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }

"$bin" pki init "$work/ca" >/dev/null
"$bin" pki issue "$work/ca" --name ps1 --role process-server --host 127.0.0.1 >/dev/null
"$bin" pki issue "$work/ca" --name mt1 --role master-target --host 127.0.0.1 >/dev/null
"$bin" pki issue "$work/ca" --name web01 --role agent >/dev/null

run_job() {
  local mode=$1
  local dir=$work/$mode
  mkdir -p "$dir"
  truncate -s "${mib}M" "$dir/disk.img"
  local nbd ps mt metrics
  nbd=$(free_port); ps=$(free_port); mt=$(free_port); metrics=$(free_port)
  local ship=()
  if [ "$mode" != capture ]; then
    "$bin" master-target --listen "127.0.0.1:$mt" --tls "$work/ca/issued/mt1" --retention "$dir/retention" \
      --metrics "127.0.0.1:$metrics" >/dev/null 2>"$dir/mt.err" & pids+=($!)
    wait_port "$mt"
    "$bin" process-server --listen "127.0.0.1:$ps" --tls "$work/ca/issued/ps1" --cache "$dir/cache" \
      --master-target "127.0.0.1:$mt" >/dev/null 2>"$dir/ps.err" & pids+=($!)
    wait_port "$ps"
    ship=(--process-server "127.0.0.1:$ps" --tls "$work/ca/issued/web01")
    [ "$mode" = sync ] && ship+=(--sync)
  fi
  "$bin" agent --disk "d0=$dir/disk.img" --listen "127.0.0.1:$nbd" --log-dir "$dir/log" \
    --log-max 60GiB --mark-interval 1 "${ship[@]}" >/dev/null 2>"$dir/agent.err" & pids+=($!)
  local agent=$!
  wait_port "$nbd"
  log "$mode: randwrite 4k qd16, ${secs} s"
  fio --name="$mode" --ioengine=nbd --uri="nbd://127.0.0.1:$nbd/d0" --rw=randwrite --bs=4k --iodepth=16 \
    --size="${mib}M" --time_based --runtime="$secs" --ramp_time=2 --randseed=1 --output-format=json >"$dir/fio.json"
  if [ "$mode" != capture ]; then
    sleep 2
    curl -s "http://127.0.0.1:$metrics/metrics" >"$dir/metrics.txt"
  else
    : >"$dir/metrics.txt"
  fi
  kill "$agent" 2>/dev/null || true
}

for mode in capture async sync; do run_job "$mode"; done

python3 - "$work" "$secs" "$mib" <<'PY' | tee "$work/report.md"
import json, sys, re
work, secs, mib = sys.argv[1], sys.argv[2], sys.argv[3]
def fio(mode):
    text = open(f"{work}/{mode}/fio.json").read()
    w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return w["iops"], pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000
def metric(mode, name):
    for line in open(f"{work}/{mode}/metrics.txt"):
        m = re.match(rf'{name}{{stream="web01"}} (\S+)', line)
        if m:
            return float(m.group(1))
    return None
print(f"fio nbd engine, 4 KiB random writes at queue depth 16, {secs} s after 2 s ramp, {mib} MiB disk; agent, process server and master target on 127.0.0.1; marks every second.")
print()
print("| mode | IOPS | vs capture only | p50 latency | p99 latency | RPO at the end | worst RPO |")
print("| --- | --- | --- | --- | --- | --- | --- |")
base = fio("capture")[0]
for mode, label in [("capture", "capture only (no replication)"), ("async", "asynchronous replication"), ("sync", "synchronous replication (--sync)")]:
    iops, p50, p99 = fio(mode)
    rpo, worst = metric(mode, "boomerang_rpo_seconds"), metric(mode, "boomerang_rpo_worst_seconds")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f} s"
    print(f"| {label} | {iops:,.0f} | {iops/base:.2f}x | {p50:,.0f} us | {p99:,.0f} us | {fmt(rpo)} | {fmt(worst)} |")
PY
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  bench/write-docs.py 'Replication (`bench/pipeline.sh`)' "$work/report.md"
fi
