"""The ``flannel`` CNI plugin (CNI spec 1.1.0): standard library only, built to start fast.

kubelet/containerd run this once per pod, so start-up is the cost: no ``json`` (it drags in
``re`` and ``enum``), no ``ipaddress``/``socket``/``subprocess``, not even ``os`` (~2 ms of
imports; the built-in ``posix`` it wraps is already loaded); JSON goes through the C ``_json``
module directly and ADD replaces this process with the delegate (``execve``) once the delegate
config is safely on disk.

Behaviour is upstream flannel-io/cni-plugin's, plus what upstream leaves out:

* ADD builds the delegate (bridge + host-local) from subnet.env exactly as upstream and saves its
  bytes to ``<dataDir>/<containerID>`` (0700 dir, 0600 file, fsync) before running it;
* DEL runs the delegate from the saved bytes only and keeps them when the delegate fails, so a
  retry can still free the IP (upstream deletes them and leaks the IP);
* CHECK runs the delegate's CHECK with ``prevResult`` and reports a pod whose subnet is no longer
  the node's; STATUS fails with code 50 and a useful message while flanneld is not ready; GC
  releases every saved attachment missing from ``cni.dev/valid-attachments``; VERSION.

Errors are CNI error objects on stdout (code, msg, details) with exit status 1; a Python
traceback never reaches stdout.
"""

import _json
import posix
import sys

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
IFNAME_DIR = ".ifname"  # per-attachment interface names for GC (a name no container ID can have)

# CNI spec error codes
E_INCOMPATIBLE_VERSION = 1
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
E_SUBNET_CHANGED = 100  # plugin-specific: the pod's subnet is no longer this node's
E_INTERNAL = 999

MIN_MTU, MAX_MTU = 68, 65535  # FLANNEL_MTU's range, as flanneld.model.subnetenv's (a test pins them equal)

REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}


class CniError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# -- JSON through the C accelerator only -----------------------------------------------------


