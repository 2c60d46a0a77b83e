# Shared by the bench/*.sh scripts (sourced from the repository root): `bench_start NAME`
# builds the release binary ($bin), makes a work directory ($work, removed at exit) and
# stops at exit every process whose id is in $pids. Then: now, elapsed START, log MESSAGE,
# free_port, wait_port PORT, median (of the numbers on stdin), start_servers DIR [ARGS].
bench_start() {
  cargo build --release -q
  bin=$PWD/target/release/boomerang
  work=$(mktemp -d "/var/tmp/boomerang-$1-bench.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f\n", a - b }'; }
log() { printf '== %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Starts a master target (with ARGS besides its own) and a process server for job directory
# DIR, with the certificates mt1 and ps1 of $work/ca; sets mt_pid, ps_pid, mt_metrics, ps_addr.
start_servers() {
  local dir=$1
  shift
  local mt ps
  mt=$(free_port); ps=$(free_port); mt_metrics=$(free_port)
  "$bin" master-target --listen "127.0.0.1:$mt" --tls "$work/ca/issued/mt1" --retention "$dir/retention" \
    --metrics "127.0.0.1:$mt_metrics" "$@" >/dev/null 2>"$dir/mt.err" & pids+=($!)
  mt_pid=$!
  wait_port "$mt"
  "$bin" process-server --listen "127.0.0.1:$ps" --tls "$work/ca/issued/ps1" --cache "$dir/cache" \
    --master-target "127.0.0.1:$mt" >/dev/null 2>"$dir/ps.err" & pids+=($!)
  ps_pid=$!
  wait_port "$ps"
  ps_addr=127.0.0.1:$ps
}
