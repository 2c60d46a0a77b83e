#!/usr/bin/env bash
# Benchmark of replication, all on 127.0.0.1, in one run:
# - the same fio job (4 KiB random writes, queue depth 16, nbd engine) against the agent with
#   capture only, asynchronous replication (agent -> process server -> master target) and
#   synchronous replication (--sync): IOPS, write latency, RPO;
# - replication lag (p50, p99, max) under 64 KiB random-write churn capped at 20 MB/s, 100 MB/s
#   and uncapped;
# - the initial sync of an image against rsync --whole-file (to an rsync daemon) and nbdcopy;
# - the peak RSS of each process.
# Usage: bench/pipeline.sh [SECONDS_PER_JOB] [IMAGE_MIB] [COPY_MIB]. With WRITE_DOCS=1 the
# report goes into docs/benchmarks.md. Needs: fio (nbd engine), curl, python3, rsync, nbdkit,
# nbdcopy.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
mib=${2:-512}
copy_mib=${3:-4096}
for tool in fio curl python3 rsync nbdkit nbdcopy; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install fio curl python3 rsync nbdkit libnbd-bin" >&2; exit 1; }
done
source bench/common.sh
bench_start pipeline

"$bin" pki init "$work/ca" >/dev/null
"$bin" pki issue "$work/ca" --name ps1 --role process-server --host 127.0.0.1 >/dev/null
"$bin" pki issue "$work/ca" --name mt1 --role master-target --host 127.0.0.1 >/dev/null
"$bin" pki issue "$work/ca" --name web01 --role agent >/dev/null


# Peak RSS (KiB) of a running process, appended to $work/rss as "ROLE KIB".
peak_rss() { awk -v role="$1" '/^VmHWM/ { print role, $2 }' "/proc/$2/status" >>"$work/rss" 2>/dev/null || true; }

# CPU seconds (user + system) a running process has used, appended to $work/cpu as
# "JOB ROLE SECONDS".
cpu_time() {
  local ticks
  ticks=$(getconf CLK_TCK)
  awk -v job="$1" -v role="$2" -v hz="$ticks" '{ print job, role, ($14 + $15) / hz }' "/proc/$3/stat" >>"$work/cpu" 2>/dev/null || true
}

# Stops the processes of job $1, recording their peak RSS and CPU time first.
stop_job() {
  cpu_time "$1" agent "$agent_pid"
  [ -n "${ps_pid:-}" ] && cpu_time "$1" process-server "$ps_pid"
  [ -n "${mt_pid:-}" ] && cpu_time "$1" master-target "$mt_pid"
  peak_rss agent "$agent_pid"
  [ -n "${ps_pid:-}" ] && peak_rss process-server "$ps_pid"
  [ -n "${mt_pid:-}" ] && peak_rss master-target "$mt_pid"
  for p in "$agent_pid" ${ps_pid:-} ${mt_pid:-}; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  ps_pid=; mt_pid=
}

# Samples the master target's RPO gauges every 0.1 s into $1 until the file $2 exists.
sample_rpo() {
  local out=$1 stop=$2
  while [ ! -e "$stop" ]; do
    curl -s "http://127.0.0.1:$mt_metrics/metrics" | awk '/^boomerang_(rpo_seconds|last_mark_seq)\{/ { printf "%s ", $2 } END { print "" }' >>"$out"
    sleep 0.1
  done
}

# Frees the space of job directory $1 but for its replica store: deleting the store's many
# chunk files right before the next job would make this file system (ext4 without a journal
# here) skip recently freed inodes at every file creation, a cost of the benchmark, not of a
# retention volume in use. Stores go at the end.
shed() {
  rm -rf "$1"/*.img "$1/log" "$1/cache" "$1/retention/incoming" "$1"/retention/replicas/*/*.img
}

