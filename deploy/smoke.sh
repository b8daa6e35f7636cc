#!/usr/bin/env bash
# The container test plan, for real, on one machine (`make smoke`; not part of `make test`: ~9 min
# on 2 CPUs with the images built, ~5 min more for an image build). Needs podman (+ runc), root, the project's .venv;
# with no registry reachable it builds the base images from Debian packages (debootstrap).
#
#  1. images: base (pulled, or debootstrapped), vitmerge (Dockerfile), nginx and Prometheus
#  2. a store made on the HOST by `vitmerge merge` as root; the host server's answers to the examples
#  3. the image on that store (uid 10001 reads root's files): warm start, same answers as the host
#  4. the same store made unreadable, then fixed: the container comes up by itself (startup retry)
#  5. compose (podman-compose): nginx + 2 replicas on one empty volume + Prometheus: cold start,
#     classify through the LB, admin merge through the LB, both replicas converge, Prometheus
#     scrapes both, one replica crashed (SIGKILL) under load with 0 failed requests and restarted, the other
#     podman-killed under load with 0 failed requests; torn down
#  6. the Kubernetes manifests with `podman kube play` (ConfigMap, Secret, PVC, Deployment, Service)
#
# Prints each step, PASS/FAIL lines, measurements (also in $WORK/results.txt) and `N passed, M failed`.
# Settings (environment): SMOKE_WORK (default /var/tmp/vitmerge-smoke), BASE_IMAGE, VITMERGE_IMAGE,
# NGINX_IMAGE, PROMETHEUS_IMAGE, TORCH_INDEX (default empty: pip's own indexes), SMOKE_LOCK (a file
# flock-ed while torch work runs; default /tmp/vitmerge-cpu.lock), SMOKE_KEEP_STORE=1 (reuse the host store).
# `bash deploy/smoke.sh --prerequisites` only installs what the plan needs (as root: podman, runc, debootstrap).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WORK=${SMOKE_WORK:-/var/tmp/vitmerge-smoke}
PY="$REPO/.venv/bin/python"
VITMERGE="$REPO/.venv/bin/vitmerge"
CLIENT=("$PY" "$REPO/deploy/smoke_client.py")
LOCAL_BASE=localhost/vitmerge-base:bookworm
IMAGE=${VITMERGE_IMAGE:-localhost/vitmerge:latest}
TORCH_INDEX=${TORCH_INDEX-}
LOCK=${SMOKE_LOCK:-/tmp/vitmerge-cpu.lock}
PROJECT=vitmerge-smoke               # compose project: containers vitmerge-smoke_<service>_1
HOST_PORT=18100 CTR_PORT=18101 LB_PORT=8000 PROM_PORT=9090
WATCH_S=2                            # VITMERGE_WATCH_INTERVAL_S of deploy/docker-compose.yml
# crun refuses this machine's hybrid cgroup layout; ulimits at or below the machine's own
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/deploy/smoke-containers.conf}
mkdir -p "$WORK"
RESULTS="$WORK/results.txt"
: >"$RESULTS"

passed=0
failed=0
step() { printf '\n== %s\n' "$*"; }
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { # check "what" command...: PASS/FAIL by the command's exit status
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
record() { echo "$1=$2" | tee -a "$RESULTS"; }
json() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])$2)" "$1"; }
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(round($(now) - float(sys.argv[1]), 1))" "$1"; }
compose() {
    VITMERGE_IMAGE=$IMAGE NGINX_IMAGE=$NGINX_IMAGE PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE \
        "$WORK/pcvenv/bin/podman-compose" -p "$PROJECT" -f deploy/docker-compose.yml "$@"
}
ctr_ip() { podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }

