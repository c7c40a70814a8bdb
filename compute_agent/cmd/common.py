"""What every entry point does the same way: load config, report fatal errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from oslo_config import cfg

from compute_agent.conf import loader
from compute_agent.exception import ConfigError, Fatal
from compute_agent.log import mask_secrets

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {mask_secrets(message)}", file=sys.stderr)
    return status


def load_config(conf: cfg.ConfigOpts, argv: Sequence[str], prog: str) -> None:
    try:
        loader.load(conf, argv, prog)
    except ConfigError as exc:
        raise Fatal(str(exc), EXIT_USAGE) from None


def ensure_state_path(conf: cfg.ConfigOpts) -> None:
    """Create ``state_path`` (0700: it holds the admin socket and maybe the DB)."""
    try:
        os.makedirs(conf.state_path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise Fatal(f"cannot create state_path {conf.state_path}: {exc.strerror}") from None
