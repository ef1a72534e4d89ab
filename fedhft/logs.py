"""Structured, quiet-by-default logging: `ts level logger event key=value ...` lines on stderr; silencing
native libraries that print on fd 2."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

NOISY = (
    "torchao",
    "torch",
    "transformers",
    "onnxruntime",
    "onnxscript",
    "executorch",
    "paho",
    "urllib3",
    "huggingface_hub",
    "filelock",
    "asyncio",
)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = getattr(record, "fields", {})
        kv = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        line = f"{ts} {record.levelname.lower()} {record.name} {record.getMessage()}"
        if kv:
            line += " " + kv
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _fmt(v: Any) -> str:
    s = str(v)
    return f'"{s}"' if " " in s else s


def setup_logging(verbosity: int = 0) -> None:
    """0: warnings only (fedhft) and errors only (third parties); 1: info; 2+: debug."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR if verbosity < 2 else logging.INFO)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `msg` with structured key=value fields."""
    logger.log(level, msg, extra={"fields": fields})


@contextlib.contextmanager
def quiet_fd2() -> Iterator[None]:
    """Silence native logging on fd 2 (ExecuTorch's cpuinfo probe prints on load)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