# podman, runc and debootstrap come from Debian's packages, installed here when run as root (as `make setup` installs
# nginx); anyone else is told the command to run
prerequisites() {
    printf '\n== 0. prerequisites\n'
    # shellcheck source=scripts/apt.sh
    . "$REPO/scripts/apt.sh"
    have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
    have podman || apt_install /usr/bin/podman podman
    have runc || apt_install /usr/sbin/runc runc
    have debootstrap || apt_install /usr/sbin/debootstrap debootstrap
    local tool
    for tool in podman runc debootstrap; do
        have "$tool" || {
            echo "$tool is missing: run make smoke as root, or install it: sudo apt-get install -y podman runc debootstrap"
            exit 2
        }
    done
    echo "podman, runc and debootstrap are installed"
}
prerequisites
[ "${1:-}" = --prerequisites ] && exit 0

created_env=0
cleanup() {
    set +e
    podman rm -f -t 2 vitmerge-smoke-host-store >/dev/null 2>&1
    if [ -x "$WORK/pcvenv/bin/podman-compose" ]; then compose down -v -t 5 >/dev/null 2>&1; fi
    podman kube down "$WORK/k8s.yaml" >/dev/null 2>&1
    podman volume rm -f vitmerge-store >/dev/null 2>&1
    podman secret rm vitmerge-admin >/dev/null 2>&1
    [ "$created_env" = 1 ] && rm -f deploy/admin.env
    [ -n "${host_pid:-}" ] && kill "$host_pid" 2>/dev/null
    exec 9>&-
}
trap cleanup EXIT

[ -x "$PY" ] || { echo "no .venv: run make setup"; exit 2; }
podman info --format 'podman {{.Version.Version}}, runtime {{.Host.OCIRuntime.Name}}, cgroups {{.Host.CgroupsVersion}}'
if [ ! -x "$WORK/pcvenv/bin/podman-compose" ]; then
    python3 -m venv "$WORK/pcvenv"
    "$WORK/pcvenv/bin/pip" install -q podman-compose
fi
"$WORK/pcvenv/bin/podman-compose" version 2>/dev/null | head -1

step "1. images"
registry=1
if [ -z "${BASE_IMAGE:-}" ]; then
    if timeout 60 podman pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1; then
        BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
    else
        registry=0
        BASE_IMAGE=$LOCAL_BASE
        if ! podman image exists "$LOCAL_BASE"; then
            # the same Debian mirror apt uses here
            mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
                2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)  # a missing sources.list is fine
            mirror=${mirror:-http://deb.debian.org/debian}
            echo "no registry reachable: debootstrap bookworm from $mirror -> $LOCAL_BASE"
            t0=$(now)
            rm -rf "$WORK/base-rootfs"
            debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates bookworm \
                "$WORK/base-rootfs" "$mirror" >"$WORK/debootstrap.log"
            chroot "$WORK/base-rootfs" apt-get clean
            rm -rf "$WORK/base-rootfs/var/lib/apt/lists/"*
            tar -C "$WORK/base-rootfs" -c . | podman import -q --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
            rm -rf "$WORK/base-rootfs"
            record base_build_s "$(since "$t0")"
        fi
    fi
fi
echo "base image: $BASE_IMAGE"

# pip inside the build gets this machine's pip configuration (indexes, find-links, constraints) and
# CA bundle as build secrets, and its local package folders as build-time volumes: nothing of it
# lands in a layer.
"$PY" -m pip config list 2>/dev/null | "$PY" -c '
import re, sys
conf = {}
for line in sys.stdin:
    m = re.match(r"^(?:global|:env:)\.([\w-]+)=\x27(.*)\x27$", line.strip())
    if m and m.group(1) not in ("cert", "disable-pip-version-check"):
        conf[m.group(1)] = m.group(2)
print("\n".join(["[global]"] + [f"{k} = {v}" for k, v in conf.items()]))' >"$WORK/pip.conf"
build_volumes=()
for path in $(grep -oE '(file://)?/[^ ]+' "$WORK/pip.conf" | sed -e 's|^file://||' -e 's|/simple/*$||' | sort -u); do
    [ -e "$path" ] && build_volumes+=(-v "$path:$path:ro")
done
ca=$("$PY" -m pip config get global.cert 2>/dev/null || true)
ca=${ca:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
secrets=(--secret "id=pipconf,src=$WORK/pip.conf")
[ -f "$ca" ] && secrets+=(--secret "id=ca,src=$ca")
echo "pip config for the build: $(grep -c = "$WORK/pip.conf") settings, ${#build_volumes[@]} volume args, CA ${ca}"

t0=$(now)
if podman build --format docker -f Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "TORCH_INDEX=$TORCH_INDEX" "${secrets[@]}" "${build_volumes[@]}" -t "$IMAGE" . \
    >"$WORK/build.log" 2>&1; then
    record image_build_s "$(since "$t0")"
    record image_size "$(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
    pass "image $IMAGE built (log $WORK/build.log)"
else
    tail -20 "$WORK/build.log"
    fail "image build (log $WORK/build.log)"
    echo "$passed passed, $failed failed"
    exit 1
fi
if [ "$registry" = 1 ]; then
    NGINX_IMAGE=${NGINX_IMAGE:-docker.io/library/nginx:1.27-alpine}
    PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-docker.io/prom/prometheus:v3.1.0}
else
    NGINX_IMAGE=${NGINX_IMAGE:-localhost/vitmerge-nginx:bookworm}
    PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-localhost/vitmerge-prometheus:bookworm}
    for name in nginx prometheus; do
        podman build -q --format docker -f "deploy/local-images/$name.Dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
            -t "localhost/vitmerge-$name:bookworm" deploy/local-images >/dev/null
    done
