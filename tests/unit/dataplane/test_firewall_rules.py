"""Firewall rule text: upstream chains and comments; nftables equivalent."""

import ipaddress

from flanneld.dataplane.firewall import FamilyRules, FirewallSpec, iptables_rules, nft_script

N = ipaddress.ip_network
V4 = FamilyRules(N("10.5.0.0/16"), N("10.5.72.0/24"))


def test_iptables_rules_are_upstreams():
    masq, fwd = iptables_rules(FirewallSpec((V4,), masq=True, forward=True), V4)
    assert masq.jump == '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    assert list(masq.rules) == [
        '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.5.72.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.72.0/24 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.72.0/24 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
        "-j MASQUERADE --random-fully",
        '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" '
        "-j MASQUERADE --random-fully",
    ]
    assert fwd.jump == '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'
    assert list(fwd.rules) == ['-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
                               '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT']


def test_options_switch_rules_off():
    masq, fwd = iptables_rules(FirewallSpec((V4,), masq=False, forward=False), V4)
    assert masq.rules == () and fwd.rules == ()
    masq, _ = iptables_rules(FirewallSpec((V4,), masq=True, forward=True, random_fully=False), V4)
    assert not any("random-fully" in r for r in masq.rules)
    v6 = FamilyRules(N("2001:db8:1800::/56"), N("2001:db8:1800:5::/64"))
    masq6, _ = iptables_rules(FirewallSpec((v6,), masq=True, forward=True), v6)
    assert any("! -d ff00::/8" in r for r in masq6.rules)


def test_nftables_script_matches_the_iptables_rules():
    script = nft_script(FirewallSpec((V4,), masq=True, forward=True, nftables=True), V4)
    assert script.startswith("table ip flannel-ipv4 {")
    assert "type nat hook postrouting priority srcnat; policy accept;" in script
    assert "ip saddr 10.5.72.0/24 ip daddr 10.5.0.0/16 return" in script
    assert "ip saddr != 10.5.0.0/16 ip daddr 10.5.72.0/24 return" in script
    assert "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random" in script
    assert "ip saddr 10.5.0.0/16 accept" in script and "ip daddr 10.5.0.0/16 accept" in script
    assert nft_script(FirewallSpec((V4,), masq=False, forward=False, nftables=True), V4) is None


class FakeTables:
    """iptables-save/-restore and nft stand-ins: restores are recorded, listings are what the test says."""

    def __init__(self) -> None:
        self.listing: dict[str, str] = {}
        self.restores = 0

    def __call__(self, argv, stdin):
        import subprocess

        tool = argv[0]
        if tool.endswith("-restore") or argv[:2] == ["nft", "-f"]:
            self.restores += 1
            return subprocess.CompletedProcess(argv, 0, "", "")
        key = f"{tool} {argv[-1]}"
        return subprocess.CompletedProcess(argv, 0, self.listing.get(key, ""), "")


def _saved(chains, flushed=()):
    """iptables-save text for our chains (rules left out of the chains in `flushed`)."""
    out = {}
    for c in chains:
        lines = out.setdefault(c.table, [f"*{c.table}", f":{c.parent} ACCEPT [0:0]"])
        lines += [f":{c.chain} - [0:0]", c.jump, *([] if c.chain in flushed else c.rules)]
    return {f"iptables-save {table}": "\n".join([*lines, "COMMIT"]) + "\n" for table, lines in out.items()}


def test_drift_is_judged_against_the_intended_rules_not_a_listing_after_install():
    """A flush landing between our install and a listing must not become the reference (it was, once)."""
    from flanneld.dataplane.firewall import Firewall

    spec = FirewallSpec((V4,), masq=True, forward=True)
    chains = iptables_rules(spec, V4)
    tables = FakeTables()
    tables.listing = _saved(chains, flushed={"FLANNEL-POSTRTG"})  # flushed right as we installed
    fw = Firewall(spec, tables)
    fw.apply()
    assert fw.check() is False and tables.restores == 2 * 2  # drift seen; both tables reinstalled
    tables.listing = _saved(chains)
    assert fw.check() is True and tables.restores == 4  # as intended: nothing to do


def test_nft_listing_with_the_kernels_indentation_is_not_drift():
    from flanneld.dataplane.firewall import Firewall

    spec = FirewallSpec((V4,), masq=True, forward=True, nftables=True)
    script = nft_script(spec, V4)
    listed = script.replace("  chain forward", "\n  chain forward").replace("    ", "\t\t").replace("  ", "\t")
    tables = FakeTables()
    tables.listing = {"nft flannel-ipv4": listed}
    fw = Firewall(spec, tables)
    assert fw.check() is True and tables.restores == 0
    tables.listing = {"nft flannel-ipv4": listed.replace('\t\tip saddr 10.5.0.0/16 accept comment "flanneld forward"\n',
                                                         "")}
    assert fw.check() is False and tables.restores == 1


def test_a_tool_that_hangs_is_a_firewall_error_not_a_crash():
    """A hung iptables-save (a stuck xtables lock) ran into subprocess's timeout, whose exception
    nothing caught: the daemon's loop thread died. It is now one FirewallError the check retries."""
    import subprocess

    import pytest

    from flanneld.dataplane.firewall import Firewall, FirewallError

    def hangs(argv, stdin):  # type: ignore[no-untyped-def]
        raise subprocess.TimeoutExpired(argv, 30)

    fw = Firewall(FirewallSpec((V4,), masq=True, forward=True), hangs)
    with pytest.raises(FirewallError, match="iptables-save did not answer within 30 s"):
        fw.check()


