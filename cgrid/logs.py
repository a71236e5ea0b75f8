"""Structured logs: JSON lines on stdout, one logger for every process of the fleet."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_info_enabled = True


def info_enabled() -> bool:
    """Whether INFO lines are written (a hot path skips building a line nobody will see)."""
    return _info_enabled


def configure(level: str = "INFO") -> None:
    global _info_enabled
    _info_enabled = logging.getLevelName(level) <= logging.INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger() -> Any:
    return structlog.get_logger("cgrid")