class _ScanContext:
    """The attributes _json.make_scanner reads from a JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo = None

    @staticmethod
    def parse_constant(name):
        raise ValueError(f"{name} is not valid JSON")


_scan = _json.make_scanner(_ScanContext())
_WS = " \t\r\n"


def loads(text):
    idx = 0
    while idx < len(text) and text[idx] in _WS:
        idx += 1
    try:
        value, end = _scan(text, idx)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at offset {exc.value}") from None
    except SystemError:
        # the C scanner builds its detailed error from json.decoder, which we never import
        raise ValueError("invalid JSON") from None
    while end < len(text) and text[end] in _WS:
        end += 1
    if end != len(text):
        raise ValueError(f"extra data after the JSON value at offset {end}")
    return value


def _unencodable(obj):
    raise TypeError(f"cannot encode {type(obj).__name__}")


_encode = _json.make_encoder(None, _unencodable, _json.encode_basestring, None, ":", ",", True, False, True)


def dumps(value):
    """Compact, sorted-key JSON with Go's HTML-safe escaping: the bytes upstream would save."""
    text = "".join(_encode(value, 0))
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        text = (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
                .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return text


# -- what ``os`` would give, from the built-in ``posix`` -------------------------------------

_FS_ENCODING = sys.getfilesystemencoding()


def getenv(name):
    """os.environ.get: posix.environ holds the bytes the kernel passed us."""
    value = posix.environ.get(name.encode(_FS_ENCODING))
    return None if value is None else value.decode(_FS_ENCODING, "surrogateescape")


def _child_environ(command, overrides=None):
    """Our environment for a delegate, with its CNI_COMMAND (and any overrides) set."""
    env = dict(posix.environ)
    for name, value in (overrides or {}).items():
        env[name.encode(_FS_ENCODING)] = value.encode(_FS_ENCODING)
    env[b"CNI_COMMAND"] = command.encode()
    return env


def _join(directory, name):
    return f"{directory.rstrip('/')}/{name}"


def _makedirs(path, mode):
    """os.makedirs(path, mode, exist_ok=True), every created directory with `mode` as Go's MkdirAll."""
    try:
        posix.mkdir(path, mode)
    except FileExistsError:
        pass  # a non-directory there fails the write that follows, with its own error
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent:
            raise
        _makedirs(parent, mode)
        try:  # noqa: SIM105 - see _unlink_if_present
            posix.mkdir(path, mode)
        except FileExistsError:
            pass


def _unlink_if_present(path):
    try:  # noqa: SIM105 - importing contextlib would cost start-up time on every pod
        posix.unlink(path)
    except FileNotFoundError:
        pass


def _is_executable_file(path):
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o100000 and posix.access(path, posix.X_OK)
    except OSError:
        return False


# -- small helpers ---------------------------------------------------------------------------


def _decimal(text):
    """ASCII digits only: str.isdigit() also accepts other scripts' digits, which int() then reads."""
    return text.isascii() and text.isdigit()


def _network(cidr, version=None):
    """'10.5.72.1/24' -> '10.5.72.0/24' (also IPv6; of that IP `version` if given), without importing
    ipaddress. Accepts what Python's ipaddress and Go's ParseCIDR accept (no leading zeros in IPv4,
    no IPv6 zone or embedded IPv4): the daemon's reader (flanneld.model.subnetenv) is held to agree."""
    addr, sep, plen_text = cidr.strip().partition("/")
    if not sep or not _decimal(plen_text) or (version is not None and (":" in addr) != (version == 6)):
        raise ValueError(f"{cidr!r} is not a CIDR" if version is None else f"{cidr!r} is not an IPv{version} CIDR")
    plen = int(plen_text)
    if ":" not in addr:
        parts = addr.split(".")
        if (len(parts) != 4 or not all(_decimal(p) and int(p) < 256 and (p == "0" or p[0] != "0") for p in parts)
                or plen > 32):
            raise ValueError(f"{cidr!r} is not a CIDR")
        value = 0
        for p in parts:
            value = value << 8 | int(p)
        value &= ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1)
        return ".".join(str(value >> s & 255) for s in (24, 16, 8, 0)) + f"/{plen}"
    if plen > 128:
        raise ValueError(f"{cidr!r} is not a CIDR")
    head, dbl, tail = addr.partition("::")
    if "::" in tail:
        raise ValueError(f"{cidr!r} is not a CIDR")
    left = head.split(":") if head else []
    right = tail.split(":") if tail else []
    if dbl and len(left) + len(right) > 7:
        raise ValueError(f"{cidr!r} is not a CIDR")
    groups = left + ["0"] * (8 - len(left) - len(right)) + right if dbl else left
    if len(groups) != 8 or not all(1 <= len(g) <= 4 and all(c in "0123456789abcdefABCDEF" for c in g)
                                   for g in groups):
        raise ValueError(f"{cidr!r} is not a CIDR")
    value = 0
    for g in groups:
        value = value << 16 | int(g, 16)
    value &= ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1)
    hextets = [f"{value >> (112 - 16 * i) & 0xFFFF:x}" for i in range(8)]
    best_start, best_len, i = -1, 0, 0
    while i < 8:  # RFC 5952: compress the longest run of zero groups (length > 1)
        if hextets[i] == "0":
            j = i
            while j < 8 and hextets[j] == "0":
                j += 1
            if j - i > best_len and j - i > 1:
                best_start, best_len = i, j - i
            i = j
        else:
            i += 1
    if best_start >= 0:
        text = ":".join(hextets[:best_start]) + "::" + ":".join(hextets[best_start + best_len:])
    else:
        text = ":".join(hextets)
    return f"{text}/{plen}"