def test_an_iptables_without_random_fully_masquerades_without_it_and_says_so_once(caplog):
    """Old iptables (before 1.6.2) refuses the option: the install must not fail for it (upstream
    falls back since v0.21.4); the rules checked from then on are the ones installed."""
    import subprocess

    from flanneld.dataplane.firewall import Firewall

    class OldIptables(FakeTables):
        def __call__(self, argv, stdin):  # type: ignore[no-untyped-def]
            if argv[0].endswith("-restore") and "--random-fully" in (stdin or ""):
                refusal = 'iptables-restore v1.4.21: unknown option "--random-fully"'
                return subprocess.CompletedProcess(argv, 2, "", refusal)
            return super().__call__(argv, stdin)

    tables = OldIptables()
    fw = Firewall(FirewallSpec((V4,), masq=True, forward=True), tables)
    fw.apply()
    assert fw.spec.random_fully is False and tables.restores == 3  # filter, then both again without the option
    assert caplog.text.count("cannot masquerade with --random-fully here") == 1
    tables.listing = _saved(iptables_rules(fw.spec, V4))
    assert fw.check() is True  # what was installed is what is checked: no reinstall loop


class HostTables:
    """One host's iptables (what our restore scripts do to it) and nftables table, shared by the
    daemons of two networks."""

    def __init__(self) -> None:
        self.chains: dict[str, dict[str, list[str]]] = {"nat": {"POSTROUTING": []}, "filter": {"FORWARD": []}}
        self.nft: str = ""

    def __call__(self, argv, stdin):
        import subprocess

        if argv[0] == "iptables-save":
            table = argv[-1]
            lines = [f"*{table}", *(f":{c} - [0:0]" for c in self.chains[table]),
                     *(rule for rules in self.chains[table].values() for rule in rules), "COMMIT"]
            return subprocess.CompletedProcess(argv, 0, "\n".join(lines) + "\n", "")
        if argv[0] == "iptables-restore":
            chains = {}
            for line in stdin.splitlines():
                word, _, rest = line.partition(" ")
                if line.startswith("*"):
                    chains = self.chains[line[1:]]
                elif line.startswith(":"):
                    chains.setdefault(line[1:].split()[0], [])
                elif word == "-F":
                    chains[rest] = []
                elif word == "-X":
                    del chains[rest]
                elif word == "-A":
                    chains[rest.split()[0]].append(line)
                elif word == "-D":
                    chains[rest.split()[0]].remove("-A " + rest)
            return subprocess.CompletedProcess(argv, 0, "", "")
        if argv[:2] == ["nft", "-f"]:
            self.nft = stdin.split("delete table ip flannel-ipv4\n", 1)[1]
            return subprocess.CompletedProcess(argv, 0, "", "")
        if argv[:3] == ["nft", "list", "table"]:
            return subprocess.CompletedProcess(argv, 0 if self.nft else 1, self.nft, "")
        return subprocess.CompletedProcess(argv, 1, "", "")  # nft list chain ... FORWARD: none


OTHER = FamilyRules(N("10.6.0.0/16"), N("10.6.9.0/24"))


def test_two_networks_daemons_share_the_chains_without_fighting():
    """Two flanneld for two networks on one host wrote the same chains: each flushed the other's
    rules, saw its own missing at the next check, and flushed them back, every few seconds."""
    from flanneld.dataplane.firewall import Firewall

    for nftables in (False, True):
        host = HostTables()
        a = Firewall(FirewallSpec((V4,), masq=True, forward=True, nftables=nftables), host)
        b = Firewall(FirewallSpec((OTHER,), masq=True, forward=True, nftables=nftables), host)
        a.apply()
        b.apply()
        for _ in range(3):
            assert a.check() and b.check(), nftables
        text = host.nft if nftables else "\n".join(r for t in host.chains.values() for c in t.values() for r in c)
        assert sum("mark" in line for line in text.splitlines()) == 1  # the mark's RETURN once
        assert "10.5.72.0/24" in text and "10.6.9.0/24" in text
        if not nftables:
            assert host.chains["nat"]["POSTROUTING"] == [iptables_rules(a.spec, V4)[0].jump]  # one jump for both
        # a stray rule is still drift for both; b's reinstall keeps a's rules
        if nftables:
            host.nft = host.nft.replace("  chain forward {\n", '  chain forward {\n    ip saddr 1.2.3.4 drop\n')
        else:
            host.chains["filter"]["FLANNEL-FWD"].append("-A FLANNEL-FWD -s 1.2.3.4/32 -j DROP")
        assert b.check() is False and a.check() and b.check()
        # a turns masquerading off: its rules go, b's and the mark stay
        a.spec = FirewallSpec((V4,), masq=False, forward=True, nftables=nftables)
        a.apply()
        assert a.check() and b.check()
        text = host.nft if nftables else "\n".join(host.chains["nat"].get("FLANNEL-POSTRTG", []))
        assert "10.5.72.0/24" not in text and "10.6.9.0/24" in text and "mark" in text
        # b turns both off: only a's forward rules are left
        b.spec = FirewallSpec((OTHER,), masq=False, forward=False, nftables=nftables)
        b.apply()
        assert a.check() and b.check()
        text = host.nft if nftables else "\n".join(r for t in host.chains.values() for c in t.values() for r in c)
        assert "10.6." not in text and "mark" not in text and "10.5.0.0/16" in text
