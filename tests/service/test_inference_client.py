"""The real huggingface_hub InferenceClient against the real Waitress server (the Inference API contract)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from huggingface_hub import InferenceClient, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import reset_sessions

from tests.testkit import NEGATIVE, POSITIVE, Server


@pytest.fixture
def inference_client(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[InferenceClient]:
    """Yield a client that posts to the server's root URL verbatim, without any token."""
    # Offline mode (read once at import, e.g. from CI's HF_HUB_OFFLINE=1) refuses even a local base_url.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    reset_sessions()
    yield InferenceClient(base_url=server.url, timeout=30)
    reset_sessions()


def test_text_classification_returns_all_labels_sorted(inference_client: InferenceClient) -> None:
    result = inference_client.text_classification(POSITIVE)
    assert [item.label for item in result] == ["POSITIVE", "NEGATIVE"]
    assert result[0].score > result[1].score and result[0].score + result[1].score == pytest.approx(1.0)
    assert inference_client.text_classification(NEGATIVE)[0].label == "NEGATIVE"


def test_text_classification_top_k_and_function(inference_client: InferenceClient) -> None:
    (top,) = inference_client.text_classification(NEGATIVE, top_k=1)
    assert top.label == "NEGATIVE" and 0.5 < top.score <= 1.0
    raw = inference_client.text_classification(NEGATIVE, function_to_apply="none")
    assert raw[0].label == "NEGATIVE" and raw[0].score > 1.0  # a logit, not a probability


def test_errors_reach_the_client_with_their_message(inference_client: InferenceClient) -> None:
    with pytest.raises(HfHubHTTPError, match="text cannot be empty") as caught:
        inference_client.text_classification("   ")
    assert caught.value.response.status_code == 400
