#!/usr/bin/env bash
# Provisions one Vagrant node: Debian packages, etcd (on the etcd node only), this project in
# /opt/flanneld, flanneld as a systemd service, the CNI plugin, and one CNI-attached "pod".
# Idempotent: `vagrant provision` re-runs it safely.
#   provision.sh <node name> <node IP> <etcd node IP>
set -euo pipefail
NAME=$1 NODE_IP=$2 ETCD_IP=$3
ETCD=http://$ETCD_IP:2379
SRC=/flanneld-src
HERE=$SRC/vagrant
export DEBIAN_FRONTEND=noninteractive

apt-get update -q
apt-get install -y -q --no-install-recommends \
    etcd-client iproute2 iptables nftables containernetworking-plugins wireguard-tools wireguard-go iputils-ping iperf3 tcpdump \
    python3 python3-venv python3-pip >/dev/null

if [ "$NODE_IP" = "$ETCD_IP" ]; then
    apt-get install -y -q --no-install-recommends etcd-server >/dev/null
    cat >/etc/default/etcd <<CONF
ETCD_NAME=$NAME
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://$ETCD_IP:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=$ETCD
CONF
    systemctl restart etcd
fi

# the project, in its own virtualenv (Debian's interpreter: the CNI plugin starts it per pod)
if [ ! -x /opt/flanneld/venv/bin/python ]; then
    python3 -m venv /opt/flanneld/venv
fi
/opt/flanneld/venv/bin/python -m pip install -q --upgrade "$SRC"

if [ "$NODE_IP" = "$ETCD_IP" ]; then
    for _ in $(seq 30); do
        etcdctl --endpoints="$ETCD" endpoint health >/dev/null 2>&1 && break
        sleep 1
    done
    # validated by the daemon's own parser; "config unchanged" on a re-run
    /opt/flanneld/venv/bin/flannelctl --etcd-endpoints "$ETCD" config set "$HERE/network.json"
fi

# flanneld: the underlay is the private network, not Vagrant's NAT interface
cat >/etc/default/flanneld <<CONF
FLANNELD_ETCD_ENDPOINTS=$ETCD
FLANNELD_IFACE=$NODE_IP
FLANNELD_IP_MASQ=true
CONF
# the hardened unit shipped with the package (ExecStart: this venv's flanneld)
/opt/flanneld/venv/bin/flanneld install-unit --force
systemctl daemon-reload
systemctl enable flanneld >/dev/null 2>&1
systemctl restart flanneld  # Type=notify: returns once the lease, data plane and subnet.env are in place

/opt/flanneld/venv/bin/flanneld install-cni --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d
"$HERE/pod.sh" >"/vagrant-shared/pod-ip-$NAME"
echo "$NAME: flanneld $(systemctl is-active flanneld), pod address $(cat "/vagrant-shared/pod-ip-$NAME")"
/opt/flanneld/venv/bin/flannelctl --etcd-endpoints "$ETCD" subnets list
