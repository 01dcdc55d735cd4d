#!/usr/bin/env bash
# Attaches network namespace "pod" through the installed flannel CNI plugin, exactly as a
# container runtime would (env + the conflist's plugin config on stdin), and prints its IPv4
# address. Re-running deletes the previous attachment first; so does a run after a reboot, when
# the namespace is gone but host-local's reservation for this container ID is still on disk (a
# runtime DELs what it may have left, and CNI's DEL of something absent succeeds). A CNI error is
# printed as one line. The paths can be moved (tests do): CONFLIST, CNI_BIN_DIR, CNI_PATH, POD.
set -euo pipefail
CONFLIST=${CONFLIST:-/etc/cni/net.d/10-flannel.conflist}
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
POD=${POD:-pod}
export CNI_CONTAINERID=${CNI_CONTAINERID:-vagrant-pod} CNI_NETNS=/var/run/netns/$POD CNI_IFNAME=eth0
export CNI_PATH=${CNI_PATH:-$CNI_BIN_DIR:/usr/lib/cni}
CONF=$(python3 -c '
import json, sys
conflist = json.load(open(sys.argv[1]))
plugin = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
print(json.dumps(plugin))' "$CONFLIST")

echo "$CONF" | CNI_COMMAND=DEL "$CNI_BIN_DIR/flannel" >/dev/null || true
ip netns delete "$POD" 2>/dev/null || true
ip netns add "$POD"
status=0
RESULT=$(echo "$CONF" | CNI_COMMAND=ADD "$CNI_BIN_DIR/flannel") || status=$?
echo "$RESULT" | python3 -c '
import json, sys
try:
    result = json.load(sys.stdin)
except ValueError:
    sys.exit("pod.sh: the CNI plugin printed no result (exit status " + sys.argv[1] + ")")
if "code" in result:  # a CNI error: {"code", "msg", "details"}
    line = "pod.sh: CNI ADD failed: " + str(result.get("msg", ""))
    if result.get("details"):
        line += ": " + str(result["details"])
    sys.exit(line + " (code " + str(result["code"]) + ")")
v4 = [ip["address"].split("/")[0] for ip in result.get("ips", []) if ":" not in ip["address"]]
if not v4:
    sys.exit("pod.sh: the CNI result has no IPv4 address: " + json.dumps(result))
print(v4[0])' "$status"
