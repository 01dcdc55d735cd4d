"""flannelctl's pure views: rows, tables, YAML, lookup."""

from __future__ import annotations

import ipaddress
import json

import pytest

from flanneld.ctl import views as v
from tests.unit.listings import DUAL, LISTING, V4


def test_rows_sorted_by_subnet_filtered_and_ttl_or_reserved():
    rows = v.rows(LISTING, {0x9: 3700, 0x2: 59})
    assert [str(r.lease.subnet) for r in rows] == ["198.18.2.0/24", "198.18.5.0/24", "198.18.9.0/24"]
    assert [v.expires_text(r) for r in rows] == ["59s", "reserved", "1h01m"]
    assert [str(r.lease.subnet) for r in v.rows(LISTING, {}, public_ip="198.51.100.19")] == ["198.18.9.0/24"]
    assert [str(r.lease.subnet) for r in v.rows(LISTING, {}, reserved_only=True)] == ["198.18.5.0/24"]
    assert v.rows(LISTING, {}, backend="host-gw") == []
    assert v.expires_text(v.rows(LISTING, {})[0]) == "expired"  # etcd no longer knows the lease


def test_table_is_aligned_without_trailing_blanks():
    rows = v.rows(LISTING, {0x9: 3700, 0x2: 59})
    lines = v.render_table(v.TABLE_COLUMNS, (v.table_cells(r) for r in rows))
    assert lines[0] == "SUBNET         IPV6 SUBNET  PUBLIC IP      BACKEND  IDENTITY           EXPIRES IN"
    assert lines[1] == "198.18.2.0/24  -            198.51.100.12  vxlan    0e:00:00:00:00:02  59s"
    assert all(line == line.rstrip() for line in lines)
    assert len({line.index("PUBLIC IP") if i == 0 else line.index("198.51.") for i, line in enumerate(lines)}) == 1
    wide = v.table_cells(rows[0], wide=True)
    assert wide[-6:] == ["-", "1", "-", "2", "11", "Future"]
    assert v.render_table(v.TABLE_COLUMNS, [], headers=False) == []


def test_documents_keep_upstream_field_names_and_unknown_fields():
    row = v.rows(LISTING, {0x2: 59})[0]
    doc = v.as_document(row)
    assert doc["PublicIP"] == "198.51.100.12" and doc["BackendData"] == {"VNI": 1, "VtepMAC": "0e:00:00:00:00:02"}
    assert doc["extra"] == {"Future": {"a": 1}} and doc["reserved"] is False
    assert doc["ttlSeconds"] == 59 and doc["etcdLease"] == "2"
    assert json.loads(json.dumps(doc)) == doc


def test_yaml_emitter():
    text = v.to_yaml([{"key": "198.18.2.0-24", "n": 1, "on": True, "none": None, "nested": {"a b": [1, "x"]},
                       "empty": []}])
    assert text == ('- key: "198.18.2.0-24"\n  n: 1\n  on: true\n  none: null\n  nested:\n    "a b":\n      - 1\n'
                    '      - "x"\n  empty: []\n')


@pytest.mark.parametrize("text", ["198.18.2.0/24", "198.18.2.0-24", " 198.18.2.0-24 "])
def test_subnet_argument_forms(text):
    assert v.parse_subnet_arg(text) == ipaddress.ip_network("198.18.2.0/24")


def test_subnet_argument_errors_name_the_input():
    with pytest.raises(ValueError, match=r"'198.18.2.1/24' is not a subnet"):
        v.parse_subnet_arg("198.18.2.1/24")


def test_find_by_key_subnet_or_public_ip():
    assert [li.lease.key for li in v.find(LISTING, "198.18.5.0-24")] == ["198.18.5.0-24"]
    assert [li.lease.key for li in v.find(LISTING, "198.18.9.0/24")] == ["198.18.9.0-24"]
    assert [li.lease.key for li in v.find(LISTING, "198.51.100.12")] == ["198.18.2.0-24"]
    assert v.find(LISTING, "198.18.77.0/24") == []


def test_stats_and_expiring():
    rows = v.rows(LISTING, {0x9: 3700, 0x2: 59})
    (fam,) = v.stats(V4, rows)
    assert (fam.total, fam.leased, fam.reserved, fam.free, fam.outside) == (200, 2, 1, 197, 0)
    assert round(fam.used_percent, 1) == 1.5
    assert [str(r.lease.subnet) for r in v.expiring(rows, 3600)] == ["198.18.2.0/24"]
    assert [f.version for f in v.stats(DUAL, rows)] == [4, 6]


def test_human_durations():
    assert [v.human_duration(s) for s in (0, 59, 61, 3600, 86399, -5)] == ["0s", "59s", "1m01s", "1h00m",
                                                                          "23h59m", "expired"]
