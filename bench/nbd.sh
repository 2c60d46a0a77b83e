#!/usr/bin/env bash
# Benchmark of the agent's NBD path with write capture on, against nbdkit (file plugin) and
# qemu-nbd serving the same image file, in one run, with the same fio jobs (nbd engine):
#   4 KiB random write at queue depth 16, 1 MiB sequential write, 4 KiB random read.
# Also the agent's peak RSS. Usage: bench/nbd.sh [SECONDS_PER_JOB] [IMAGE_GIB] [ROUNDS]
# Each round runs every job on the three servers in turn; the table gives medians over rounds
# (the peers alone move by tens of percent from one run to the next on this machine kind).
# Needs: fio (with its nbd and libaio engines), nbdkit, qemu-nbd (qemu-utils), python3.
# With WRITE_DOCS=1 the table goes into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
gib=${2:-1}
rounds=${3:-3}
for tool in fio nbdkit qemu-nbd python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install fio nbdkit qemu-utils python3" >&2; exit 1; }
done
cargo build --release -q
bin=$PWD/target/release/boomerang
work=${BENCH_DIR:-$(mktemp -d /var/tmp/boomerang-nbd-bench.XXXXXX)}
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
image=$work/disk.img
log() { printf '== %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "server did not listen on $1" >&2; exit 1; }

jobs=(
  "randwrite-4k-qd16 --rw=randwrite --bs=4k --iodepth=16"
  "seqwrite-1m --rw=write --bs=1M --iodepth=4"
  "randread-4k-qd16 --rw=randread --bs=4k --iodepth=16"
)

start_server() {
  local name=$1 port=$2
  rm -f "$image"; rm -rf "$work/log"
  # A fully allocated image with data, the same for every server.
  head -c "$((gib << 30))" /dev/urandom >"$image"
  sync
  case $name in
    agent) "$bin" agent --disk bench="$image" --listen "127.0.0.1:$port" --log-dir "$work/log" --segment-size 256MiB --log-max 60GiB >/dev/null 2>"$work/agent.err" & ;;
    nbdkit) nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$port" file "$image" & ;;
    qemu-nbd) qemu-nbd -f raw -b 127.0.0.1 -p "$port" -x bench -e 16 --persistent --cache=writeback --aio=threads "$image" & ;;
  esac
  server_pid=$!
  wait_port "$port"
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

for round in $(seq 1 "$rounds"); do
  for job in "${jobs[@]}"; do
    for server in agent nbdkit qemu-nbd; do
      set -- $job
      name=$1; shift
      port=$(free_port)
      log "round $round/$rounds, $server: $name"
      start_server "$server" "$port"
      fio --name="$name" --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" "$@" \
        --size="${gib}G" --time_based --runtime="$secs" --ramp_time=2 --randseed=1 \
        --output-format=json >"$work/$server-$name-$round.json"
      if [ "$server" = agent ]; then
        awk '/VmHWM/ {print $2}' "/proc/$server_pid/status" >"$work/agent-$name-$round.rss"
      fi
      stop_server
      if [ "$server" = agent ]; then
        # Capture must have logged every write: a bitmap fallback would make the numbers lie.
        "$bin" agent log inspect "$work/log" --output json | python3 -c 'import json,sys; b=json.load(sys.stdin)["bitmaps"]; sys.exit(1 if any(x["dirty_blocks"] for x in b) else 0)' \
          || { echo "the agent's log reached its cap during $name: results would not measure capture" >&2; exit 1; }
      fi
    done
  done
  # The ceiling for any capture that keeps every byte: the log volume's own sequential write
  # bandwidth (O_DIRECT, so the page cache does not flatter it), measured where the log lives,
  # in every round, since the volume moves between runs as the peers do. A log writes blocks
  # it never wrote before (each segment is new, its blocks reserved with fallocate but
  # unwritten): a new file written once.
  log "round $round/$rounds, device: sequential write of new blocks, O_DIRECT"
  rm -f "$work/device.bin"
  fio --name=device --filename="$work/device.bin" --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
    --direct=1 --fallocate=keep --size=8G --output-format=json >"$work/device-new-$round.json"
  rm -f "$work/device.bin"
