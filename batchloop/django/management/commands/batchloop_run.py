"""``python manage.py batchloop_run MODULE...``: a batchloop host inside the Django project."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ....dsn import scrub
from ... import dsn_from_settings


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type hints
    help = (
        "Run a batchloop host for MODULE(s) (default settings.BATCHLOOP_MODULES) on the Django "
        "database, like `batchloop run`, until SIGTERM (exit 0) or Ctrl-C (130)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from ....cli import _run_ops_options

        parser.add_argument("modules", nargs="*", metavar="MODULE")
        parser.add_argument(
            "--database",
            default="default",
            help="the settings.DATABASES alias to connect to (default 'default')",
        )
        parser.add_argument(
            "--dsn",
            default=None,
            help="connect here instead of the Django database (also BATCHLOOP_DSN)",
        )
        parser.add_argument("--schema", default="batchloop")
        parser.add_argument("--driver", choices=("asyncpg", "psycopg"), default="asyncpg")
        _run_ops_options(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        from .... import cli

        modules = list(options["modules"]) or list(getattr(settings, "BATCHLOOP_MODULES", ()))
        if not modules:
            raise CommandError("name the MODULE(s) to host, or set settings.BATCHLOOP_MODULES")
        dsn = options["dsn"] or os.environ.get("BATCHLOOP_DSN")
        try:
            if not dsn:
                dsn = dsn_from_settings(options["database"])
            cli._import_user_modules(modules, int(options.get("verbosity", 1)) > 1)
            code = asyncio.run(
                cli._run_host(
                    dsn,
                    options["schema"],
                    modules,
                    options["driver"],
                    **cli._host_options(argparse.Namespace(**options)),
                )
            )
        except cli.CommandError as exc:
            raise CommandError(scrub(cli._one_line(exc), dsn)) from exc
        except cli._EXPECTED as exc:  # what `batchloop run` reports in one line, DSN scrubbed
            raise CommandError(scrub(cli._explain(exc, dsn), dsn)) from exc
        if code:
            raise SystemExit(code)
