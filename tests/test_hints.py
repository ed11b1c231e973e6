"""The hint appended to "reset not delivered": which setting or which side to look at."""

from __future__ import annotations

import pytest

from trio_counter_worker.hints import delivery_hint, with_hint

WHERE = "backend.example:443"


@pytest.mark.parametrize(
    ("status", "error", "names"),
    [
        (None, f"ConnectError talking to {WHERE}: [Errno 111] Connection refused", "running"),
        (None, f"ConnectError talking to {WHERE}: [Errno -2] Name or service not known", "DNS"),
        (
            None,
            f"ConnectError talking to {WHERE}: [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
            "verify failed: self-signed certificate",
            "certificate",
        ),
        (
            None,
            f"no answer within RESET_TIMEOUT_MS=5000 from {WHERE} (it may still have applied "
            "the reset)",
            "raise RESET_TIMEOUT_MS",
        ),
        (None, f"ReadError talking to {WHERE}", "dropped the connection"),
        (401, f"HTTP 401 from {WHERE}", "RESET_SECRET"),
        (403, f"HTTP 403 from {WHERE}", "RESET_SECRET"),
        (429, f"HTTP 429 from {WHERE}", "MAX_IN_FLIGHT"),
        (503, f"HTTP 503 from {WHERE}", "its logs"),
        (422, f"HTTP 422 from {WHERE}: the backend refused the request", "its logs"),
    ],
)
def test_each_failure_points_somewhere(status: int | None, error: str, names: str) -> None:
    hint = delivery_hint(status, error)
    assert names in hint
    assert with_hint(status, error) == f"{error} ({hint})"


def test_an_error_that_names_the_setting_gets_no_second_hint() -> None:
    error = f"HTTP 401 from {WHERE}: check RESET_SECRET: the backend rejected it"
    assert delivery_hint(401, error) == ""
    assert with_hint(401, error) == error
