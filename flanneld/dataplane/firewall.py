"""Masquerade and forward rules: upstream chains and comments (iptables) or equivalent nftables.

Rule text is pure (:func:`iptables_rules`, :func:`nft_script`). :class:`Firewall` installs it
atomically (``iptables-restore --noflush`` flushing and refilling our own chain in one commit;
``nft -f`` replacing our table in one transaction) and checks for drift by listing once per
table per period (one fork per table, never one per rule), comparing with the *intended* rules
(iptables-save and ``nft list`` print them exactly as we write them, up to indentation). Drift
(a deleted rule, a flushed chain, a missing jump, masquerade rules of an older subnet) triggers a
reinstall. The chains may be shared with the daemon of another network on this host: each owns
the rules naming its network (see ChainView). The reference is never a listing taken after an
install: a change landing between our install and such a listing would become the reference and
never be repaired.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from flanneld.model.config import NetworkConfig
from flanneld.model.family import FAMILIES, Family, family_of
from flanneld.model.lease import Lease

log = logging.getLogger(__name__)

MASQ_CHAIN, FWD_CHAIN = "FLANNEL-POSTRTG", "FLANNEL-FWD"
MASQ_COMMENT, FWD_COMMENT = "flanneld masq", "flanneld forward"
NFT_TABLE = {f.version: (f.nft_family, f.nft_table) for f in FAMILIES}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


class FirewallError(Exception):
    """A firewall tool failed; the message includes its stderr."""


class ToolMissing(FirewallError):
    """A firewall tool is not installed (a host with one mode's tools only)."""


@dataclass(frozen=True)
class FamilyRules:
    network: Network
    pod: Network  # our lease

    @property
    def family(self) -> Family:
        return family_of(self.network.version)


@dataclass(frozen=True)
class FirewallSpec:
    families: tuple[FamilyRules, ...]
    masq: bool
    forward: bool
    random_fully: bool = True
    nftables: bool = False

    @classmethod
    def for_lease(cls, config: NetworkConfig, own: Lease, masq: bool, forward: bool,
                  random_fully: bool = True) -> FirewallSpec:
        """Our rules for each family the config enables and our lease holds."""
        fams = tuple(FamilyRules(fc.network, pod) for fc in config.families()
                     if (pod := fc.family.subnet(own)) is not None)
        return cls(fams, masq, forward, random_fully, config.enable_nftables)


def _masq_rules(fam: FamilyRules, random_fully: bool) -> list[str]:
    c = f'-m comment --comment "{MASQ_COMMENT}"'
    rnd = " --random-fully" if random_fully else ""
    net, pod, mcast = fam.network, fam.pod, fam.family.multicast
    return [
        f"-A {MASQ_CHAIN} -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A {MASQ_CHAIN} -s {pod} -d {net} {c} -j RETURN",
        f"-A {MASQ_CHAIN} -s {net} -d {pod} {c} -j RETURN",
        f"-A {MASQ_CHAIN} ! -s {net} -d {pod} {c} -j RETURN",
        f"-A {MASQ_CHAIN} -s {net} ! -d {mcast} {c} -j MASQUERADE{rnd}",
        f"-A {MASQ_CHAIN} ! -s {net} -d {net} {c} -j MASQUERADE{rnd}",
    ]


def _fwd_rules(fam: FamilyRules) -> list[str]:
    c = f'-m comment --comment "{FWD_COMMENT}"'
    return [f"-A {FWD_CHAIN} -s {fam.network} {c} -j ACCEPT", f"-A {FWD_CHAIN} -d {fam.network} {c} -j ACCEPT"]


# -- chains shared with the daemon of another network on this host ------------------------------
#
# Two flanneld for two networks on one host (upstream's running.md allows it: another
# --etcd-prefix and --subnet-file) write the same chains (FLANNEL-POSTRTG, FLANNEL-FWD; nftables'
# postrtg and forward). Each owns only the rules naming its network: the other's are kept, in
# their order, and are no drift; a rule both write (the mark's RETURN) is kept once, first, for as
# long as either needs it. Anything else in the chain is drift and goes.


def _networks_named(line: str) -> set[str]:
    out = set()
    for token in line.split():
        if "/" in token and token[0].isalnum():
            with contextlib.suppress(ValueError):
                out.add(str(ipaddress.ip_network(token, strict=False)))
    return out


@dataclass(frozen=True)
class ChainView:
    """One chain's rule lines as the daemon of `network` sees them."""

    ours: tuple[str, ...]  # naming our network, or shared: in the chain's order
    others: tuple[str, ...]  # another network's daemon's
    junk: tuple[str, ...]  # neither (a rule added by hand, a mangled one)

    @classmethod
    def of(cls, lines: Sequence[str], network: Network, shared: Sequence[str], comment: str) -> ChainView:
        ours, others, junk = [], [], []
        net = str(network)
        for line in lines:
            named = _networks_named(line)
            if net in named or line in shared:
                ours.append(line)
            elif comment in line and named:
                others.append(line)
            else:
                junk.append(line)
        return cls(tuple(ours), tuple(others), tuple(junk))

    def _expected(self, rules: Sequence[str], shared: Sequence[str]) -> tuple[list[str], list[str]]:
        """(the shared rules needed, by us or the others; our own rules)."""
        return [r for r in shared if r in rules or self.others], [r for r in rules if r not in shared]

    def merged(self, rules: Sequence[str], shared: Sequence[str]) -> list[str]:
        """The chain to write: the shared rules first, the others' next, ours last ([]: no chain)."""
        head, own = self._expected(rules, shared)
        return [*head, *self.others, *own]

    def drifted(self, rules: Sequence[str], shared: Sequence[str]) -> bool:
        """Whether our part differs from `rules` (the others' part is theirs to judge)."""
        head, own = self._expected(rules, shared)
        return bool(self.junk) or list(self.ours) != [*head, *own]


@dataclass(frozen=True)
class ChainSpec:
    table: str
    parent: str
    chain: str
    comment: str
    rules: tuple[str, ...]  # empty: we want nothing in the chain
    network: str = ""  # whose rules these are (see ChainView)
    shared: tuple[str, ...] = ()  # rules every network's daemon writes alike

    @property
    def jump(self) -> str:
        return f'-A {self.parent} -m comment --comment "{self.comment}" -j {self.chain}'

    def view(self, lines: Sequence[str]) -> ChainView:
        return ChainView.of(lines, ipaddress.ip_network(self.network), self.shared, self.comment)


def iptables_rules(spec: FirewallSpec, fam: FamilyRules) -> list[ChainSpec]:
    """Our two chains for one family (rules empty when the feature is off)."""
    masq = tuple(_masq_rules(fam, spec.random_fully))
    return [
        ChainSpec("nat", "POSTROUTING", MASQ_CHAIN, MASQ_COMMENT, masq if spec.masq else (), str(fam.network),
                  masq[:1]),  # the mark's RETURN: every network's daemon writes it alike
        ChainSpec("filter", "FORWARD", FWD_CHAIN, FWD_COMMENT, tuple(_fwd_rules(fam)) if spec.forward else (),
                  str(fam.network)),
    ]


NFT_HEADERS = {"postrtg": "type nat hook postrouting priority srcnat; policy accept;",
               "forward": "type filter hook forward priority filter; policy accept;"}
NFT_COMMENTS = {"postrtg": MASQ_COMMENT, "forward": FWD_COMMENT}


def _nft_rules(spec: FirewallSpec, fam: FamilyRules) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per chain of our table: (our rules, empty when the feature is off; the rules shared with
    other networks' daemons)."""
    ip = fam.family.nft_family
    net, pod, mcast = fam.network, fam.pod, fam.family.multicast
    rnd = " fully-random" if spec.random_fully else ""
    c = f'comment "{MASQ_COMMENT}"'
    masq = (
        f"meta mark & 0x00004000 == 0x00004000 return {c}",
        f"{ip} saddr {pod} {ip} daddr {net} return {c}",
        f"{ip} saddr {net} {ip} daddr {pod} return {c}",
        f"{ip} saddr != {net} {ip} daddr {pod} return {c}",
        f"{ip} saddr {net} {ip} daddr != {mcast} masquerade{rnd} {c}",
        f"{ip} saddr != {net} {ip} daddr {net} masquerade{rnd} {c}",
    )
    c = f'comment "{FWD_COMMENT}"'
    forward = (f"{ip} saddr {net} accept {c}", f"{ip} daddr {net} accept {c}")
    return {"postrtg": (masq if spec.masq else (), masq[:1]), "forward": (forward if spec.forward else (), ())}


def nft_chains(text: str | None) -> dict[str, tuple[str, list[str]]]:
    """A table as ``nft list table`` prints it: per chain, its header and rule lines."""
    chains: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            name = line.split()[1]
            chains[name] = ("", [])
            current = chains[name][1]
        elif line == "}":
            current = None
        elif current is not None and line.startswith("type "):
            chains[name] = (line, current)
        elif current is not None and line:
            current.append(line)
    return chains


def nft_script(spec: FirewallSpec, fam: FamilyRules, listed: Mapping[str, tuple[str, list[str]]] | None = None
               ) -> str | None:
    """The nftables table for one family, keeping what other networks' daemons have in its chains
    (`listed`, see nft_chains); None when nothing is left in it."""
    kind, name = fam.family.nft_family, fam.family.nft_table
    lines = [f"table {kind} {name} {{"]
    for chain, (rules, shared) in _nft_rules(spec, fam).items():
        view = ChainView.of((listed or {}).get(chain, ("", []))[1], fam.network, shared, NFT_COMMENTS[chain])
        merged = view.merged(rules, shared)
        if merged:
            lines += [f"  chain {chain} {{", f"    {NFT_HEADERS[chain]}", *(f"    {r}" for r in merged), "  }"]
    if len(lines) == 1:
        return None
    lines.append("}")
    return "\n".join(lines) + "\n"


def nft_drifted(spec: FirewallSpec, fam: FamilyRules, listed: Mapping[str, tuple[str, list[str]]]) -> bool:
    """Whether our part of the table differs from what we intend (other networks' rules are theirs)."""
    for chain, (rules, shared) in _nft_rules(spec, fam).items():
        header, lines = listed.get(chain, ("", []))
        view = ChainView.of(lines, fam.network, shared, NFT_COMMENTS[chain])
        wanted = bool(view.merged(rules, shared))
        if (chain in listed) != wanted or view.drifted(rules, shared) or (wanted and header != NFT_HEADERS[chain]):
            return True
    return False


TOOL_TIMEOUT = 30  # seconds an iptables/nft call may take (one waiting for the xtables lock included)


def _run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def iptables_tool(version: int, what: str) -> str:
    """iptables-save, ip6tables-restore, ..."""
    return f"{family_of(version).iptables}-{what}"


class Firewall:
    """Installs and watches over our rules."""

    def __init__(self, spec: FirewallSpec, runner: Runner = _run) -> None:
        self.spec = spec
        self._run_tool = runner

    def _tool(self, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
        try:
            proc = self._run_tool(argv, stdin)
        except FileNotFoundError:
            raise ToolMissing(f"{argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            # a FirewallError like any other failure: the check is retried, the loop goes on
            raise FirewallError(f"{argv[0]} did not answer within {TOOL_TIMEOUT} s") from None
        if check and proc.returncode != 0:
            raise FirewallError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    # -- iptables ----------------------------------------------------------------------------

    def _ipt_state(self, version: int, table: str) -> dict[str, list[str]]:
        """Per chain, the rule lines of our chains and the parent chains' lines with our comments."""
        out = self._tool([iptables_tool(version, "save"), "-t", table])
        state: dict[str, list[str]] = {}
        for line in out.splitlines():
            if line.startswith(":"):
                state.setdefault(line[1:].split()[0], [])
            elif line.startswith("-A "):
                chain = line.split()[1]
                if chain in (MASQ_CHAIN, FWD_CHAIN) or MASQ_COMMENT in line or FWD_COMMENT in line:
                    state.setdefault(chain, []).append(line)
        return state

    def _ipt_apply(self, version: int, chains: list[ChainSpec]) -> None:
        for table in sorted({c.table for c in chains}):
            state = self._ipt_state(version, table)
            lines = [f"*{table}"]
            for c in (c for c in chains if c.table == table):
                ours = [line for line in state.get(c.parent, []) if c.comment in line]
                rules = c.view(state.get(c.chain, [])).merged(c.rules, c.shared)
                if rules:
                    lines += [f":{c.chain} - [0:0]", f"-F {c.chain}", *rules]
                    # keep exactly one jump: drop duplicates and rules of older flannel versions
                    lines += ["-D" + line[2:] for line in ours if line != c.jump]
                    if ours.count(c.jump) != 1:
                        lines += ["-D" + c.jump[2:]] * ours.count(c.jump) + [c.jump]
                else:
                    lines += ["-D" + line[2:] for line in ours]
                    if c.chain in state:
                        lines += [f"-F {c.chain}", f"-X {c.chain}"]
            lines.append("COMMIT")
            self._tool([iptables_tool(version, "restore"), "--noflush"], "\n".join(lines) + "\n")

    @staticmethod
    def _ipt_drifted(chains: list[ChainSpec], state: dict[str, list[str]]) -> bool:
        """Whether a table's listing differs from the intended chains (our rules, and one jump each)."""
        for c in chains:
            listed = state.get(c.chain)
            view = c.view(listed or [])
            wanted = bool(view.merged(c.rules, c.shared))
            if (listed is not None) != wanted or view.drifted(c.rules, c.shared):
                return True
            if [line for line in state.get(c.parent, []) if c.comment in line] != ([c.jump] if wanted else []):
                return True
        return False

    # -- nftables ----------------------------------------------------------------------------

    def _nft_state(self, version: int) -> str | None:
        kind, name = NFT_TABLE[version]
        out = self._tool(["nft", "list", "table", kind, name], check=False)
        return out or None

    def _nft_apply(self, version: int, script: str | None) -> None:
        kind, name = NFT_TABLE[version]
        text = f"table {kind} {name}\ndelete table {kind} {name}\n" + (script or "")
        self._tool(["nft", "-f", "-"], text)

    # -- an iptables FORWARD chain that drops, beside our nftables table ------------------------

    def _forward_drops(self, version: int) -> bool:
        """Whether iptables(-nft)'s FORWARD chain exists with a DROP policy (Docker sets one).

        It hooks forwarding as our nftables chain does, and an accept ends only the base chain it
        is in: the packet still meets that chain's DROP. So in nftables mode, with forward rules
        on, we then accept the flannel networks in that chain too, as iptables mode does.
        """
        out = self._tool(["nft", "list", "chain", NFT_TABLE[version][0], "filter", "FORWARD"], check=False)
        return "policy drop;" in out

    def _forward_companion(self, fam: FamilyRules) -> list[ChainSpec]:
        """In nftables mode: the iptables forward chain needed beside our table ([] when none is)."""
        if not (self.spec.nftables and self.spec.forward and self._forward_drops(fam.network.version)):
            return []
        return [c for c in iptables_rules(self.spec, fam) if c.table == "filter"]

    # -- entry points ------------------------------------------------------------------------

    def apply(self) -> None:
        """Install everything now (idempotent, atomic per table)."""
        for fam in self.spec.families:
            version = fam.network.version
            if self.spec.nftables:
                self._nft_apply(version, nft_script(self.spec, fam, nft_chains(self._nft_state(version))))
                if companion := self._forward_companion(fam):
                    self._ipt_apply(version, companion)
                    log.info("the %s FORWARD chain's policy is DROP: accepting %s there too",
                             iptables_tool(version, "save").split("-")[0], fam.network)
            else:
                self._ipt_apply_masq_as_possible(version, fam)
        log.info("firewall rules installed (%s: masquerade %s, forward %s)",
                 "nftables" if self.spec.nftables else "iptables", "on" if self.spec.masq else "off",
                 "on" if self.spec.forward else "off")

    def _ipt_apply_masq_as_possible(self, version: int, fam: FamilyRules) -> None:
        """Install; where iptables cannot masquerade with --random-fully (before 1.6.2, or a kernel
        without it), say so once and masquerade without it, as upstream does since v0.21.4:
        never fail the install for it."""
        try:
            self._ipt_apply(version, iptables_rules(self.spec, fam))
        except FirewallError as exc:
            if not (self.spec.masq and self.spec.random_fully and "--random-fully" in str(exc)):
                raise
            log.warning("%s cannot masquerade with --random-fully here; masquerading without it "
                        "(--ip-masq-fully-random-disable says so up front)", iptables_tool(version, "restore"))
            self.spec = replace(self.spec, random_fully=False)
            self._ipt_apply(version, iptables_rules(self.spec, fam))

    def check(self) -> bool:
        """True when everything is as installed; otherwise reinstall and return False."""
        drifted = self.pending()
        if not drifted:
            return True
        log.warning("firewall rules drifted (%s); reinstalling", ", ".join(drifted))
        self.apply()
        return False

    def pending(self) -> list[str]:
        """The tables that differ from the intended rules (nothing is changed)."""
        drifted = []
        for fam in self.spec.families:
            version = fam.network.version
            if self.spec.nftables:
                if nft_drifted(self.spec, fam, nft_chains(self._nft_state(version))):
                    drifted.append(f"nftables table {NFT_TABLE[version][1]}")
                companion = self._forward_companion(fam)
                if companion and self._ipt_drifted(companion, self._ipt_state(version, "filter")):
                    drifted.append(f"{iptables_tool(version, 'save').split('-')[0]} filter table")
            else:
                chains = iptables_rules(self.spec, fam)
                for table in ("nat", "filter"):
                    ours = [c for c in chains if c.table == table]
                    if self._ipt_drifted(ours, self._ipt_state(version, table)):
                        drifted.append(f"{iptables_tool(version, 'save').split('-')[0]} {table} table")
        return drifted

    def remove_other_mode(self) -> None:
        """Remove what the other firewall mode left behind (after switching EnableNFTables)."""
        off = FirewallSpec(self.spec.families, masq=False, forward=False)
        for fam in self.spec.families:
            version = fam.network.version
            if self.spec.nftables:
                self._ipt_apply(version, iptables_rules(off, fam))
            elif (listed := self._nft_state(version)) is not None:
                self._nft_apply(version, nft_script(off, fam, nft_chains(listed)))  # others' rules stay
