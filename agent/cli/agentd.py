"""`agentd`: the daemon. `agentd --once` drains the queue and exits (cron, Kubernetes Job)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from agent import __version__
from agent import log as agent_log
from agent.db.connect import DB_ERRORS, redact
from agent.errors import ConfigError
from agent.runtime.daemon import run
from agent.settings import CONFIG_ENV, DEFAULT_CONFIG, config_path, load_settings

EXIT_CONFIG = 2
EXIT_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    """The command line (also the source of the agentd(8) man page: scripts/gen-man)."""
    parser = argparse.ArgumentParser(prog="agentd", description=__doc__)
    parser.add_argument("--config", help=f"TOML settings file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it "
                        "exists); AGENT_* environment variables win")
    parser.add_argument("--once", action="store_true", help="drain the queue, then exit (0 = all succeeded)")
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_path(args.config)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    agent_log.setup(settings.log_format, settings.log_level)
    try:
        return asyncio.run(run(settings, once=args.once, config_path=config))
    except ConfigError as exc:
        logging.getLogger("agent").error("cannot start: %s", exc, extra={"action": "config_error"})
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except DB_ERRORS as exc:  # --once gave up
        logging.getLogger("agent").error("database unreachable (%s): %s", redact(settings.database_url),
                                         exc or type(exc).__name__, extra={"action": "db_unreachable"})
        return EXIT_FAILED
    except RuntimeError as exc:  # a background service died: stop loudly, let the supervisor restart us
        logging.getLogger("agent").error("agentd failed: %s", exc, extra={"action": "failed"})
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
