#!/usr/bin/env bash
# Provisions one node: Debian packages, etcd (on the etcd node only), this project in
# /opt/flanneld/venv, flanneld as a systemd service, the CNI plugin, and one CNI-attached "pod".
# Idempotent: `vagrant provision` re-runs it safely.
#   provision.sh <node name> <node IP> <etcd node IP> [--wheelhouse DIR] [--network FILE]
# --wheelhouse DIR: no network (the machines test tier): the Debian packages must be installed
#   already (checked, not fetched) and the project and its dependencies come from DIR's wheels.
# --network FILE: the network config the etcd node stores (default: network.json next to this).
# Everything is checked before anything changes: not root, PID 1 not systemd, a package missing or
# a wheelhouse that cannot install the project each stop it with one line and exit status 1.
set -euo pipefail
fail() { echo "provision.sh: $*" >&2; exit 1; }
[ $# -ge 3 ] || fail "usage: provision.sh <node name> <node IP> <etcd node IP> [--wheelhouse DIR] [--network FILE]"
NAME=$1 NODE_IP=$2 ETCD_IP=$3
shift 3
SRC=/flanneld-src
HERE=$SRC/vagrant
WHEELHOUSE="" NETWORK=$HERE/network.json
while [ $# -gt 0 ]; do
    case $1 in
        --wheelhouse) [ $# -ge 2 ] || fail "--wheelhouse needs a directory"; WHEELHOUSE=$2; shift 2 ;;
        --network) [ $# -ge 2 ] || fail "--network needs a file"; NETWORK=$2; shift 2 ;;
        *) fail "unknown option $1" ;;
    esac
done
ETCD=http://$ETCD_IP:2379
VENV=/opt/flanneld/venv
PACKAGES="etcd-client iproute2 iptables nftables containernetworking-plugins wireguard-tools wireguard-go iputils-ping
 iperf3 tcpdump python3 python3-venv python3-pip"
[ "$NODE_IP" = "$ETCD_IP" ] && PACKAGES="$PACKAGES etcd-server"
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages, a systemd unit and the CNI plugin)"
pid1=$(cat /proc/1/comm 2>/dev/null || echo unknown)
[ "$pid1" = systemd ] || fail "PID 1 is '$pid1', not systemd: flanneld is installed as a systemd service"
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || fail "the wheelhouse $WHEELHOUSE is not a directory"
    missing=""
    for package in $PACKAGES; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null)" = installed ] || missing="$missing $package"
    done
    [ -z "$missing" ] || fail "Debian packages missing:$missing (--wheelhouse: no network, install them first)"
    # resolved against the wheelhouse before anything is installed (pip download installs nothing)
    check=$(mktemp -d)
    if ! out=$(python3 -m pip download -q --no-index --find-links "$WHEELHOUSE" --dest "$check" flanneld-py 2>&1); then
        rm -rf "$check"
        reason=$(echo "$out" | grep -m1 '^ERROR' | sed 's/^ERROR: //')
        fail "the wheelhouse $WHEELHOUSE cannot install flanneld-py: ${reason:-$out}"
    fi
    rm -rf "$check"
else
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null
fi

if [ "$NODE_IP" = "$ETCD_IP" ]; then
    cat >/etc/default/etcd <<CONF
ETCD_NAME=$NAME
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://$ETCD_IP:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=$ETCD
CONF
    # Debian's etcd.service is After=network.target only: at boot etcd can try to listen on the node's
    # address before systemd-networkd has set it, exit 1, and Restart=on-abnormal leaves it dead (and
    # every flanneld without its store). Wait for the address; restart on any failure.
    mkdir -p /etc/systemd/system/etcd.service.d
    cat >/etc/systemd/system/etcd.service.d/10-network-online.conf <<UNIT
[Unit]
After=network-online.target

[Service]
Restart=on-failure
RestartSec=2
UNIT
    systemctl daemon-reload
    systemctl restart etcd
fi

# the project, in its own virtualenv (Debian's interpreter: the CNI plugin starts it per pod)
if [ ! -x $VENV/bin/python ]; then
    python3 -m venv $VENV
fi
if [ -n "$WHEELHOUSE" ]; then
    $VENV/bin/python -m pip install -q --no-index --find-links "$WHEELHOUSE" --upgrade flanneld-py
else
    $VENV/bin/python -m pip install -q --upgrade "$SRC"
fi

if [ "$NODE_IP" = "$ETCD_IP" ]; then
    for _ in $(seq 30); do
        etcdctl --endpoints="$ETCD" endpoint health >/dev/null 2>&1 && break
        sleep 1
    done
    # validated by the daemon's own parser; "config unchanged" on a re-run
    $VENV/bin/flannelctl --etcd-endpoints "$ETCD" config set "$NETWORK"
fi

# flanneld: the underlay is the private network, not Vagrant's NAT interface
cat >/etc/default/flanneld <<CONF
FLANNELD_ETCD_ENDPOINTS=$ETCD
FLANNELD_IFACE=$NODE_IP
FLANNELD_IP_MASQ=true
CONF
# the hardened unit shipped with the package (ExecStart: this venv's flanneld); systemd reloaded
$VENV/bin/flanneld install-unit --force
systemctl enable flanneld >/dev/null 2>&1
systemctl restart flanneld  # Type=notify: returns once the lease, data plane and subnet.env are in place

$VENV/bin/flanneld install-cni --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d
"$HERE/pod.sh" >"/vagrant-shared/pod-ip-$NAME"
echo "$NAME: flanneld $(systemctl is-active flanneld), pod address $(cat "/vagrant-shared/pod-ip-$NAME")"
$VENV/bin/flannelctl --etcd-endpoints "$ETCD" subnets list
