"""Stage 8: what did quantization cost? Quality of the loaded model, measured after load.

`LogitsVerify` runs one forward pass of the loaded model over a fixed evaluation text and compares its
next-token distributions with those of the same checkpoint loaded unquantized in the run's dtype
(`pipeline.quality.reference`: computed once in a child process, cached). A checkpoint without a tokenizer (the
synthetic ones) has random weights or no way to read text: it is compared on seeded token ids, and no
perplexity is claimed for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.core.context import LoadContext
from pipeline.core.schema import Source, VerifyConfig
from pipeline.quality import EVAL_TEXT
from pipeline.quality.generate import generate
from pipeline.quality.reference import reference_logits
from stages.base import Stage

CHUNK = 64  # positions per step of the comparison: bounds the float32 temporaries to 64 x vocab


class NoVerify(Stage):
    """The default: no quality check, so a run measures the load alone."""

    kind = "verify"

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        return {"verify": "none", "note": "quality not measured; stages/verify=logits measures it"}


class LogitsVerify(Stage):
    """Perplexity on the bundled text, KL / top-1 / logit error against the unquantized reference, and a
    short greedy generation."""

    kind = "verify"

    def __init__(self, cfg: VerifyConfig) -> None:
        super().__init__(cfg)
        self.text = Path(cfg.text).expanduser() if cfg.text else EVAL_TEXT
        if not self.text.is_file():  # said before the load, not after it
            raise ValueError(f"stages.verify.text={cfg.text}: no such file; give a UTF-8 text file")
        self.max_tokens, self.random_tokens, self.seed = cfg.max_tokens, cfg.random_tokens, cfg.seed
        self.reference, self.prompt, self.max_new_tokens = cfg.reference, cfg.prompt, cfg.max_new_tokens

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        model = ctx.require("model", self.kind)
        checkpoint = ctx.require("checkpoint", self.kind)
        ids, facts = self._inputs(ctx)
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        # no_grad, not inference_mode: optimum-quanto's packed int4/int2 weights unpack into tensors whose
        # version counter inference_mode forbids setting ("Cannot set version_counter for inference tensor")
        with torch.no_grad():
            logits = model(ids.unsqueeze(0).to(device)).logits[0].cpu()
        facts["perplexity"] = perplexity(logits, ids) if facts["input"] == "text" else None
        skip = None if self.reference else "stages.verify.reference=false"
        if ctx.pre_quantized:
            skip = "the checkpoint is saved quantized: it has no unquantized weights to compare with"
        if skip is None:
            ref, facts["reference"] = reference_logits(
                checkpoint.path, checkpoint.fingerprint, ctx.require("dtype", self.kind), device, ids, ctx.cfg.cache_dir
            )
            facts |= compare(logits, ref)
        else:
            facts |= dict.fromkeys(("kl_mean", "kl_max", "top1_agreement", "logit_abs_max", "logit_abs_mean"))
            facts["reference"] = {"skipped": skip}
        facts["prompt"] = self.prompt
        facts["generation"] = generate(model, self.prompt, self.max_new_tokens) if self.max_new_tokens else None
        return facts

    def _inputs(self, ctx: LoadContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """The token ids to evaluate on: the text through the checkpoint's tokenizer, or seeded random ids."""
        from transformers import AutoTokenizer

        path = ctx.checkpoint.path
        synthetic = ctx.cfg.model.source == Source.synthetic and not ctx.cfg.model.path
        try:
            tokenizer = None if synthetic else AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        if tokenizer is not None:
            ids = tokenizer(self.text.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
            ids = ids[: self.max_tokens]
            if len(ids) < 2:
                raise ValueError(f"stages.verify.text={self.text}: {len(ids)} token(s); need at least 2")
            return ids, {"input": "text", "text": str(self.text), "tokens": len(ids)}
        vocab = ctx.require("model_config", self.kind).get_text_config().vocab_size
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, vocab, (self.random_tokens,), generator=gen)
        why = "a synthetic checkpoint: random weights" if synthetic else f"no tokenizer in {path}"
        return ids, {
            "input": "random_ids",
            "tokens": len(ids),
            "seed": self.seed,
            "perplexity_note": f"{why}; perplexity not measured, compared on seeded token ids instead of text",
        }


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean next-token negative log-likelihood of `ids` under `logits` ([tokens, vocab])."""
    nll = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(ids) - 1, CHUNK):
        j = min(i + CHUNK, len(ids) - 1)
        logp = torch.log_softmax(logits[i:j].float(), dim=-1)
        nll -= logp.gather(1, ids[i + 1 : j + 1].unsqueeze(1)).double().sum()
    return float(torch.exp(nll / (len(ids) - 1)))


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """KL(reference || loaded) of the next-token distributions, top-1 agreement and logit error."""
    if logits.shape != ref.shape:
        raise ValueError(f"loaded logits {tuple(logits.shape)} and reference {tuple(ref.shape)} differ in shape")
    kl_sum = kl_max = abs_sum = abs_max = 0.0
    agree = 0
    for i in range(0, len(ref), CHUNK):
        q, p = logits[i : i + CHUNK].float(), ref[i : i + CHUNK].float()
        logq, logp = torch.log_softmax(q, dim=-1), torch.log_softmax(p, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)  # clamp: rounding can dip a hair below 0
        kl_sum, kl_max = kl_sum + float(kl.double().sum()), max(kl_max, float(kl.max()))
        agree += int((q.argmax(-1) == p.argmax(-1)).sum())
        diff = (q - p).abs()
        abs_sum, abs_max = abs_sum + float(diff.double().sum()), max(abs_max, float(diff.max()))
    n = len(ref)
    return {
        "kl_mean": kl_sum / n,
        "kl_max": kl_max,
        "top1_agreement": agree / n,
        "logit_abs_max": abs_max,
        "logit_abs_mean": abs_sum / (n * ref.shape[-1]),
    }
