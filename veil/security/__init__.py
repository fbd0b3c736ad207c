"""Transport security of a deployment: TLS certificates and node keys (``veil certs``, checked before a start),
and the app bundle (FAB) both the coordinator and every node build and hash.

The coordinator (``veil.server``) and the nodes (``veil.client``) share only this package and ``veil.conf``:
neither imports the other's code.
"""

from __future__ import annotations

from veil.security.bundle import APP_NAME as APP_NAME
from veil.security.bundle import app_files as app_files
from veil.security.bundle import build_fab as build_fab
from veil.security.bundle import describe_difference as describe_difference
from veil.security.bundle import fab_hash as fab_hash
from veil.security.bundle import write_app_dir as write_app_dir
from veil.security.credentials import check_ca_certificate as check_ca_certificate
from veil.security.credentials import check_node_private_key as check_node_private_key
from veil.security.credentials import check_node_public_key as check_node_public_key
from veil.security.credentials import check_server_certificate as check_server_certificate
from veil.security.credentials import load_public_keys as load_public_keys

__all__ = [
    "APP_NAME",
    "app_files",
    "build_fab",
    "check_ca_certificate",
    "check_node_private_key",
    "check_node_public_key",
    "check_server_certificate",
    "describe_difference",
    "fab_hash",
    "load_public_keys",
    "write_app_dir",
]
