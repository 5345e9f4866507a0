"""A few greedy tokens after loading, to show the loaded model works."""

from __future__ import annotations

import torch


def generate(model, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`. Without a tokenizer in the checkpoint (synthetic ones have none)
    the prompt's UTF-8 bytes stand in for token ids and the output is token ids, said as such."""
    from transformers import AutoTokenizer

    path = model.config.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tok = None
    vocab = model.config.get_text_config().vocab_size
    ids = tok(prompt, return_tensors="pt").input_ids if tok else torch.tensor([[b % vocab for b in prompt.encode()]])
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    with torch.no_grad():
        out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1] :]
    if tok:
        return prompt + tok.decode(new, skip_special_tokens=True)
    return f"(no tokenizer in {path}: prompt bytes used as token ids) generated ids: {new.tolist()}"
