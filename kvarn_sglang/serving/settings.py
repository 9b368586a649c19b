"""The KVarN server settings, as the plugin's hooks read them in any SGLang process.

The launcher's ``--kvarn-*`` flags travel to the scheduler processes as underscore
attributes of SGLang's ``ServerArgs`` (which pickles them), and are read back here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvarn_sglang.format.config import DEFAULT_PRESET, KVarNConfig, get_preset
from kvarn_sglang.serving.capacity import decode_num_slots, default_num_slots

KV_CACHE_CHOICE = "kvarn"
DEFAULT_MAX_RUNNING_REQUESTS = 128


@dataclass(frozen=True)
class KVarNSettings:
    """What ``--kv-cache kvarn`` was started with."""

    preset: str = DEFAULT_PRESET
    sink_pages: int = 1
    slots: int | None = None
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    disaggregation_mode: str = "null"

    def config(self, head_dim: int) -> KVarNConfig:
        return get_preset(self.preset, head_dim=head_dim, sink_pages=self.sink_pages)

    @property
    def num_slots(self) -> int:
        if self.slots:
            return self.slots
        if self.disaggregation_mode == "decode":
            return decode_num_slots(self.max_running_requests, self.sink_pages)
        return default_num_slots(self.max_running_requests, self.sink_pages)


def settings_of(server_args) -> KVarNSettings | None:
    """The KVarN settings of a ``ServerArgs``, or None when KVarN is not selected."""
    if getattr(server_args, "kv_cache_dtype", None) != KV_CACHE_CHOICE:
        return None
    return KVarNSettings(
        preset=getattr(server_args, "_kvarn_preset", DEFAULT_PRESET),
        sink_pages=getattr(server_args, "_kvarn_sink_pages", 1),
        slots=getattr(server_args, "_kvarn_slots", None),
        max_running_requests=getattr(server_args, "max_running_requests", None)
        or DEFAULT_MAX_RUNNING_REQUESTS,
        disaggregation_mode=getattr(server_args, "disaggregation_mode", None) or "null",
    )


def active_settings() -> KVarNSettings | None:
    """Settings of the server running in this process (None outside a server or without
    KVarN)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return settings_of(get_server_args())
    except Exception:  # no runtime context in this process
        return None
