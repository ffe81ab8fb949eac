"""The serving tests' model fixtures, shared rather than copied: the tiny exported model
(``tiny_export``, cached like there), its model repository (``model_repo``) and a filled
SQLite online store (``sqlite_store``), all from tests/serving/conftest.py, loaded by path
(conftest modules are not importable by name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_serving_fixtures", Path(__file__).resolve().parent.parent / "serving" / "conftest.py"
)
_serving = sys.modules["_serving_fixtures"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_serving)

tiny_export = _serving.tiny_export
model_repo = _serving.model_repo
sqlite_store = _serving.sqlite_store


@pytest.fixture(scope="session")
def stunnel_binary() -> str:
    """stunnel for the Kafka TLS tests (scripts/install_stunnel.sh, run by scripts/setup.sh; run
    here too when missing). Not obtainable: the test fails with the reason, it never skips."""
    from infra.ports import ServiceError
    from infra.stunnel import install_stunnel

    try:
        return install_stunnel()
    except ServiceError as e:
        pytest.fail(f"stunnel is needed for the Kafka TLS tests and could not be installed: {e}")