fi
echo "nginx image: $NGINX_IMAGE, prometheus image: $PROMETHEUS_IMAGE"
check "no pip configuration or CA secret in the image" \
    podman run --rm --entrypoint sh "$IMAGE" -c '! ls /run/secrets/pipconf /run/secrets/ca 2>/dev/null && [ -z "$(pip config list)" ]'

# torch work from here on: one such job on the machine at a time
exec 9>"$LOCK"
echo "waiting for $LOCK ..."
flock 9

step "2. a store made on the host by another user (root), the host server's answers"
STORE="$WORK/host-store"
if [ "${SMOKE_KEEP_STORE:-0}" != 1 ] || [ ! -f "$STORE/CURRENT" ]; then
    rm -rf "$STORE"
    "$VITMERGE" zoo build --preset tiny --store "$STORE" --quiet >/dev/null
    t0=$(now)
    "$VITMERGE" merge --store "$STORE" --method emr_routed --quiet >"$WORK/host-merge.log"
    record host_merge_s "$(since "$t0")"
fi
echo "store $STORE (CURRENT $(cat "$STORE/CURRENT"), owner $(stat -c %U "$STORE/bundles"))"
check "every file of the store is readable by other users" \
    test -z "$(find "$STORE/bundles" "$STORE/zoos" \( -type f ! -perm -o+r \) -o \( -type d ! -perm -o+rx \))"
"$VITMERGE" serve --store "$STORE" --port "$HOST_PORT" --watch-interval 0 --quiet >"$WORK/host-serve.log" 2>&1 &
host_pid=$!
"${CLIENT[@]}" wait-ready "http://127.0.0.1:$HOST_PORT" --timeout 300 >/dev/null
check "host server classifies the held-out examples" \
    "${CLIENT[@]}" classify "http://127.0.0.1:$HOST_PORT" --examples "$STORE/examples" --out "$WORK/answers-host.json"
kill "$host_pid"
wait "$host_pid" || true
host_pid=

step "3. the image on the host's store (uid 10001 reads root's files)"
t0=$(now)
podman run -d --name vitmerge-smoke-host-store -p "$CTR_PORT:8000" -v "$STORE:/store" "$IMAGE" >/dev/null
if "${CLIENT[@]}" wait-ready "http://127.0.0.1:$CTR_PORT" --timeout 300; then
    record warm_start_s "$(since "$t0")"
    pass "container ready on the mounted store"
