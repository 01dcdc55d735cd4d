"""Firewall rule text: upstream chains and comments; nftables equivalent."""

import ipaddress

from flanneld.firewall import FamilyRules, FirewallSpec, iptables_rules, nft_script

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
