"""Where the stack under test is and how big a run is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

#: The same variables the test suite reads, so one setting points both at another stack.
PG_ADMIN_DSN_ENV = "TIDINGS_TEST_PG_ADMIN_DSN"
KAFKA_BOOTSTRAP_ENV = "TIDINGS_TEST_KAFKA_BOOTSTRAP"

DEFAULT_PG_ADMIN_DSN = "postgresql://tidings:tidings@127.0.0.1:55432/postgres"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:19092"


class Size(StrEnum):
    """How much data each benchmark pushes through.

    ``tiny`` only proves the harness and every benchmark still work (CI runs it); its figures
    are dominated by start-up costs and mean nothing. ``full`` gives the figures worth reading.
    """

    TINY = "tiny"
    FULL = "full"


@dataclass(frozen=True)
class Stack:
    """Addresses of the PostgreSQL server and Kafka broker the benchmarks run against.

    Attributes:
        pg_admin_dsn: DSN of a database the user may ``CREATE DATABASE`` from (usually
            ``postgres``); benchmarks only ever use scratch databases derived from it.
        kafka_bootstrap: Kafka bootstrap servers, ``host:port[,host:port]``.
    """

    pg_admin_dsn: str
    kafka_bootstrap: str

    @classmethod
    def from_env(cls) -> Stack:
        """Reads the stack from the environment, defaulting to the native stack's ports.

        Returns:
            The stack to benchmark.
        """
        return cls(
            pg_admin_dsn=os.environ.get(PG_ADMIN_DSN_ENV, DEFAULT_PG_ADMIN_DSN),
            kafka_bootstrap=os.environ.get(KAFKA_BOOTSTRAP_ENV, DEFAULT_KAFKA_BOOTSTRAP),
        )

    def dsn_for(self, database: str) -> str:
        """The admin DSN pointed at another database on the same server.

        Args:
            database: Name of the database.

        Returns:
            A DSN that keeps the admin DSN's credentials, host and query options.
        """
        parts = urlsplit(self.pg_admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))