done

# Once, for comparison: rewriting blocks already written, which is what a time-based run over
# one file mostly measures and what no log does.
log "device: sequential rewrite of written blocks, O_DIRECT"
fio --name=device --filename="$work/device.bin" --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
  --direct=1 --size=8G >/dev/null
fio --name=device --filename="$work/device.bin" --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
  --direct=1 --size=8G --time_based --runtime="$secs" --output-format=json >"$work/device-rewrite.json"
rm -f "$work/device.bin"

python3 - "$work" "$secs" "$gib" "$rounds" <<'PY' | tee "$work/report.md"
import json, statistics, sys
work, secs, gib, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
jobs = ["randwrite-4k-qd16", "seqwrite-1m", "randread-4k-qd16"]
def one(server, job, r):
    text = open(f"{work}/{server}-{job}-{r}.json").read()
    # fio may print notes before its JSON.
    j = json.loads(text[text.index("{"):])["jobs"][0]
    side = j["read"] if "read" in job else j["write"]
    return side["iops"], side["bw"] / 1024
def result(server, job):
    runs = [one(server, job, r) for r in range(1, rounds + 1)]
    return statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs)
print(f"fio nbd engine, {secs} s per job after 2 s ramp, {gib} GiB image file of random data; one server at a time on 127.0.0.1; "
      f"{rounds} rounds, each running every job on the three servers in turn: medians, and the ratio's range over the rounds.")
print()
print("| job | agent (capture on) | nbdkit file | qemu-nbd | agent / faster peer | range over rounds | target |")
print("| --- | --- | --- | --- | --- | --- | --- |")
rss = 0
for job in jobs:
    a, n, q = (result(s, job) for s in ("agent", "nbdkit", "qemu-nbd"))
    best = max(n[0], q[0])
    ratios = [one("agent", job, r)[0] / max(one("nbdkit", job, r)[0], one("qemu-nbd", job, r)[0])
              for r in range(1, rounds + 1)]
    fmt = lambda r: f"{r[0]:,.0f} IOPS, {r[1]:,.0f} MiB/s"
    print(f"| {job} | {fmt(a)} | {fmt(n)} | {fmt(q)} | {a[0]/best:.2f}x | {min(ratios):.2f}x to {max(ratios):.2f}x | >= 0.9x |")
    for r in range(1, rounds + 1):
        rss = max(rss, int(open(f"{work}/agent-{job}-{r}.rss").read().strip() or 0))
print()
print(f"Agent peak RSS over the jobs: {rss/1024:.0f} MiB (target < 64 MiB).")
def device(name):
    text = open(f"{work}/device-{name}.json").read()
    return json.loads(text[text.index("{"):])["jobs"][0]["write"]["bw"] / 1024
def peer(r):
    return max(one(s, "seqwrite-1m", r)[1] for s in ("nbdkit", "qemu-nbd"))
print()
print("The log volume's sequential `O_DIRECT` write of new blocks, as a log writes them, measured in each round: "
      "the most a capture that logs every byte can sustain, whatever its CPU cost, against the faster peer's "
      "1 MiB sequential write of the same round.")
print()
print("| round | new blocks on the volume | faster peer, sequential write | ceiling / peer | agent / peer |")
print("| --- | --- | --- | --- | --- |")
ceilings = []
for r in range(1, rounds + 1):
    new = device(f"new-{r}")
    ceilings.append(new / peer(r))
    print(f"| {r} | {new:,.0f} MiB/s | {peer(r):,.0f} MiB/s | {new/peer(r):.2f}x | {one('agent', 'seqwrite-1m', r)[1]/peer(r):.2f}x |")
print()
reach = sum(c >= 0.9 for c in ceilings)
print(f"Rounds where even a capture costing no CPU could reach 0.9x: {reach} of {rounds}.")
rewrite = device("rewrite")
print(f"The same volume rewriting blocks already written: {rewrite:,.0f} MiB/s.")
PY
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  bench/write-docs.py 'NBD with write capture (`bench/nbd.sh`)' "$work/report.md"
fi
