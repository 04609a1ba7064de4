"""lora-nb: LoRA and QLoRA fine-tuning of causal language models from Jupyter notebooks.

The stages, one module each: `environment` (what this machine can do), `demo` (the offline demo
model), `loading` (4-bit/8-bit/full-precision loading), `settings` + `presets` + `formats` (the
single definition of every knob, its validation and its forms, one registry entry per form),
`targets` + `estimate` + `fit` (adaptable layers, exact trainable counts, memory, will it fit),
`data` + `batching` + `loss` (tokenizing, masking, padding-free rows, chunked loss), `train`,
`evaluate` and `runs` (side by side: training, before/after, comparing runs), `export` (GGUF,
Ollama), `plots`, `widgets` + `panels` (what the notebooks display), `pipeline` (the headless run
behind `python -m lora_nb run`).

The shared layers under them: `probes` (CUDA, bf16, packages, quantization backends, the hub, the
session's memory: asked in one place), `run_folder` (the run folder's layout, locking, fingerprint),
`adapters` (save, find, load, merge), `table`, `files`, `errors`, `host_memory` (freed memory back
to small sessions) and `threads` (how the kit shares the CPU; applied here, first, so every entry
point gets it).
"""

from .threads import apply_thread_settings, thread_report

apply_thread_settings()  # before anything imports torch: OpenMP reads its wait policy once, at load

from .loading import load_model  # noqa: E402  # first: it also quiets bitsandbytes' optional-kernel message
from .demo import DEMO_MODEL_ID, demo_model_path, resolve_model
from .errors import (
    ConfigFileError,
    DataError,
    LoraNbError,
    ModelLoadError,
    QuantizationUnavailable,
    RunFolderError,
    SettingsError,
)
from .estimate import count_trainable, estimate_memory
from .formats import load_settings, save_settings
from .presets import PRESETS, get_preset
from .settings import KitSettings, LoraSettings, QuantSettings, TrainSettings
from .targets import find_targets

apply_thread_settings()  # torch is imported now: set its intra-op and inter-op threads

__version__ = "0.1.0"

__all__ = [
    "DEMO_MODEL_ID",
    "PRESETS",
    "ConfigFileError",
    "DataError",
    "KitSettings",
    "LoraNbError",
    "LoraSettings",
    "ModelLoadError",
    "QuantSettings",
    "QuantizationUnavailable",
    "RunFolderError",
    "SettingsError",
    "TrainSettings",
    "count_trainable",
    "demo_model_path",
    "estimate_memory",
    "find_targets",
    "get_preset",
    "load_model",
    "load_settings",
    "resolve_model",
    "save_settings",
    "thread_report",
]