# One fio job through the agent. $1: mode (capture, async, sync, or churn-RATE for asynchronous
# replication under 64 KiB random writes capped at RATE MB/s, 0 meaning no cap).
run_job() {
  local mode=$1
  local dir=$work/$mode
  mkdir -p "$dir"
  truncate -s "${mib}M" "$dir/disk.img"
  local nbd ship=() marks=1
  nbd=$(free_port)
  if [ "$mode" != capture ]; then
    start_servers "$dir"
    ship=(--process-server "$ps_addr" --tls "$work/ca/issued/web01")
    [ "$mode" = sync ] && ship+=(--sync)
  fi
  case $mode in churn-*) marks=0.2 ;; esac
  "$bin" agent --disk "d0=$dir/disk.img" --listen "127.0.0.1:$nbd" --log-dir "$dir/log" \
    --log-max 60GiB --mark-interval "$marks" "${ship[@]}" >/dev/null 2>"$dir/agent.err" & pids+=($!)
  agent_pid=$!
  wait_port "$nbd"
  local job=(--rw=randwrite --bs=4k --iodepth=16)
  case $mode in
    churn-0) job=(--rw=randwrite --bs=64k --iodepth=4) ;;
    churn-*) job=(--rw=randwrite --bs=64k --iodepth=4 --rate="${mode#churn-}m") ;;
  esac
  case $mode in
    churn-*) sample_rpo "$dir/rpo.txt" "$dir/done" & ;;
  esac
  log "$mode: ${job[*]}, ${secs} s"
  fio --name="$mode" --ioengine=nbd --uri="nbd://127.0.0.1:$nbd/d0" "${job[@]}" \
    --size="${mib}M" --time_based --runtime="$secs" --ramp_time=2 --randseed=1 --output-format=json >"$dir/fio.json"
  if [ "$mode" != capture ]; then
    # Wait for the backlog to drain: marks go in order, so a mark that reached the master
    # target within a second of its creation means every write before it is there too.
    local t0 rpo
    t0=$(date +%s.%N)
    sleep 0.5
    for _ in $(seq 1 6000); do
      rpo=$(curl -s "http://127.0.0.1:$mt_metrics/metrics" | awk '/^boomerang_rpo_seconds\{/ { print $2 }')
      awk -v r="${rpo:-99}" 'BEGIN { exit !(r < 1) }' && break
      sleep 0.1
    done
    elapsed "$t0" >"$dir/drain.txt"
    curl -s "http://127.0.0.1:$mt_metrics/metrics" >"$dir/metrics.txt"
  else
    : >"$dir/metrics.txt"
  fi
  touch "$dir/done"
  stop_job "$mode"
  shed "$dir"
}

