"""Prompt validation of a KVarN server (``patches/tokenizer_manager.py``); the real server's
400 answers are checked by the fuzzer (``tests/test_server_robustness.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvarn_sglang.patches.tokenizer_manager import before_validate_one_request


def _manager(kv_cache_dtype: str = "kvarn"):
    return SimpleNamespace(
        server_args=SimpleNamespace(kv_cache_dtype=kv_cache_dtype, max_running_requests=4),
        model_config=SimpleNamespace(vocab_size=256),
    )


def _request(**multimodal):
    none = dict(image_data=None, video_data=None, audio_data=None, input_embeds=None)
    return SimpleNamespace(**(none | multimodal))


@pytest.mark.parametrize(
    "ids, message",
    [([], "The prompt is empty"), ([5, 256, 9], "Invalid token id 256"),
     ([5, -1], "Invalid token id -1"), ([10**9], "expected 0 <= id < 256")],
)  # fmt: skip
def test_validation_rejects_prompts_that_would_crash_the_scheduler(ids, message):
    with pytest.raises(ValueError, match=message):
        before_validate_one_request(_manager(), _request(), ids)


def test_valid_prompts_and_other_servers_pass():
    assert before_validate_one_request(_manager(), _request(), [0, 5, 255]) is None
    assert before_validate_one_request(_manager(), _request(), None) is None  # input_embeds
    assert before_validate_one_request(_manager("auto"), _request(), [999]) is None
    # Multimodal prompts carry placeholder ids beyond the vocabulary.
    assert before_validate_one_request(_manager(), _request(image_data=["x"]), [999]) is None


if __name__ == "__main__":
    test_valid_prompts_and_other_servers_pass()
