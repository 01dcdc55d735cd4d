"""install-unit: where systemd runs it reloads it; elsewhere it writes the unit and says it did not."""

from __future__ import annotations

import os

from click.testing import CliRunner

from flanneld.node import systemd


def run(tmp_path, monkeypatch, *, running: bool, reload_status: int = 0):
    unit_dir = tmp_path / "system"
    unit_dir.mkdir()
    calls: list[list[str]] = []

    class Done:
        returncode = reload_status
        stderr = "Failed to reload daemon: Access denied\n" if reload_status else ""

    def fake_run(argv, **_kw):
        calls.append(argv)
        return Done()

    monkeypatch.setattr(systemd, "SYSTEMD_UNIT_DIRS", frozenset({os.path.realpath(unit_dir)}))
    monkeypatch.setattr(systemd, "systemd_running", lambda: running)
    monkeypatch.setattr(systemd.subprocess, "run", fake_run)
    result = CliRunner().invoke(systemd.install_unit_command,
                                [f"--unit-dir={unit_dir}", f"--defaults={tmp_path / 'default-flanneld'}"])
    return result, calls, unit_dir / "flanneld.service"


def test_where_pid_1_is_not_systemd_the_unit_is_written_and_it_says_it_was_not_loaded(tmp_path, monkeypatch):
    result, calls, unit = run(tmp_path, monkeypatch, running=False)
    assert result.exit_code == 0 and calls == [] and unit.exists()
    assert "systemd is not running here (PID 1 is not systemd): the unit is written, not loaded" in result.output


def test_where_systemd_runs_it_is_reloaded(tmp_path, monkeypatch):
    result, calls, unit = run(tmp_path, monkeypatch, running=True)
    assert result.exit_code == 0 and calls == [["systemctl", "daemon-reload"]] and unit.exists()
    assert "systemd reloaded" in result.output


def test_a_failed_reload_is_one_line_and_a_failure(tmp_path, monkeypatch):
    result, _, unit = run(tmp_path, monkeypatch, running=True, reload_status=1)
    assert result.exit_code == 1 and unit.exists()
    assert result.output.splitlines()[-1] == ("Error: unit written, but systemctl daemon-reload failed: Failed to "
                                              "reload daemon: Access denied")


def test_a_unit_put_where_systemd_does_not_look_is_not_reloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(systemd, "systemd_running", lambda: True)
    unit_dir = tmp_path / "elsewhere"
    unit_dir.mkdir()
    result = CliRunner().invoke(systemd.install_unit_command,
                                [f"--unit-dir={unit_dir}", f"--defaults={tmp_path / 'default-flanneld'}"])
    assert result.exit_code == 0 and "not a directory systemd reads units from" in result.output
