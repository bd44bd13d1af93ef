"""Whether an address is on this machine: the one rule the runner (which may send a loopback proxy no key),
the simulator's ``--host`` check and its ``fileData`` fetching all follow."""

from __future__ import annotations

import ipaddress
import urllib.parse

__all__ = ["loopback_host", "loopback_url"]


def loopback_host(host: str) -> bool:
    """``localhost``, or an IP address on the loopback interface (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_url(url: str) -> bool:
    """An http(s) URL whose host is on this machine."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and loopback_host(parts.hostname or "")
