"""gRPC surface of CSV imports: ImportUsers, GetImportJob, ListImportJobs, rejections."""

from __future__ import annotations

from services.runtime.app import ServiceContext


class ImportsRpcs:
    """Mixin of :class:`~services.identity.server.IdentityServicer` for imports."""

    _ctx: ServiceContext