# Initial sync of an image of $copy_mib MiB by the pipeline, by rsync --whole-file to an rsync
# daemon and by nbdcopy to nbdkit; all on 127.0.0.1. $1: "full" (every block written by fio,
# half compressible) or "quarter" (a quarter of the 1 MiB blocks written, at random, the rest
# never written, as on a disk mostly free).
initial_sync() {
  local fill=$1
  local dir=$work/initial-$fill
  mkdir -p "$dir/rsync-dest"
  log "initial sync: writing a ${copy_mib} MiB image ($fill)"
  truncate -s "${copy_mib}M" "$dir/source.img"
  local pattern=(--rw=write)
  [ "$fill" = quarter ] && pattern=(--rw=randwrite --io_size=$((copy_mib / 4))M)
  fio --name=fill --filename="$dir/source.img" "${pattern[@]}" --bs=1m --size="${copy_mib}M" \
    --buffer_compress_percentage=50 --refill_buffers --end_fsync=1 --output=/dev/null
  local t0
  # rsync, to a daemon on loopback.
  local port
  port=$(free_port)
  printf 'use chroot = no\nuid = %s\ngid = %s\n[dest]\npath = %s\nread only = no\n' "$(id -u)" "$(id -g)" "$dir/rsync-dest" >"$dir/rsyncd.conf"
  rsync --daemon --no-detach --address=127.0.0.1 --port="$port" --config="$dir/rsyncd.conf" & pids+=($!)
  local rsyncd=$!
  wait_port "$port"
  log "initial sync: rsync --whole-file"
  t0=$(date +%s.%N)
  rsync --whole-file "$dir/source.img" "rsync://127.0.0.1:$port/dest/"
  sync -f "$dir/rsync-dest/source.img"
  echo "rsync $(elapsed "$t0")" >>"$work/initial-$fill.txt"
  kill "$rsyncd"; wait "$rsyncd" 2>/dev/null || true
  rm -rf "$dir/rsync-dest"
  # nbdcopy, to nbdkit serving an empty image.
  port=$(free_port)
  truncate -s "${copy_mib}M" "$dir/nbd-dest.img"
  nbdkit -f -i 127.0.0.1 -p "$port" file "$dir/nbd-dest.img" & pids+=($!)
  local nbdkit=$!
  wait_port "$port"
  log "initial sync: nbdcopy"
  t0=$(date +%s.%N)
  nbdcopy --flush "$dir/source.img" "nbd://127.0.0.1:$port"
  echo "nbdcopy $(elapsed "$t0")" >>"$work/initial-$fill.txt"
  kill "$nbdkit"; wait "$nbdkit" 2>/dev/null || true
  rm -f "$dir/nbd-dest.img"
  # The pipeline: the agent copies the disk to the master target through the process server.
  start_servers "$dir"
  local nbd
  nbd=$(free_port)
  log "initial sync: boomerang agent -> process server -> master target"
  t0=$(date +%s.%N)
  "$bin" agent --disk "d0=$dir/source.img" --listen "127.0.0.1:$nbd" --log-dir "$dir/log" \
    --mark-interval 0.2 --process-server "$ps_addr" --tls "$work/ca/issued/web01" >/dev/null 2>"$dir/agent.err" & pids+=($!)
  agent_pid=$!
  # Marks wait for the copy: the first mark durable at the master target means the whole disk is.
  local durable= logged=
  while :; do
    [ -z "$logged" ] && [ -e "$dir/log/copied-d0" ] && logged=$(elapsed "$t0")
    [ -z "$durable" ] && curl -s "http://127.0.0.1:$mt_metrics/metrics" | grep -q '^boomerang_last_mark_seq{.*} [1-9]' \
      && durable=$(elapsed "$t0")
    if [ -n "$durable" ] && "$bin" store points "$dir/retention/replicas/web01/store" 2>/dev/null | grep -q d0; then
      break
    fi
    kill -0 "$agent_pid" || { echo "the agent stopped; see $dir/agent.err" >&2; exit 1; }
    sleep 0.1
  done
  echo "logged ${logged:-$durable}" >>"$work/initial-$fill.txt"
  echo "durable $durable" >>"$work/initial-$fill.txt"
  echo "protected $(elapsed "$t0")" >>"$work/initial-$fill.txt"
  stop_job "initial-$fill"
  shed "$dir"
}

# PARTS=initial (or "latency churn initial", the default) runs a part of the benchmark.
parts=${PARTS:-latency churn initial}
case " $parts " in *" latency "*) for mode in capture async sync; do run_job "$mode"; done ;; esac
case " $parts " in *" churn "*) for mode in churn-20 churn-100 churn-0; do run_job "$mode"; done ;; esac
case " $parts " in *" initial "*) for f in ${FILLS:-full quarter}; do initial_sync "$f"; done ;; esac

python3 - "$work" "$secs" "$mib" "$copy_mib" <<'PY' | tee "$work/report.md"
import json, sys, re
work, secs, mib, copy_mib = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def fio(mode):
    text = open(f"{work}/{mode}/fio.json").read()
    w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return w["iops"], w["bw_bytes"], pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000
def metric(mode, name):
    for line in open(f"{work}/{mode}/metrics.txt"):
        m = re.match(rf'{name}{{stream="web01"}} (\S+)', line)
        if m:
            return float(m.group(1))
    return None
def lags(mode):
    seen = {}
    for line in open(f"{work}/{mode}/rpo.txt"):
        parts = line.split()
        if len(parts) == 2 and float(parts[1]) > 0:
            seen[parts[1]] = float(parts[0])
    return sorted(seen.values())
def pct(values, p):
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")
fmt = lambda v: "n/a" if v is None else f"{v:.2f} s"
mb = lambda b: b / 1e6

import os
def have(path):
    return os.path.exists(f"{work}/{path}")