def read_subnet_env(path):
    """subnet.env as upstream's plugin reads it; CniError(11) when flanneld has not written it yet."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise CniError(E_TRY_AGAIN, f"{path} does not exist: flanneld is not running or not ready on this node",
                       "check flanneld on the node (systemctl status flanneld / journalctl -u flanneld)") from None
    except OSError as exc:
        raise CniError(E_IO, f"cannot read {path}: {exc.strerror}") from None
    env = {"networks": [], "ipv6_networks": [], "subnet": None, "ipv6_subnet": None, "mtu": None, "ipmasq": None}
    try:
        for line in text.splitlines():
            key, _, value = line.partition("=")
            value = value.strip()
            if key == "FLANNEL_NETWORK":
                env["networks"] = [_network(v, 4) for v in value.split(",") if v.strip()]
            elif key == "FLANNEL_SUBNET":
                env["subnet"] = _network(value, 4)
            elif key == "FLANNEL_IPV6_NETWORK":
                env["ipv6_networks"] = [_network(v, 6) for v in value.split(",") if v.strip()]
            elif key == "FLANNEL_IPV6_SUBNET":
                env["ipv6_subnet"] = _network(value, 6)
            elif key == "FLANNEL_MTU":
                if not (value.isascii() and value.isdigit()) or not MIN_MTU <= int(value) <= MAX_MTU:
                    raise ValueError(f"FLANNEL_MTU must be a number in {MIN_MTU}..{MAX_MTU}, got {value!r}")
                env["mtu"] = int(value)
            elif key == "FLANNEL_IPMASQ":
                if value not in ("true", "false"):  # upstream's plugin took any other word for false
                    raise ValueError(f"FLANNEL_IPMASQ must be true or false, got {value!r}")
                env["ipmasq"] = value == "true"
    except ValueError as exc:
        raise CniError(E_INVALID_CONFIG, f"{path} is malformed: {exc}") from None
    missing = []
    if not env["networks"] and not env["ipv6_networks"]:
        missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
    if env["subnet"] is None and env["ipv6_subnet"] is None:
        missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
    if env["mtu"] is None:
        missing.append("FLANNEL_MTU")
    if env["ipmasq"] is None:
        missing.append("FLANNEL_IPMASQ")
    if missing:
        raise CniError(E_TRY_AGAIN, f"{path} is missing {', '.join(missing)}", "check flanneld on the node")
    return env


def _valid_name(value):
    """CNI's container ID / network name rule: ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$."""
    return bool(value) and value[0].isascii() and value[0].isalnum() and \
        all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)


def _version_tuple(version):
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def find_plugin(name, cni_path):
    for directory in cni_path.split(":"):
        if directory:
            candidate = _join(directory, name)
            if _is_executable_file(candidate):
                return candidate
    raise CniError(E_NOT_AVAILABLE, f"delegate plugin {name!r} not found in CNI_PATH ({cni_path})",
                   "install the reference CNI plugins (bridge, host-local)")


def run_plugin(path, command, conf_bytes, env_overrides):
    """Run a plugin (fork/exec, no subprocess module); return (exit status, stdout bytes)."""
    env = _child_environ(command, env_overrides)
    in_r, in_w = posix.pipe()
    out_r, out_w = posix.pipe()
    pid = posix.fork()
    if pid == 0:  # child
        try:
            posix.dup2(in_r, 0)
            posix.dup2(out_w, 1)
            for fd in (in_r, in_w, out_r, out_w):
                posix.close(fd)
            posix.execve(path, [path], env)
        finally:
            posix._exit(127)
    posix.close(in_r)
    posix.close(out_w)
    posix.write(in_w, conf_bytes)  # configs are far smaller than a pipe buffer
    posix.close(in_w)
    chunks = []
    while True:
        chunk = posix.read(out_r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    posix.close(out_r)
    _, status = posix.waitpid(pid, 0)
    return posix.waitstatus_to_exitcode(status), b"".join(chunks)


def exec_plugin(path, command, conf_bytes):
    """Replace this process with the plugin, config on its stdin: its result is ours, unchanged."""
    read_end, write_end = posix.pipe()
    posix.write(write_end, conf_bytes)
    posix.close(write_end)
    posix.dup2(read_end, 0)
    posix.close(read_end)
    env = _child_environ(command)
    sys.stdout.flush()
    posix.execve(path, [path], env)


# -- state -----------------------------------------------------------------------------------


def _data_dir(conf):
    return conf.get("dataDir") or DEFAULT_DATA_DIR


def _subnet_file(conf):
    return conf.get("subnetFile") or DEFAULT_SUBNET_FILE


def _ifname_dir(data_dir):
    return _join(data_dir, IFNAME_DIR)


def _write_durably(directory, name, data, sync=True):
    """Atomic replace of `directory`/`name` (mode 0600); with `sync`, file and directory entry are on disk on return."""
    path = _join(directory, name)
    tmp = _join(directory, f".tmp-{name}-{posix.getpid()}")
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC, 0o600)
    try:
        try:
            posix.write(fd, data)
            if sync:
                posix.fsync(fd)
        finally:
            posix.close(fd)
        posix.rename(tmp, path)
    except OSError:
        _unlink_if_present(tmp)  # GC skips dot files: a leftover would stay forever
        raise
    if not sync:
        return
    dfd = posix.open(directory, posix.O_RDONLY)
    try:
        posix.fsync(dfd)
    finally:
        posix.close(dfd)


