"""Study storage URLs: the driver abfleet ships, and what may be shown of them."""

from __future__ import annotations


def normalize_url(url: str) -> str:
    """postgresql:// means psycopg2 to SQLAlchemy; abfleet ships psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: say nothing of it
        return "<storage url>"


def has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        return bool(make_url(url).password)
    except Exception:  # noqa: BLE001 - unparsable URLs are refused elsewhere, with a message
        return False


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def resolve_shared(value: str) -> str:
    """The URL a controller hands to workers on other machines.

    `env` reads ABFLEET_STORAGE_URL, which keeps the password out of argv and shell history.
    A Postgres URL without a password takes PGPASSWORD (libpq's own variable, which psycopg
    reads here but a rented box does not have): the box gets the full URL in its 0600 env file.
    """
    import os

    from sqlalchemy.engine import make_url

    from abfleet.errors import UserError

    if value == "env":
        value = os.environ.get("ABFLEET_STORAGE_URL", "")
        if not value:
            raise UserError(
                "--storage env reads the study URL from ABFLEET_STORAGE_URL, which is not set: "
                "export ABFLEET_STORAGE_URL=postgresql://USER:PASSWORD@HOST/DB"
            )
    password = os.environ.get("PGPASSWORD")
    if value.startswith(("postgresql", "postgres://")) and password and not has_password(value):
        url = make_url(normalize_url(value)).set(password=password)
        return url.render_as_string(hide_password=False)
    return value
