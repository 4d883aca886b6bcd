"""Rotating TIDINGS_DELIVERY_SECRET_KEY: list the new material first, and the running service
re-seals every stored credential and identity key so the old material can be dropped."""

from __future__ import annotations

import asyncpg
import pytest

from services.delivery.channel_configs import SEALED as CHANNEL_CREDENTIALS
from services.delivery.secrets_box import SecretBox
from services.runtime.key_rotation import reseal_all
from services.runtime.secrets_box import SecretBoxError
from services.runtime.service_keys import SEALED as IDENTITY_KEYS
from tests.conftest import temporary_database
from tests.delivery.support import delivery_env
from tests.e2e.processes import ServiceProcess, running_service
from tests.polling import eventually

OLD, NEW = "old-delivery-material", "new-delivery-material"


def test_a_box_with_two_materials_seals_with_the_first_and_opens_both() -> None:
    old, rotating, new = SecretBox(OLD), SecretBox(f"{NEW},{OLD}"), SecretBox(NEW)
    sealed = old.seal(b"token", "app/telegram")
    assert rotating.open(sealed, "app/telegram") == b"token"
    with pytest.raises(SecretBoxError):
        new.open(sealed, "app/telegram")
    fresh = rotating.reseal(sealed, "app/telegram")
    assert fresh is not None
    assert new.open(fresh, "app/telegram") == b"token"
    assert rotating.reseal(fresh, "app/telegram") is None
    # Tokens signed before the rotation still verify; new ones are signed with the new key.
    assert rotating.verify(b"link", old.sign(b"link"))
    assert new.verify(b"link", rotating.sign(b"link"))
    with pytest.raises(ValueError, match="TIDINGS_DELIVERY_SECRET_KEY"):
        SecretBox(f"{NEW},")


async def _insert_sealed(conn: asyncpg.Connection, box: SecretBox, app_id: str) -> None:
    await conn.execute(
        """
        INSERT INTO channel_configs (app_id, channel, provider, credentials, credential_fields,
                                     create_time, update_time)
        VALUES ($1, 'telegram', 'telegram', $2, '{bot_token}', now(), now())
        """,
        app_id,
        box.seal(b'{"bot_token": "123:abc"}', f"{app_id}/telegram"),
    )
    await conn.execute(
        "INSERT INTO identity_keys (app_id, key_id, secret) VALUES ($1, 'k1', $2)",
        app_id,
        box.seal(b"tdg_secret", f"identity/{app_id}"),
    )


async def _open_with(conn: asyncpg.Connection, box: SecretBox, app_id: str) -> list[bytes]:
    credentials = await conn.fetchval(
        "SELECT credentials FROM channel_configs WHERE app_id = $1", app_id
    )
    secret = await conn.fetchval("SELECT secret FROM identity_keys WHERE app_id = $1", app_id)
    return [
        box.open(credentials, f"{app_id}/telegram"),
        box.open(secret, f"identity/{app_id}"),
    ]


async def _resealed(conn: asyncpg.Connection, app_id: str) -> list[bytes] | None:
    """The secrets opened with the new material alone; None while any is sealed with the old."""
    try:
        return await _open_with(conn, SecretBox(NEW), app_id)
    except SecretBoxError:
        return None


async def test_the_running_service_reseals_stored_secrets_with_the_new_key(
    identity_service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with temporary_database() as dsn:
        env, _ = delivery_env(identity_service.grpc_target, TIDINGS_DELIVERY_SECRET_KEY=OLD)
        # Migrate under the old key, with one sealed credential and identity key stored.
        async with running_service(
            "delivery", database_url=dsn, log_dir=tmp_path_factory.mktemp("old"), env=env
        ) as service:
            await service.wait_serving()
        conn = await asyncpg.connect(dsn)
        try:
            await _insert_sealed(conn, SecretBox(OLD), "app-rotating")
            rotating_env = {**env, "TIDINGS_DELIVERY_SECRET_KEY": f"{NEW},{OLD}"}
            async with running_service(
                "delivery",
                database_url=dsn,
                log_dir=tmp_path_factory.mktemp("rotating"),
                env=rotating_env,
            ) as service:
                await service.wait_serving()
                opened: list[bytes] | None = await eventually(
                    lambda: _resealed(conn, "app-rotating"),
                    lambda found: found is not None,
                    within=30,
                    interval=0.2,
                    what="secrets re-sealed with the new key",
                )
            assert opened == [b'{"bot_token": "123:abc"}', b"tdg_secret"]
            # Nothing is left for the old key: it can be dropped from the setting.
            box = SecretBox(f"{NEW},{OLD}")
            assert await reseal_all(conn, box, [CHANNEL_CREDENTIALS, IDENTITY_KEYS]) == 0  # type: ignore[arg-type]
        finally:
            await conn.close()
