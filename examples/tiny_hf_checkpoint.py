"""Write a tiny random Hugging Face checkpoint (Qwen2 architecture, config.json + model.safetensors +
tokenizer files) to a local folder, to try ``trlax train ... --model <folder>`` without downloading
anything. Any local Llama / Qwen2 / Qwen3 checkpoint directory works the same way.

    python examples/tiny_hf_checkpoint.py /tmp/tiny-qwen2
    trlax train sft --model /tmp/tiny-qwen2 --output_dir runs/sft-qwen2
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('runs/sft-qwen2/final')"
"""

import os
import sys

from flax import nnx

from trlax.models import Decoder, DecoderConfig, save_pretrained
from trlax.train.data import build_tokenizer
from trlax.train.modeling import tiny_hf_config


def main(path: str) -> None:
    tok = build_tokenizer(os.path.join(path, "_tokenizer"))
    hf = tiny_hf_config(tok, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)
    save_pretrained(Decoder(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0)), path, tokenizer=tok)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2")
