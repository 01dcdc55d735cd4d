"""Masquerade and forward rules: upstream chains and comments (iptables) or equivalent nftables.

Rule text is pure (:func:`iptables_rules`, :func:`nft_script`). :class:`Firewall` installs it
atomically (``iptables-restore --noflush`` flushing and refilling our own chain in one commit;
``nft -f`` replacing our table in one transaction) and checks for drift by listing once per
table per period (one fork per table, never one per rule), comparing with the *intended* rules
(iptables-save and ``nft list`` print them exactly as we write them, up to indentation). Drift
(a deleted rule, a flushed chain, a missing jump, masquerade rules of an older subnet) triggers a
reinstall. The reference is never a listing taken after an install: a change landing between
our install and such a listing would become the reference and never be repaired.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class ChainSpec:
    table: str
    parent: str
    chain: str
    comment: str
    rules: tuple[str, ...]  # empty: the chain must not exist

    @property
    def jump(self) -> str:
        return f'-A {self.parent} -m comment --comment "{self.comment}" -j {self.chain}'


def iptables_rules(spec: FirewallSpec, fam: FamilyRules) -> list[ChainSpec]:
    """Our two chains for one family (rules empty when the feature is off)."""
    return [
        ChainSpec("nat", "POSTROUTING", MASQ_CHAIN, MASQ_COMMENT,
                  tuple(_masq_rules(fam, spec.random_fully)) if spec.masq else ()),
        ChainSpec("filter", "FORWARD", FWD_CHAIN, FWD_COMMENT, tuple(_fwd_rules(fam)) if spec.forward else ()),
    ]


def nft_script(spec: FirewallSpec, fam: FamilyRules) -> str | None:
    """The nftables table for one family (None when neither feature is on)."""
    if not (spec.masq or spec.forward):
        return None
    kind, name = fam.family.nft_family, fam.family.nft_table
    ip = fam.family.nft_family
    net, pod, mcast = fam.network, fam.pod, fam.family.multicast
    rnd = " fully-random" if spec.random_fully else ""
    lines = [f"table {kind} {name} {{"]
    if spec.masq:
        c = f'comment "{MASQ_COMMENT}"'
        lines += [
            "  chain postrtg {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    meta mark & 0x00004000 == 0x00004000 return {c}",
            f"    {ip} saddr {pod} {ip} daddr {net} return {c}",
            f"    {ip} saddr {net} {ip} daddr {pod} return {c}",
            f"    {ip} saddr != {net} {ip} daddr {pod} return {c}",
            f"    {ip} saddr {net} {ip} daddr != {mcast} masquerade{rnd} {c}",
            f"    {ip} saddr != {net} {ip} daddr {net} masquerade{rnd} {c}",
            "  }",
        ]
    if spec.forward:
        c = f'comment "{FWD_COMMENT}"'
        lines += [
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    {ip} saddr {net} accept {c}",
            f"    {ip} daddr {net} accept {c}",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def nft_lines(text: str | None) -> tuple[str, ...]:
    """A table's text without indentation and blank lines: how our script and ``nft list`` compare."""
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


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
            raise FirewallError(f"{argv[0]} is not installed") from None
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
                if c.rules:
                    lines += [f":{c.chain} - [0:0]", f"-F {c.chain}", *c.rules]
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
        """Whether a table's listing differs from the intended chains (rules, and one jump each)."""
        for c in chains:
            if state.get(c.chain) != (list(c.rules) if c.rules else None):
                return True
            if [line for line in state.get(c.parent, []) if c.comment in line] != ([c.jump] if c.rules else []):
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
                self._nft_apply(version, nft_script(self.spec, fam))
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
        drifted = []
        for fam in self.spec.families:
            version = fam.network.version
            if self.spec.nftables:
                if nft_lines(self._nft_state(version)) != nft_lines(nft_script(self.spec, fam)):
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
        if not drifted:
            return True
        log.warning("firewall rules drifted (%s); reinstalling", ", ".join(drifted))
        self.apply()
        return False

    def remove_other_mode(self) -> None:
        """Remove what the other firewall mode left behind (after switching EnableNFTables)."""
        off = FirewallSpec(self.spec.families, masq=False, forward=False)
        for fam in self.spec.families:
            version = fam.network.version
            if self.spec.nftables:
                self._ipt_apply(version, iptables_rules(off, fam))
            elif self._nft_state(version) is not None:
                kind, name = NFT_TABLE[version]
                self._tool(["nft", "delete", "table", kind, name])
