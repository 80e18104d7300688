"""The chunked, fused causal-LM loss equals transformers' own loss and gradients."""

import pytest
import torch

import fabric_quant as fq
from fabric_quant.finetune.loss import ChunkedLossLM, fused_head_supported, linear_cross_entropy


def _tiny(model_type: str, dtype: torch.dtype, mode: str | None, tmp_path):
    import transformers

    config_cls = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                                        "qwen3": "Qwen3Config"}[model_type])  # fmt: skip
    config = config_cls(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    return fq.from_pretrained(tmp_path / model_type, mode, dtype=dtype)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (3, 20))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    return {"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(20) < 7), "labels": labels}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_chunked_loss_equals_transformers_loss_and_gradients(model_type, chunk, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = _tiny(model_type, torch.float32, None, tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert fused_head_supported(peft_model)
    batch = _batch()
    reference = peft_model(**batch).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    loss = ChunkedLossLM(peft_model, chunk)(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: loss only
        torch.testing.assert_close(ChunkedLossLM(peft_model, chunk)(**batch).loss, reference.detach())


@pytest.mark.parametrize("mode", ["nf4-dq", None])
def test_chunked_loss_in_bf16_matches_within_bf16_rounding(mode, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny("llama", torch.bfloat16, mode, tmp_path),
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    batch = _batch()
    reference = peft_model(**batch).loss
    reference.backward()
    expected = {n: p.grad.float().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    loss = ChunkedLossLM(peft_model, 8)(**batch).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 1e-3 * reference.item()
    for name, p in peft_model.named_parameters():
        if p.requires_grad:  # bf16 gradients: compare directions
            cos = torch.nn.functional.cosine_similarity(p.grad.float().flatten(), expected[name].flatten(), dim=0)
            assert cos > 0.99, name


def test_no_target_token_gives_nan_like_transformers():
    head = torch.nn.Linear(8, 10, bias=False)
    labels = torch.full((1, 4), -100)
    assert torch.isnan(linear_cross_entropy(torch.randn(1, 4, 8), head.weight, None, labels, 2))


def test_trained_or_unsupported_heads_keep_the_models_own_loss(tmp_path):
    model = _tiny("llama", torch.float32, None, tmp_path)
    model.lm_head.weight.requires_grad_(True)
    assert not fused_head_supported(model)
    model.lm_head.weight.requires_grad_(False)
    model.config.model_type = "gemma2"  # soft-capped logits: the head's output is not the logits
    assert not fused_head_supported(model)


def test_collate_pads_to_a_multiple_within_the_limit():
    from fabric_quant.finetune.data import IGNORE_INDEX, collate

    examples = [{"input_ids": [5] * 70, "labels": [1] * 70}, {"input_ids": [6] * 3, "labels": [2] * 3}]
    batch = collate(examples, 0, "causal-lm", 64, 256)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum() == 73 and (batch["labels"] != IGNORE_INDEX).sum() == 73
    assert collate(examples, 0, "causal-lm", 64, 100)["input_ids"].shape == (2, 100)  # capped at max_seq_length
    assert collate(examples, 0, "causal-lm", 64, 50)["input_ids"].shape == (2, 70)  # never below the longest
    assert collate(examples, 0, "causal-lm")["input_ids"].shape == (2, 70)  # default: the longest