else
    podman logs --tail 20 vitmerge-smoke-host-store
    fail "container ready on the mounted store"
fi
"${CLIENT[@]}" classify "http://127.0.0.1:$CTR_PORT" --examples "$STORE/examples" --out "$WORK/answers-container.json"
check "container answers = host answers (task given and routed)" \
    "${CLIENT[@]}" compare "$WORK/answers-host.json" "$WORK/answers-container.json" --tol 1e-6
podman rm -f -t 5 vitmerge-smoke-host-store >/dev/null

step "4. unreadable store files (safetensors' 0600 as root wrote them before), fixed while the container waits"
version=$(cat "$STORE/CURRENT")
chmod 0600 "$STORE/bundles/$version/"*.safetensors
podman run -d --name vitmerge-smoke-host-store -p "$CTR_PORT:8000" -v "$STORE:/store" \
    -e "VITMERGE_WATCH_INTERVAL_S=$WATCH_S" "$IMAGE" >/dev/null
check "/readyz answers 503 naming the PermissionError" \
    "${CLIENT[@]}" wait-ready "http://127.0.0.1:$CTR_PORT" --timeout 120 --expect-error PermissionError
chmod 0644 "$STORE/bundles/$version/"*.safetensors
t0=$(now)
if "${CLIENT[@]}" wait-ready "http://127.0.0.1:$CTR_PORT" --timeout 60 >/dev/null; then
    record ready_after_fix_s "$(since "$t0")"
    pass "ready by itself after chmod (retried every ${WATCH_S} s)"
else
    fail "ready by itself after chmod"
fi
podman rm -f -t 5 vitmerge-smoke-host-store >/dev/null

step "5. compose: nginx + 2 replicas on one empty volume + Prometheus"
if [ ! -f deploy/admin.env ]; then
    echo "VITMERGE_ADMIN_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')" >deploy/admin.env
    created_env=1
fi
TOKEN=$(sed -n 's/^VITMERGE_ADMIN_TOKEN=//p' deploy/admin.env)
compose down -v -t 5 >/dev/null 2>&1 || true
t0=$(now)
compose up -d >"$WORK/compose-up.log" 2>&1
LB="http://127.0.0.1:$LB_PORT"
if "${CLIENT[@]}" wait-ready "$LB" --timeout 900 --poll 1 >/dev/null; then
    record cold_start_s "$(since "$t0")"
    pass "cold start on an empty volume: ready through the LB"
else
    fail "cold start through the LB"
fi
R1="http://$(ctr_ip "${PROJECT}_vitmerge-1_1"):8000"
R2="http://$(ctr_ip "${PROJECT}_vitmerge-2_1"):8000"
echo "replicas: $R1 $R2"
check "both replicas ready" "${CLIENT[@]}" converge "$(cat "$STORE/CURRENT")" "$R1" "$R2" --timeout 120
check "classify through the LB (task given and routed)" \
    "${CLIENT[@]}" classify "$LB" --examples "$STORE/examples" --out "$WORK/answers-lb.json"
"${CLIENT[@]}" compare "$WORK/answers-host.json" "$WORK/answers-lb.json" --tol 1e-6 ||
    echo "(note: the volume's bundle was merged inside the container, the host's on the host)"
if out=$("${CLIENT[@]}" merge "$LB" --token "$TOKEN" --method emr); then
    echo "$out"
    pass "admin merge through the LB (job followed through the LB)"
    new=$(json "$out" '["version"]')
    if conv=$("${CLIENT[@]}" converge "$new" "$R1" "$R2" --timeout 60); then
        echo "$conv"
        record convergence_s "$(json "$conv" '["seconds"]')"
        check "both replicas serve $new within the poll interval + a load" \
            "$PY" -c "import sys; sys.exit(not $(json "$conv" '["seconds"]') <= $WATCH_S + 10)"
    else
        fail "both replicas serve $new"
    fi
else
    fail "admin merge through the LB"
