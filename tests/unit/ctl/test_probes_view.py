"""flannelctl's view of probe tables: doctor's lines and the cluster matrix."""

from __future__ import annotations

from flanneld.ctl.probes import Node, failing_pairs, matrix, rows


def row(subnet: str, state: str, cause: str = "", rtt: float | None = 0.2) -> dict:
    return {"subnet": subnet, "public_ip": "198.51.100." + subnet.split(".")[2], "state": state, "cause": cause,
            "rtt_ms": rtt}


def test_doctor_lines_failing_first_then_a_summary():
    table = [row("198.18.2.0/24", "unreachable", "underlay reaches 198.51.100.2 but …"),
             row("198.18.3.0/24", "unprobed", "nothing to probe", None),
             row("198.18.4.0/24", "ok", rtt=0.3), row("198.18.5.0/24", "ok", rtt=0.5)]
    lines = rows(table)
    assert [(r.level, r.text) for r in lines] == [
        ("problem", "peer 198.18.2.0/24 (198.51.100.2): unreachable — underlay reaches 198.51.100.2 but …"),
        ("warning", "peer 198.18.3.0/24 (198.51.100.3): unprobed (nothing to probe)"),
        ("ok", "2 of 4 peers answer over the overlay, full size included, median round trip 0.50 ms")]


def test_matrix_and_failing_pairs():
    a, b, c = (Node(f"198.18.{i}.0/24", f"198.51.100.{i}") for i in (1, 2, 3))
    tables = {a: [row(b.subnet, "unreachable", "x"), row(c.subnet, "ok")],
              b: [row(a.subnet, "mtu", "y"), row(c.subnet, "ok")]}  # c could not be asked
    lines = matrix([a, b, c], tables)
    assert [line.split()[-3:] for line in lines[1:3]] == [["-", "U", "."], ["M", "-", "."]]
    assert lines[3].endswith(" -")  # c's row: its own cell only
    assert [(f.subnet, to, state) for f, to, _ip, state, _why in failing_pairs(tables)] == [
        (a.subnet, b.subnet, "unreachable"), (b.subnet, a.subnet, "mtu")]
