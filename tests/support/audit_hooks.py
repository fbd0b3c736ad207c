"""Test-only: a deliberately broken DP mechanism, for the tests of ``veil audit``.

It lives in tests/, outside the veil package, so no installed veil and no run config can turn it on: a test
passes :func:`broken_noise` as a Flower mod to :func:`veil.audit.cli.run_audit` (a Python argument), and Flower
ships it to the simulated clients. Each client then trains with its Gaussian noise scaled down by
``NOISE_SCALE`` inside Opacus, while veil plans, calibrates and books the configured σ in the node's ledger: the
claimed ε stays the configured one, the real ε is far larger, and the audit must say so.
:func:`broken_client_noise` does the same to client-level DP: each node adds its distributed noise share scaled
down by ``NOISE_SCALE`` and still reports the configured share, which the coordinator's accountant books.
"""

from __future__ import annotations

from typing import Any

NOISE_SCALE = 1e-5


def _scaled(original: Any) -> Any:
    def generate_noise(std: float, reference: Any, generator: Any = None, secure_mode: bool = False) -> Any:
        return original(std * NOISE_SCALE, reference, generator, secure_mode)

    generate_noise.broken = True  # type: ignore[attr-defined]
    return generate_noise


def install() -> None:
    """Scale the noise of Opacus' optimizers (the per-step Gaussian, std σ·C) in this process; idempotent."""
    from opacus.optimizers import optimizer, optimizer_fast_gradient_clipping

    for module in (optimizer, optimizer_fast_gradient_clipping):
        if not getattr(module._generate_noise, "broken", False):
            module._generate_noise = _scaled(module._generate_noise)


def broken_noise(message: Any, context: Any, call_next: Any) -> Any:
    """A Flower mod: break the noise in the client's process, then run the client as usual."""
    install()
    return call_next(message, context)


def _scaled_gaussian(original: Any) -> Any:
    def add_gaussian_noise(arrays: Any, *, std: float, rng: Any = None) -> Any:
        return original(arrays, std=std * NOISE_SCALE, rng=rng)

    add_gaussian_noise.broken = True  # type: ignore[attr-defined]
    return add_gaussian_noise


def broken_client_noise(message: Any, context: Any, call_next: Any) -> Any:
    """A Flower mod: scale the client-level noise share of the node's process down, then run the client as usual
    (the node reads ``add_gaussian_noise`` from veil.privacy.client_level at every release)."""
    from veil.privacy import client_level

    if not getattr(client_level.add_gaussian_noise, "broken", False):
        client_level.add_gaussian_noise = _scaled_gaussian(client_level.add_gaussian_noise)
    return call_next(message, context)
