"""Fixtures shared by the circle tests (each module seeds its own `rng`)."""

from __future__ import annotations

import pytest

from meshd.protocol.circle import Circle

from .test_circle import make_device


@pytest.fixture
def trio_of(rng):
    """A circle of laptop, desktop, phone, founded by the laptop."""
    laptop, desktop, phone = (make_device(n, rng) for n in ("laptop", "desktop", "phone"))
    circle = Circle.create(laptop.signer, laptop.info, rng)
    circle.add_device(laptop.signer, desktop.info, rng)
    circle.add_device(laptop.signer, phone.info, rng)
    return circle, laptop, desktop, phone
