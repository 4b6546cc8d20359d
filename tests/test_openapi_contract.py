"""The token service against its own OpenAPI document (/openapi.json), with generated requests
(schemathesis): no answer is a 5xx, and every answer matches what the document says of it
(status, content type, body schema). A bounded number of examples per operation keeps it quick."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from schemathesis.openapi import from_url

from tests.support.services import TokenService

EXAMPLES = 40  # per operation


def test_the_token_service_keeps_its_openapi_contract(service: TokenService) -> None:
    schema = from_url(f"{service.url}/openapi.json")
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results  # the document itself is valid
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 5
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case: Any) -> None:
            case.call_and_validate()

        check()