def save_state(data_dir, container_id, ifname, delegate_bytes):
    try:
        ifname_dir = _ifname_dir(data_dir)
        # The interface name only serves GC, which falls back to "eth0" (what upstream's state and
        # every Kubernetes pod use) if a crash loses it: not worth two fsyncs on every pod.
        for attempt in (1, 2):
            _makedirs(ifname_dir, 0o700)
            try:
                _write_durably(ifname_dir, container_id, ifname.encode(), sync=False)
                break
            except FileNotFoundError:  # a concurrent DEL removed the emptied directory: make it again
                if attempt == 2:
                    raise
        _write_durably(data_dir, container_id, delegate_bytes)
    except OSError as exc:
        raise CniError(E_IO, f"cannot save the delegate config in {data_dir}: {exc.strerror}") from None


def load_state(data_dir, container_id):
    """The saved delegate bytes, or None when there are none."""
    try:
        with open(_join(data_dir, container_id), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CniError(E_IO, f"cannot read saved state for {container_id}: {exc.strerror}") from None


def remove_state(data_dir, container_id):
    _unlink_if_present(_join(data_dir, container_id))
    ifname_dir = _ifname_dir(data_dir)
    _unlink_if_present(_join(ifname_dir, container_id))
    # the last attachment gone: leave no empty directory behind (an ADD makes it again)
    try:  # noqa: SIM105 - see _unlink_if_present
        posix.rmdir(ifname_dir)
    except OSError:
        pass  # not empty (other pods), or already gone


def saved_ifname(data_dir, container_id):
    try:
        with open(_join(_ifname_dir(data_dir), container_id)) as fh:
            return fh.read().strip() or "eth0"
    except OSError:
        return "eth0"  # saved by upstream's plugin, which does not record it


# -- the commands ----------------------------------------------------------------------------


def build_delegate(conf, fenv):
    """Upstream's delegate: bridge + host-local, ranges from subnet.env, routes to each network."""
    delegate = conf.get("delegate")
    if delegate is None:
        delegate = {}
    elif not isinstance(delegate, dict):
        raise CniError(E_INVALID_CONFIG, "'delegate' must be a JSON object")
    else:
        delegate = dict(delegate)
        if "type" in delegate and not isinstance(delegate["type"], str):
            raise CniError(E_INVALID_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field")
        if "name" in delegate:
            raise CniError(E_INVALID_CONFIG, "'delegate' dictionary must not have 'name' field, "
                                             "it'll be set by flannel")
        if "ipam" in delegate:
            raise CniError(E_INVALID_CONFIG, "'delegate' dictionary must not have 'ipam' field, "
                                             "it'll be set by flannel")
    if conf.get("runtimeConfig") is not None:
        delegate["runtimeConfig"] = conf["runtimeConfig"]
    delegate["name"] = conf["name"]
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not fenv["ipmasq"])
    delegate.setdefault("mtu", fenv["mtu"])
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if conf.get("cniVersion"):
        delegate["cniVersion"] = conf["cniVersion"]

    ipam = conf.get("ipam")
    if ipam is None:
        ipam = {}
    elif not isinstance(ipam, dict):
        raise CniError(E_INVALID_CONFIG, "'ipam' must be a JSON object")
    ipam = dict(ipam)
    ipam.setdefault("type", "host-local")
    ranges = [[{"subnet": s}] for s in (fenv["subnet"], fenv["ipv6_subnet"]) if s]
    ipam["ranges"] = ranges
    routes = ipam.get("routes") or []
    if not isinstance(routes, list) or not all(isinstance(r, dict) and isinstance(r.get("dst"), str) for r in routes):
        raise CniError(E_INVALID_CONFIG, "failed to read IPAM routes: 'ipam.routes' must be a list of {\"dst\": ...}")
    ipam["routes"] = list(routes) + [{"dst": n} for n in fenv["networks"] + fenv["ipv6_networks"]]
    delegate["ipam"] = ipam
    return delegate


def cmd_add(conf, env):
    fenv = read_subnet_env(_subnet_file(conf))
    delegate = build_delegate(conf, fenv)
    plugin = find_plugin(delegate["type"], env["CNI_PATH"])
    data = dumps(delegate).encode()
    save_state(_data_dir(conf), env["CNI_CONTAINERID"], env["CNI_IFNAME"], data)
    exec_plugin(plugin, "ADD", data)


def _saved_delegate(data, what):
    try:
        delegate = loads(data.decode("utf-8"))
        if not isinstance(delegate, dict) or not isinstance(delegate.get("type"), str):
            raise ValueError("no string 'type'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(E_DECODE, f"saved delegate config for {what} is unreadable: {exc}") from None
    return delegate


def _forward_failure(output, what):
    """Relay a delegate's CNI error (or wrap its raw output) as ours."""
    text = output.decode("utf-8", "replace").strip()
    try:
        err = loads(text)
        if isinstance(err, dict) and "code" in err:
            raise CniError(err.get("code") or E_INTERNAL, f"{what}: {err.get('msg', '')}", err.get("details", ""))
    except ValueError:
        pass
    raise CniError(E_INTERNAL, f"{what} failed", text)


def cmd_del(conf, env):
    data_dir = _data_dir(conf)
    cid = env["CNI_CONTAINERID"]
    data = load_state(data_dir, cid)
    if data is None:
        return  # nothing was set up, or it is already gone: DEL is idempotent
    delegate = _saved_delegate(data, cid)
    status, output = run_plugin(find_plugin(delegate["type"], env["CNI_PATH"]), "DEL", data, {})
    if status != 0:
        _forward_failure(output, f"delegate {delegate['type']} DEL (state kept for a retry)")
    remove_state(data_dir, cid)


def cmd_check(conf, env):
    if _version_tuple(conf.get("cniVersion", "")) < (0, 4, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, f"config version {conf.get('cniVersion')!r} does not allow CHECK")
    if "prevResult" not in conf:
        raise CniError(E_INVALID_CONFIG, "CHECK needs 'prevResult' in the network config")
    data_dir = _data_dir(conf)
    cid = env["CNI_CONTAINERID"]
    data = load_state(data_dir, cid)
    if data is None:
        raise CniError(E_UNKNOWN_CONTAINER, f"no saved state for container {cid}: ADD never succeeded here")
    delegate = _saved_delegate(data, cid)
    fenv = read_subnet_env(_subnet_file(conf))
    pod_ranges = {r[0].get("subnet") for r in delegate.get("ipam", {}).get("ranges", []) if r}
    node_ranges = {s for s in (fenv["subnet"], fenv["ipv6_subnet"]) if s}
    if pod_ranges != node_ranges:
        raise CniError(E_SUBNET_CHANGED, f"the pod's network ({', '.join(sorted(pod_ranges))}) is no longer this "
                       f"node's flannel subnet ({', '.join(sorted(node_ranges))})", "recreate the pod")
    delegate["prevResult"] = _explicit_gateways(conf["prevResult"])
    if conf.get("cniVersion"):
        delegate["cniVersion"] = conf["cniVersion"]
    status, output = run_plugin(find_plugin(delegate["type"], env["CNI_PATH"]), "CHECK", dumps(delegate).encode(), {})
    if status != 0:
        _forward_failure(output, f"delegate {delegate['type']} CHECK")


def _explicit_gateways(prev):
    """prevResult with each gateway-less route given the pod gateway of its family.

    host-local programs such routes via that gateway, and the reference bridge plugin's CHECK
    compares gateways literally: without this, CHECK of flannel's own routes always fails.
    """
    if not isinstance(prev, dict):
        return prev
    gateways = {}
    for ip in prev.get("ips", []) or []:
        if isinstance(ip, dict) and isinstance(ip.get("gateway"), str):
            gateways.setdefault(":" in ip["gateway"], ip["gateway"])
    routes = []
    for route in prev.get("routes", []) or []:
        if isinstance(route, dict) and not route.get("gw") and isinstance(route.get("dst"), str):
            gw = gateways.get(":" in route["dst"])
            route = {**route, "gw": gw} if gw else route
        routes.append(route)
    return {**prev, "routes": routes} if routes else prev


def _require_1_1(conf, command):
    if _version_tuple(conf.get("cniVersion", "")) < (1, 1, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, f"config version {conf.get('cniVersion')!r} does not allow {command} "
                       "(needs 1.1.0)")


def cmd_status(conf, env):
    _require_1_1(conf, "STATUS")
    path = _subnet_file(conf)
    try:
        read_subnet_env(path)
    except CniError as exc:
        raise CniError(E_NOT_AVAILABLE, f"flannel is not ready: {exc.msg}", exc.details) from None
    delegate = conf.get("delegate") if isinstance(conf.get("delegate"), dict) else {}
    find_plugin(delegate.get("type", "bridge") if isinstance(delegate.get("type"), str) else "bridge",
                env["CNI_PATH"])
    ipam = conf.get("ipam") if isinstance(conf.get("ipam"), dict) else {}
    find_plugin(ipam.get("type", "host-local") if isinstance(ipam.get("type"), str) else "host-local",
                env["CNI_PATH"])


def cmd_gc(conf, env):
    """Release every saved attachment the runtime no longer knows (delegate DEL, then forget it)."""
    _require_1_1(conf, "GC")
    valid = conf.get("cni.dev/valid-attachments", [])
    if not isinstance(valid, list):
        raise CniError(E_INVALID_CONFIG, "'cni.dev/valid-attachments' must be a list")
    keep = {(a.get("containerID"), a.get("ifname")) for a in valid if isinstance(a, dict)}
    data_dir = _data_dir(conf)
    try:
        names = posix.listdir(data_dir)
    except FileNotFoundError:
        return
    failures = []
    for cid in sorted(names):
        if cid.startswith(".") or not _valid_name(cid):
            continue
        ifname = saved_ifname(data_dir, cid)
        if (cid, ifname) in keep:
            continue
        data = load_state(data_dir, cid)
        if data is None:
            continue
        try:
            delegate = _saved_delegate(data, cid)
            status, output = run_plugin(find_plugin(delegate["type"], env["CNI_PATH"]), "DEL", data,
                                        {"CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": ""})
        except CniError as exc:
            failures.append(f"{cid}: {exc.msg}")
            continue
        if status != 0:
            failures.append(f"{cid}: {output.decode('utf-8', 'replace').strip()}")
            continue
        remove_state(data_dir, cid)
    if failures:
        raise CniError(E_INTERNAL, f"GC could not release {len(failures)} attachment(s)", "; ".join(failures))


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}


def _environment(command):
    env = {}
    missing = [name for name in REQUIRED_ENV[command] if not getenv(name)]
    if missing:
        raise CniError(E_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    for name in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"):
        env[name] = getenv(name) or ""
    cid = env["CNI_CONTAINERID"]
    if cid and not _valid_name(cid):
        raise CniError(E_INVALID_ENV, "invalid characters in CNI_CONTAINERID", cid)
    ifname = env["CNI_IFNAME"]
    if ifname and (len(ifname) > 15 or ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname)):
        raise CniError(E_INVALID_ENV, "invalid CNI_IFNAME", ifname)
    return env


def _config():
    try:
        raw = sys.stdin.buffer.read()
    except OSError as exc:
        raise CniError(E_IO, f"error reading the network config from stdin: {exc.strerror}") from None
    try:
        conf = loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(E_DECODE, f"failed to decode the network config: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "the network config must be a JSON object")
    version = conf.get("cniVersion", "")
    if not isinstance(version, str) or (version and version not in SUPPORTED_VERSIONS):
        raise CniError(E_INCOMPATIBLE_VERSION, f"incompatible CNI versions: config is {version!r}, plugin supports "
                       f"{list(SUPPORTED_VERSIONS)}")
    name = conf.get("name")
    if not isinstance(name, str) or not _valid_name(name):
        raise CniError(E_INVALID_CONFIG, "missing or invalid network name", repr(name))
    for key in ("subnetFile", "dataDir"):
        if key in conf and not isinstance(conf[key], str):
            raise CniError(E_INVALID_CONFIG, f"'{key}' must be a string")
    return conf


def _emit_error(err, version):
    body = {"cniVersion": version if version in SUPPORTED_VERSIONS else "1.1.0", "code": err.code, "msg": err.msg}
    if err.details:
        body["details"] = err.details
    sys.stdout.write(dumps(body) + "\n")
    sys.stdout.flush()


def main():
    command = getenv("CNI_COMMAND") or ""
    version = "1.1.0"
    try:
        if command == "VERSION":
            sys.stdout.write(dumps({"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}) + "\n")
            return 0
        if not command:
            sys.stderr.write("flannel CNI plugin: run by a container runtime with CNI_COMMAND set "
                             f"(supports CNI {', '.join(SUPPORTED_VERSIONS)})\n")
            return 0
        if command not in COMMANDS:
            raise CniError(E_INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
        env = _environment(command)
        conf = _config()
        version = conf.get("cniVersion") or version
        COMMANDS[command](conf, env)
        return 0
    except CniError as err:
        _emit_error(err, version)
        return 1
    except Exception as exc:  # never a traceback on stdout
        _emit_error(CniError(E_INTERNAL, f"internal error: {type(exc).__name__}: {exc}"), version)
        return 1


if __name__ == "__main__":
    sys.exit(main())
