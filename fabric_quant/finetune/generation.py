"""Text generation with a (quantized) causal LM: prompts in the fine-tuning format, streamed output, speed."""

from __future__ import annotations

import time

import torch

from fabric_quant.finetune.data import PROMPT


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The prompt the QLoRA recipe trains instruction data with."""
    return PROMPT.format(
        ctx=", paired with an input that provides further context" if context else "",
        instruction=instruction,
        input=f"### Input:\n{context}\n\n" if context else "",
    )


@torch.no_grad()
def generate(model, tokenizer, input_ids: list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stream: bool = False) -> dict:  # fmt: skip
    """Greedy (``temperature == 0``) or sampled continuation of ``input_ids``; returns the text, the number of new
    tokens and the tokens per second of the generation (prefill included)."""
    from transformers import TextStreamer

    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    ids = torch.tensor([input_ids], device=device)
    sample = temperature > 0
    kwargs = {"do_sample": sample, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=pad, streamer=streamer, **kwargs)  # fmt: skip
    elapsed = time.perf_counter() - start
    model.train(was_training)
    new = out[0, ids.shape[1] :].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
            "tokens_per_s": len(new) / elapsed if elapsed > 0 else float("nan")}  # fmt: skip
