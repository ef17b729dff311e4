"""trlax.models: a Flax NNX decoder for the Llama 2/3, Qwen2 / Qwen2.5 and Qwen3 families, Hugging Face
checkpoint io and sharding rules (see DESIGN.md).

- ``decoder``   :class:`Decoder`, :class:`DecoderConfig`, :class:`KVCache`, :func:`completion_logps`.
- ``attention`` memory-linear blockwise attention, cuDNN / splash dispatch (``DecoderConfig.attention_impl``).
- ``hf_io``     :func:`load_pretrained`, :func:`save_pretrained` (config.json + safetensors + tokenizer).
- ``sharding``  logical axis names -> mesh axes for data-parallel, FSDP and tensor-parallel layouts.
- ``lora``      LoRA / DoRA adapters (:class:`LoraConfig`, :class:`LoraDecoder`, :func:`merge_lora`).
- ``packing``   SFT packing (BFD, ``bfd_split``, wrapped) with segment ids for segment-aware attention.
- ``layout``    :func:`stack_layers` / :func:`unstack_layers`: per-layer <-> scanned (stacked) parameter trees.
"""

if __name__ != "trlax.models":  # pragma: no cover - guard against importing the bare folder
    raise ImportError("import this package as trlax.models (pip install -e .), not as a top-level 'models'")

from trlax.models.attention import *  # noqa: F401,F403,E402
from trlax.models.decoder import *  # noqa: F401,F403,E402
from trlax.models.hf_io import *  # noqa: F401,F403,E402
from trlax.models.sharding import *  # noqa: F401,F403,E402
from trlax.models.lora import *  # noqa: F401,F403,E402
from trlax.models.packing import *  # noqa: F401,F403,E402
from trlax.models.layout import *  # noqa: F401,F403,E402
