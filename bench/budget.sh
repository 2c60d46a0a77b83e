#!/usr/bin/env bash
# What an initial sync through the pipeline must at least spend on this machine, against rsync
# measured in the same run: the per-byte cost of the work the pipeline cannot skip (TLS on both
# hops, zstd between process server and master target and in the replica store, BLAKE3 of
# every block, new blocks persisted at each hop), each measured alone with the fastest tool
# at hand, and the throughput those costs allow on this machine's cores and log volume.
# Copies, system calls, page-cache work and scheduling are left out: real code costs more.
#
# Usage: bench/budget.sh [DATA_MIB]. Needs: fio (libaio), openssl, zstd, b3sum, rsync,
# python3, nproc. With WRITE_DOCS=1 the table goes into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-1024}
for tool in fio openssl zstd b3sum rsync python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install fio openssl zstd b3sum rsync python3" >&2; exit 1; }
done
work=${BENCH_DIR:-$(mktemp -d /var/tmp/boomerang-budget.XXXXXX)}
rsyncd=
cleanup() {
  if [ -n "$rsyncd" ]; then kill "$rsyncd" 2>/dev/null || true; wait "$rsyncd" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
log() { printf '== %s\n' "$*" >&2; }
data=$work/data.img

# The data of bench/pipeline.sh's initial sync: half-compressible 1 MiB blocks.
log "data: $mib MiB, half compressible"
fio --name=fill --filename="$data" --rw=write --bs=1m --size="${mib}M" \
  --buffer_compress_percentage=50 --refill_buffers --end_fsync=1 --output=/dev/null
cat "$data" >/dev/null

log "AES-128-GCM (rustls' suite; aws-lc and OpenSSL share the assembly)"
openssl speed -evp aes-128-gcm -bytes 16384 -seconds 3 2>/dev/null | awk '/^AES-128-GCM/ {print $NF}' >"$work/aes.txt"
log "zstd level 1 (the wire's and the store's level), compress and decompress"
zstd -b1 -i3 "$data" 2>&1 | tr '\r' '\n' | grep 'MB/s' | tail -1 >"$work/zstd.txt"
log "BLAKE3, one thread"
/usr/bin/time -f %e -o "$work/b3.txt" b3sum --num-threads 1 "$data" >/dev/null
log "log volume: new blocks, O_DIRECT, queue depth 4"
fio --name=device --filename="$work/device.bin" --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
  --direct=1 --fallocate=keep --size=4G --output-format=json >"$work/device.json"
rm -f "$work/device.bin"

log "rsync --whole-file to a daemon on 127.0.0.1, then sync"
mkdir -p "$work/dest"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'use chroot = no\nuid = %s\ngid = %s\n[dest]\npath = %s\nread only = no\n' "$(id -u)" "$(id -g)" "$work/dest" >"$work/rsyncd.conf"
rsync --daemon --no-detach --address=127.0.0.1 --port="$port" --config="$work/rsyncd.conf" &
rsyncd=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
t0=$(date +%s.%N)
rsync --whole-file "$data" "rsync://127.0.0.1:$port/dest/"
sync -f "$work/dest/data.img"
t1=$(date +%s.%N)
echo "$t0 $t1" >"$work/rsync.txt"

python3 - "$work" "$mib" "$(nproc)" <<'PY' | tee "$work/report.md"
import json, re, sys
work, mib, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MB = 1e6
aes = float(open(f"{work}/aes.txt").read().strip().rstrip("k")) * 1000  # bytes/s
z = open(f"{work}/zstd.txt").read()
ratio = float(re.search(r"\(x([\d.]+)\)", z).group(1))
comp, decomp = (float(x) * MB for x in re.findall(r"([\d.]+) MB/s", z)[:2])
b3 = mib * 2**20 / float(open(f"{work}/b3.txt").read().strip())
dev = json.load(open(f"{work}/device.json"))["jobs"][0]["write"]["bw"] * 1024
t0, t1 = map(float, open(f"{work}/rsync.txt").read().split())
rsync = mib * 2**20 / (t1 - t0)
small = 1 / ratio  # bytes after zstd, per byte of data
steps = [  # (what, bytes of it per byte of data, speed in bytes/s)
    ("TLS, agent to process server: encrypt and decrypt", 2, aes),
    ("zstd at the process server (the wire)", 1, comp),
    ("TLS, process server to master target, of the compressed bytes: encrypt and decrypt", 2 * small, aes),
    ("zstd decompression at the master target", 1, decomp),
    ("BLAKE3 of every block at the master target", 1, b3),
    ("zstd of every block in the replica store", 1, comp),
]
per_mib = sum(n / speed for _, n, speed in steps) * 2**20 * 1000  # ms per MiB
cpu_ceiling = cores / (per_mib / 1000) * 2**20  # bytes/s with every core busy
persisted = 1 + 1 + 1 + small  # agent log, process-server cache, master-target log, store
dev_ceiling = dev / persisted
print(f"{mib:,} MiB of half-compressible data (the data of the replication benchmark), {cores} cores. "
      "Each cost is measured alone with the fastest tool at hand: `openssl speed` (AES-128-GCM, "
      "the TLS suite; rustls uses aws-lc, whose AES-GCM assembly is OpenSSL's), `zstd -b1`, "
      "`b3sum --num-threads 1`, fio for the log volume. Copies, system calls, page-cache work "
      "and scheduling are left out, so real code spends more.")
print()
print("| work the initial sync cannot skip | bytes per byte of data | speed | CPU per MiB of data |")
print("| --- | --- | --- | --- |")
for what, n, speed in steps:
    print(f"| {what} | {n:.2f} | {speed/MB:,.0f} MB/s | {n/speed*2**20*1000:.2f} ms |")
print(f"| total | | | {per_mib:.2f} ms |")
print()
print("| ceiling | MB/s | vs rsync | target |")
print("| --- | --- | --- | --- |")
print(f"| rsync --whole-file to a daemon, then sync (measured) | {rsync/MB:,.0f} | 1.00x | |")
print(f"| CPU: every core doing only the work above | {cpu_ceiling/MB:,.0f} | {cpu_ceiling/rsync:.2f}x | >= 2x |")
print(f"| log volume: {dev/MB:,.0f} MB/s of new blocks over the {persisted:.2f} bytes persisted per byte "
      f"(agent log, process-server cache, master-target log, store) | {dev_ceiling/MB:,.0f} | {dev_ceiling/rsync:.2f}x | >= 2x |")
PY
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  bench/write-docs.py 'Initial-sync budget (`bench/budget.sh`)' "$work/report.md"
fi
