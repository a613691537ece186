"""The compose file publishes the unauthenticated UIs on loopback only (SECURITY.md item 13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.e2e.test_postgres_deploy import REPO, compose_config


def _host_ip(port: Any) -> str:
    """The host address of one ``ports`` entry, in either the short or the long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "0.0.0.0"))
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else "0.0.0.0"


def test_published_ports_bind_loopback_by_default(tmp_path: Path) -> None:
    env = tmp_path / "no-bind.env"  # .env.example without SCRIPTORIUM_BIND: the file's default
    env.write_text(
        "".join(
            line + "\n"
            for line in (REPO / ".env.example").read_text().splitlines()
            if not line.startswith("SCRIPTORIUM_BIND=")
        )
    )
    proc = compose_config(env)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert {"mlflow", "dagster-webserver"} <= set(published)
    for name, ports in published.items():
        assert [_host_ip(p) for p in ports] == ["127.0.0.1"] * len(ports), (name, ports)
    readme = (REPO / "README.md").read_text()
    assert "SCRIPTORIUM_BIND" in readme and "reverse proxy" in readme