fi
prom_up() {
    "$PY" - "$PROM_PORT" <<'EOF'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?query=vitmerge_ready"
for _ in range(60):
    try:
        result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
        if len(result) == 2 and all(r["value"][1] == "1" for r in result):
            print("vitmerge_ready=1 from", sorted(r["metric"]["instance"] for r in result))
            sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit(1)
EOF
}
check "Prometheus scrapes both replicas" prom_up
"${CLIENT[@]}" load "$LB" --examples "$STORE/examples" --threads 4 --seconds 25 --started "$WORK/load.started" \
    >"$WORK/load.json" &
load_pid=$!
rm -f "$WORK/load.started"
while [ ! -f "$WORK/load.started" ]; do sleep 0.1; done
sleep 8
# a crash, not an operator's stop: SIGKILL to the server process from the host (as the OOM killer does);
# `podman kill` would mark the container stopped by the user, which no restart policy restarts
kill -KILL "$(podman inspect -f '{{.State.Pid}}' "${PROJECT}_vitmerge-1_1")"
killed_at=$(date +%s.%N)
echo "killed the server process of ${PROJECT}_vitmerge-1_1 under load"
if wait "$load_pid"; then load_ok=1; else load_ok=0; fi
cat "$WORK/load.json"
# what nginx said about its upstreams while the replica died (error_log: stderr, level error)
podman logs "${PROJECT}_lb_1" 2>&1 | grep -E "upstream|live" >"$WORK/nginx-errors.txt" || true
echo "nginx upstream errors during the kill ($WORK/nginx-errors.txt), by kind:"
sed -E 's/^.*\[(error|warn|crit)\] [0-9#*]+ ?[0-9]* ?//; s/, client:.*$//; s/[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+:[0-9]+/ADDR/g' \
    "$WORK/nginx-errors.txt" | sort | uniq -c | sort -rn | head -8
restarted=""
for _ in $(seq 1 60); do  # restart: unless-stopped, then the replica loads the store again
    ip=$(ctr_ip "${PROJECT}_vitmerge-1_1" 2>/dev/null || true)
    if [ -n "$ip" ] && "$PY" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" \
        "http://$ip:8000/readyz" 2>/dev/null; then
        restarted=$("$PY" -c "import time; print(round(time.time() - $killed_at, 1))")
        break
    fi
    sleep 1
done
echo "killed replica afterwards: $(podman inspect -f '{{.State.Status}}, restarts {{.RestartCount}}' "${PROJECT}_vitmerge-1_1")"
record killed_replica_ready_again_s "${restarted:-not within 60 s}"
check "the killed replica is restarted and ready again" test -n "$restarted"
record requests_lost_on_kill "$("$PY" -c 'import json, sys; r = json.load(sys.stdin); print(r["failed"], "of", r["ok"] + r["failed"])' <"$WORK/load.json")"
check "0 failed client requests while a replica was killed" test "$load_ok" = 1
# the same with an operator's `podman kill` of the OTHER replica (its network namespace goes with it; no
# restart: the container counts as stopped by the user), once the first one is back
if [ -n "$restarted" ]; then
    "${CLIENT[@]}" load "$LB" --examples "$STORE/examples" --threads 4 --seconds 20 --started "$WORK/load.started" \
        >"$WORK/load2.json" &
    load_pid=$!
    rm -f "$WORK/load.started"
    while [ ! -f "$WORK/load.started" ]; do sleep 0.1; done
    sleep 6
    podman kill "${PROJECT}_vitmerge-2_1" >/dev/null
    echo "podman kill ${PROJECT}_vitmerge-2_1 under load"
    if wait "$load_pid"; then load2_ok=1; else load2_ok=0; fi
    cat "$WORK/load2.json"
    record requests_lost_on_podman_kill "$("$PY" -c 'import json, sys; r = json.load(sys.stdin); print(r["failed"], "of", r["ok"] + r["failed"])' <"$WORK/load2.json")"
    check "0 failed client requests while a replica container was podman-killed" test "$load2_ok" = 1
