#!/usr/bin/env bash
# Attaches network namespace "pod" through the installed flannel CNI plugin, exactly as a
# container runtime would (env + the conflist's plugin config on stdin), and prints its IPv4
# address. Re-running deletes the previous attachment first.
set -euo pipefail
CONFLIST=/etc/cni/net.d/10-flannel.conflist
export CNI_CONTAINERID=vagrant-pod CNI_NETNS=/var/run/netns/pod CNI_IFNAME=eth0
export CNI_PATH=/opt/cni/bin:/usr/lib/cni
CONF=$(python3 -c '
import json, sys
conflist = json.load(open(sys.argv[1]))
plugin = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
print(json.dumps(plugin))' "$CONFLIST")

if ip netns list | grep -qw pod; then
    echo "$CONF" | CNI_COMMAND=DEL /opt/cni/bin/flannel >/dev/null || true
    ip netns delete pod
fi
ip netns add pod
echo "$CONF" | CNI_COMMAND=ADD /opt/cni/bin/flannel | python3 -c '
import json, sys
result = json.load(sys.stdin)
print(next(ip["address"].split("/")[0] for ip in result["ips"] if ":" not in ip["address"]))'
