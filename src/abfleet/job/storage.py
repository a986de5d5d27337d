"""Study storage URLs: the driver abfleet ships, and what may be shown of them."""

from __future__ import annotations

from typing import Any


def normalize_url(url: str) -> str:
    """postgresql:// means psycopg2 to SQLAlchemy; abfleet ships psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# Query parameters that carry a secret: libpq reads `?password=` (and `sslpassword=` for the
# client key) from a URL's query as readily as from its user:password part.
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def _secret_keys(query: Any) -> list[str]:
    return [k for k in query if k.lower() in _SECRET_PARAMS]


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages and logs, wherever it was given."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        secret = _secret_keys(parsed.query)
        if secret:
            parsed = parsed.update_query_dict({k: "***" for k in secret})
        return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    except Exception:  # noqa: BLE001 - unparsable: say nothing of it
        return "<storage url>"


def has_password(url: str) -> bool:
    """True when the URL carries a secret, as user:password or in its query."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - unparsable URLs are refused elsewhere, with a message
        return False
    return bool(parsed.password) or bool(_secret_keys(parsed.query))


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
