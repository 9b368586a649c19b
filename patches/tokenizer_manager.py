"""Hook on ``sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request``
(sglang==0.5.23), BEFORE: with ``--kv-cache kvarn``, a prompt that tokenizes to no token, or
whose ids fall outside the model's vocabulary, is refused with a 400 error.

Both took stock SGLang 0.5.23 down with every request (found by
``benchmarks/bench_server_fuzz.py``; the fp16 ``torch_native`` server crashes the same way):
``/generate`` with ``input_ids`` ``[5, 300, 9]`` on a 256-token vocabulary reached the model and
the embedding lookup raised ``IndexError`` in the scheduler (a device-side assert on CUDA);
``{"text": ""}`` with a tokenizer that adds no BOS token scheduled a prefill of 0 tokens
(``input_ids: []`` is refused, an empty text was not). A ``ValueError`` raised here is what
SGLang's own validation raises for a too-long prompt: the client gets a 400 error.
Multimodal requests are left alone (their ids carry placeholder values).
"""

from __future__ import annotations

from kvarn_sglang.serving.settings import settings_of

VALIDATE_ONE_REQUEST = (
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
)
_MULTIMODAL = ("image_data", "video_data", "audio_data", "input_embeds")


def before_validate_one_request(self, obj, input_ids, *args, **kwargs):
    if input_ids is None or settings_of(getattr(self, "server_args", None)) is None:
        return None
    if any(getattr(obj, name, None) is not None for name in _MULTIMODAL):
        return None
    if len(input_ids) == 0:
        raise ValueError("The prompt is empty: it tokenizes to no token; send at least one")
    vocab = self.model_config.vocab_size
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"Invalid token id {bad} in input_ids: expected 0 <= id < {vocab} (the model's "
            f"vocabulary)"
        )
    return None
