"""The live status page (``batchloop web``; extra ``web``: starlette and uvicorn).

``create_app(dsn, token=..., schema=...)`` is an ASGI app an embedding service can mount.
"""

from .app import create_app

__all__ = ["create_app"]
