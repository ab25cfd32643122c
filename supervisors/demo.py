"""The demo tenant that ``make run`` seeds, so a dispatch works out of the box.

With ``[emulators] seed_demo = true`` (``config/dev.toml``) the daemon makes sure,
at start and through the owner's connection, that the tenant ``demo``
(:data:`DEMO_TENANT_ID`, the same on every machine) exists with an active
``reminder`` template for each channel. ``triage send`` uses this tenant when
none is given. Nothing here runs in production: the default config leaves it off.
"""

from __future__ import annotations

import uuid
from typing import Final

import asyncpg

__all__ = ["DEMO_TEMPLATES", "DEMO_TENANT_ID", "DEMO_TENANT_NAME", "seed_demo_async"]

DEMO_TENANT_NAME: Final = "demo"
#: uuid5(NAMESPACE_URL, "https://triage.invalid/tenants/demo")
DEMO_TENANT_ID: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://triage.invalid/tenants/demo")

#: (name, channel, category, subject, body) of the seeded active templates, version 1.
DEMO_TEMPLATES: Final = (
    ("reminder", "sms", "reminder", None, "Reminder: your appointment is at {time}."),
    ("push_reminder", "push", "reminder", "Appointment", "Your appointment is at {time}."),
    ("email_reminder", "email", "reminder", "Your appointment", "See you at {time}."),
)

_TENANT = """
INSERT INTO tenants (id, name) VALUES ($1, $2)
ON CONFLICT DO NOTHING
"""
_TEMPLATE = """
INSERT INTO templates (tenant_id, name, version, channel, category, subject, body, active)
VALUES ($1, $2, 1, $3, $4, $5, $6, true)
ON CONFLICT (tenant_id, name, version) DO NOTHING
"""


async def seed_demo_async(owner_url: str) -> uuid.UUID:
    """Unit of work (asyncio side), as the owner: the demo tenant and its templates."""
    conn = await asyncpg.connect(owner_url)
    try:
        async with conn.transaction():
            await conn.execute(_TENANT, DEMO_TENANT_ID, DEMO_TENANT_NAME)
            for name, channel, category, subject, body in DEMO_TEMPLATES:
                await conn.execute(
                    _TEMPLATE, DEMO_TENANT_ID, name, channel, category, subject, body
                )
    finally:
        await conn.close()
    return DEMO_TENANT_ID