fi
compose down -v -t 5 >/dev/null 2>&1
check "compose torn down" test -z "$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT")"

step "6. Kubernetes manifests: podman kube play"
# What podman 4.3's kube play cannot do as Kubernetes does, worked around here:
#  - no kustomize and no HPA: the manifests are played one by one (the HPA, like every manifest, is
#    validated offline against the Kubernetes API schemas by tests/deploy/test_deploy.py);
#  - it publishes each pod's containerPort on the host, so a 2nd replica cannot bind port 8000 on
#    one machine: the Deployment is played with replicas: 1 (compose above ran 2 on one volume);
#  - a Secret document is stored in a form its own envFrom cannot read ("not valid JSON"): the
#    podman secret is created from secret.yaml as the {key: base64} JSON that envFrom reads;
#  - an existing volume makes a PVC play fail: the PVC is played first, then seeded with the
#    host's store so that the pod starts warm (a cold start was measured above);
#  - probes: startup/readiness probes are not run, the liveness probe needs systemd (absent here).
podman kube down "$WORK/k8s.yaml" >/dev/null 2>&1 || true
podman volume rm -f vitmerge-store >/dev/null 2>&1 || true
podman secret rm vitmerge-admin >/dev/null 2>&1 || true
{
    cat deploy/k8s/configmap.yaml
    echo "---"
    sed 's/^  replicas: .*/  replicas: 1/' deploy/k8s/deployment.yaml
    echo "---"
    cat deploy/k8s/service.yaml
} >"$WORK/k8s.yaml"
"$PY" -c '
import base64, json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
print(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in doc["stringData"].items()}))
' deploy/k8s/secret.yaml | podman secret create vitmerge-admin - >/dev/null
if podman kube play deploy/k8s/pvc.yaml >"$WORK/kube-play.log" 2>&1; then
    pass "podman kube play pvc.yaml (PersistentVolumeClaim -> volume vitmerge-store)"
else
    fail "podman kube play pvc.yaml"
fi
volume=$(podman volume inspect -f '{{.Mountpoint}}' vitmerge-store)
cp -a "$STORE/." "$volume/"
chown -R 10001:10001 "$volume"
if podman kube play "$WORK/k8s.yaml" >>"$WORK/kube-play.log" 2>&1; then
    pass "podman kube play (ConfigMap, Secret via envFrom, Deployment, Service)"
else
    cat "$WORK/kube-play.log"
    fail "podman kube play"
fi
pod_ctr=$(podman ps --format '{{.Names}}' | grep -E '^vitmerge-pod-[0-9]+-vitmerge$' | head -1 || true)
if [ -n "$pod_ctr" ]; then
    POD="http://$(ctr_ip "$pod_ctr"):8000"
    echo "pod container $pod_ctr at $POD"
    check "the pod is ready (probes' /readyz)" "${CLIENT[@]}" wait-ready "$POD" --timeout 300
    check "the pod runs as 10001 with a read-only root filesystem" \
        test "$(podman inspect -f '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}' "$pod_ctr")" = "10001:10001 true"
    check "ConfigMap and Secret reach the pod's environment" \
        podman exec "$pod_ctr" sh -c '[ "$VITMERGE_ZOO" = tiny ] && [ -n "$VITMERGE_ADMIN_TOKEN" ]'
    check "classify through the pod" \
        "${CLIENT[@]}" classify "$POD" --examples "$STORE/examples" --out "$WORK/answers-pod.json"
else
    podman ps -a
    fail "no pod container found"
fi
podman kube down "$WORK/k8s.yaml" >/dev/null 2>&1 || true
podman volume rm -f vitmerge-store >/dev/null 2>&1 || true
podman secret rm vitmerge-admin >/dev/null 2>&1 || true
check "kube play torn down" test -z "$(podman ps -aq --filter name=vitmerge-pod)"

step "results ($RESULTS)"
cat "$RESULTS"
echo
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
