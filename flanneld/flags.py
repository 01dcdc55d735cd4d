"""Flag types and the etcd flags shared by flanneld and flannelctl: upstream's names, Go spellings.

Every flag may be spelled ``--name`` or Go-style ``-name``, with ``=value`` or a separate
value; boolean flags accept ``--flag`` or ``--flag=true|false`` (Go's ParseBool spellings).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import click

from flanneld.etcd.options import DEFAULT_ENDPOINTS, DEFAULT_PREFIX, EndpointError, EtcdOptions, parse_endpoint

TRUE = {"1", "t", "T", "TRUE", "true", "True"}
FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class GoBool(click.ParamType):
    name = "bool"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).lstrip("=")
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        self.fail(f"{value!r} is not a boolean (use true or false)", param, ctx)


class GoInt(click.ParamType):
    """An integer that also accepts Go's ``-v=2`` spelling of short flags."""

    name = "integer"

    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).lstrip("="))
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            self.fail(f"{number} is not in {self.low}..{self.high}", param, ctx)
        return number


class IPAddress(click.ParamType):
    """An IP address (of one family if `version` is given); empty means "not set"."""

    name = "ip"

    def __init__(self, version: int | None = None) -> None:
        self.version = version

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not text:
            return ""
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            self.fail(f"{text!r} is not an IP address", param, ctx)
        if self.version and addr.version != self.version:
            self.fail(f"{text!r} is not an IPv{self.version} address", param, ctx)
        return str(addr)


class Endpoints(click.ParamType):
    """Comma-separated etcd endpoint URLs, each checked (see etcd_options.parse_endpoint)."""

    name = "urls"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        endpoints = tuple(e.strip() for e in str(value).split(",") if e.strip())
        if not endpoints:
            self.fail("no endpoints given", param, ctx)
        for endpoint in endpoints:
            try:
                parse_endpoint(endpoint)
            except EndpointError as exc:
                self.fail(str(exc), param, ctx)
        return endpoints


class Regex(click.ParamType):
    name = "regex"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            self.fail(f"{value!r} is not a valid regular expression: {exc}", param, ctx)
        return str(value)


def flag(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option spelled --name and -name (Go style)."""
    dest = name.replace("-", "_")
    return click.option(f"--{name}", f"-{name}", dest, **kwargs)


def bool_flag(name: str, default: bool, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return flag(name, type=GoBool(), is_flag=False, flag_value="true", default="true" if default else "false",
                show_default=True, help=help)


def etcd_flags_with_env(*env_prefixes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The etcd connection flags shared by flanneld and flannelctl.

    With `env_prefixes` each flag also reads ``<PREFIX>_ETCD_<NAME>`` (first prefix wins); without,
    the command's ``auto_envvar_prefix`` supplies the environment form.
    """
    def env(name: str) -> dict[str, Any]:
        if not env_prefixes:
            return {}
        return {"envvar": [f"{p}_{name.upper().replace('-', '_')}" for p in env_prefixes], "show_envvar": True}

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed([
            flag("etcd-endpoints", type=Endpoints(), default=",".join(DEFAULT_ENDPOINTS), show_default=True,
                 help="Comma-separated etcd endpoints (http:// or https://).", **env("etcd-endpoints")),
            flag("etcd-prefix", default=DEFAULT_PREFIX, show_default=True, help="etcd key prefix.",
                 **env("etcd-prefix")),
            flag("etcd-keyfile", default="", help="TLS client key file.", **env("etcd-keyfile")),
            flag("etcd-certfile", default="", help="TLS client certificate file.", **env("etcd-certfile")),
            flag("etcd-cafile", default="", help="TLS CA file (honoured on its own, without a client certificate).",
                 **env("etcd-cafile")),
            flag("etcd-username", default="", help="etcd user.", **env("etcd-username")),
            flag("etcd-password", default="", help="etcd password (never logged).", show_default=False,
                 **env("etcd-password")),
        ]):
            fn = decorator(fn)
        return fn
    return apply


etcd_flags = etcd_flags_with_env()


def etcd_options(kw: dict[str, Any]) -> EtcdOptions:
    """Build EtcdOptions from the etcd_flags values (removed from `kw`)."""
    return EtcdOptions(
        endpoints=kw.pop("etcd_endpoints"),
        prefix=kw.pop("etcd_prefix").rstrip("/") or "/",
        keyfile=kw.pop("etcd_keyfile"),
        certfile=kw.pop("etcd_certfile"),
        cafile=kw.pop("etcd_cafile"),
        username=kw.pop("etcd_username"),
        password=kw.pop("etcd_password"),
    )