if have("capture/fio.json"):
  print(f"### Write latency and the cost of replication")
  print()
  print(f"fio nbd engine, 4 KiB random writes at queue depth 16, {secs} s after 2 s ramp, {mib} MiB disk; agent, process server and master target on 127.0.0.1, mutual TLS, zstd between process server and master target; marks every second.")
  print()
  print("| mode | IOPS | vs capture only | p50 latency | p99 latency | RPO at the end | worst RPO |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  base = fio("capture")[0]
  for mode, label in [("capture", "capture only (no replication)"), ("async", "asynchronous replication"), ("sync", "synchronous replication (--sync)")]:
      iops, _, p50, p99 = fio(mode)
      rpo, worst = metric(mode, "boomerang_rpo_seconds"), metric(mode, "boomerang_rpo_worst_seconds")
      print(f"| {label} | {iops:,.0f} | {iops/base:.2f}x | {p50:,.0f} us | {p99:,.0f} us | {fmt(rpo)} | {fmt(worst)} |")
  print()
if have("churn-0/fio.json"):
  print("### Replication lag under churn")
  print()
  print(f"fio nbd engine, 64 KiB random writes at queue depth 4 with a rate cap, {secs} s after 2 s ramp, {mib} MiB disk; marks every 0.2 s. Lag is each mark's delay from its creation at the agent (its writes acknowledged) to its durability at the master target, sampled from `/metrics` every 0.1 s. Drain: time after fio stopped until the master target was within a second of the agent. Replicated: bytes written over the measured time plus the drain.")
  print()
  print("| churn cap | written | lag p50 | lag p99 | lag max | marks sampled | drain | replicated |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for mode, label in [("churn-20", "20 MB/s"), ("churn-100", "100 MB/s"), ("churn-0", "none (the most the agent takes)")]:
      _, bw, _, _ = fio(mode)
      v = lags(mode)
      drain = float(open(f"{work}/{mode}/drain.txt").read())
      print(f"| {label} | {mb(bw):,.0f} MB/s | {pct(v, 50):.2f} s | {pct(v, 99):.2f} s | {max(v) if v else float('nan'):.2f} s | {len(v)} | {drain:.1f} s | {mb(bw) * secs / (secs + drain):,.0f} MB/s |")
  print()
if have("initial-full.txt") or have("initial-quarter.txt"):
  print("### Initial sync")
  print()
  size = copy_mib * 1048576
  print(f"A {copy_mib:,} MiB image copied on 127.0.0.1, written by fio with half-compressible data: in full, or a quarter of its 1 MiB blocks at random (the rest never written, as on a disk mostly free). Boomerang: from the agent's start on the image until the first mark is durable at the master target (marks wait for the initial copy), and until the first recovery point is in the replica store. rsync: `rsync --whole-file` to an rsync daemon, then `sync` of the copy. nbdcopy: to `nbdkit file` over NBD, with `--flush`. MB/s is the image size over the time.")
  print()
  print("| copy | image | seconds | MB/s | Boomerang (first point) vs it |")
  print("| --- | --- | --- | --- | --- |")
  for fill in [f for f in ["full", "quarter"] if have(f"initial-{f}.txt")]:
    t = {k: float(v) for k, v in (line.split() for line in open(f"{work}/initial-{fill}.txt"))}
    ours = t["protected"]
    for key, label in [("logged", "Boomerang, read and logged by the agent"), ("durable", "Boomerang, durable at the master target"), ("protected", "Boomerang, first recovery point"), ("rsync", "rsync --whole-file"), ("nbdcopy", "nbdcopy")]:
      print(f"| {label} | {fill} | {t[key]:.1f} | {mb(size) / t[key]:,.0f} | {t[key] / ours:.2f}x |")
  print()
print("### Peak RSS")
print()
peak = {}
for line in open(f"{work}/rss"):
    role, kib = line.split()
    peak[role] = max(peak.get(role, 0), int(kib))
cpu = {}
for line in open(f"{work}/cpu"):
    job, role, seconds = line.split()
    cpu[(job, role)] = float(seconds)
print("| process | peak RSS over every job above | CPU seconds, initial sync of the full image | of the quarter-written image |")
print("| --- | --- | --- | --- |")
for role in ["agent", "process-server", "master-target"]:
    print(f"| {role} | {peak.get(role, 0) / 1024:,.0f} MiB | {cpu.get(('initial-full', role), 0):.1f} | {cpu.get(('initial-quarter', role), 0):.1f} |")
PY
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  bench/write-docs.py 'Replication (`bench/pipeline.sh`)' "$work/report.md"
fi
