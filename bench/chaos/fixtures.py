"""What several scenarios set up the same way, on the asyncio side of the bridge."""

from __future__ import annotations

import uuid

import asyncpg

__all__ = ["create_tenants"]


async def create_tenants(url: str, count: int) -> list[uuid.UUID]:
    """``count`` new tenants, created as the owner (the daemon role may not create tenants)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "INSERT INTO tenants (name) SELECT 'tenant-' || g FROM generate_series(1, $1) g"
            " RETURNING id",
            count,
        )
        return [row["id"] for row in rows]
    finally:
        await conn.close()
