"""Distributed tuning's roles: KerasTuner's own chief/worker mode, set by its environment.

The chief (`KERASTUNER_TUNER_ID` containing "chief") serves the oracle on
`KERASTUNER_ORACLE_IP:PORT` and trains nothing; each worker asks it for executions and
trains them. The executions' records and runs go to `tune.directory` and `runs_dir`, which
the chief reads for the report: give every machine the same shared folders.
"""

from __future__ import annotations

import os

from pipeline.errors import ConfigError


def role() -> str:
    """`single`, or `chief` / `worker` when KerasTuner's distributed variables are set."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise ConfigError(f"{var}: required when KERASTUNER_ORACLE_IP is set")
    # KerasTuner's own rule: an id containing "chief" is the chief.
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def set_role(kind: str, host: str, port: int, tuner_id: str | None = None) -> None:
    """Set KerasTuner's environment: a chief serves host:port, a worker connects to it."""
    if kind == "worker" and (not tuner_id or "chief" in tuner_id):
        raise ConfigError(f"--tuner-id: a worker needs a unique name without 'chief' (got {tuner_id!r})")
    os.environ["KERASTUNER_ORACLE_IP"] = host
    os.environ["KERASTUNER_ORACLE_PORT"] = str(port)
    os.environ["KERASTUNER_TUNER_ID"] = "chief" if kind == "chief" else str(tuner_id)


def describe_role() -> str:
    return f"{os.environ['KERASTUNER_TUNER_ID']} at {os.environ['KERASTUNER_ORACLE_IP']}:" \
           f"{os.environ['KERASTUNER_ORACLE_PORT']}"
