"""Shared fixtures: a tiny Llama with a character-level tokenizer, built from a config (never downloaded)."""

from __future__ import annotations

import pytest
import torch

TINY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.\n\n"
) * 20


def tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, vocab: int = 128, tie: bool = True):
    """LlamaForCausalLM from a config: 2 layers, 4 heads / 2 KV heads (defaults: hidden 64, vocab 128, tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval()


def char_tokenizer(text: str):
    """A character-level fast tokenizer (one id per distinct character of ``text``, 0 = unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for ch in sorted(set(text)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer directory; ``tiny_model_dir.parent / "text.txt"`` is calibration text."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer(TINY_TEXT).save_pretrained(model_dir)
    (root / "text.txt").write_text(TINY_TEXT)
    return model_dir


def tiny_models():
    """One tiny random model per architecture-table entry, built from configs: name → model factory."""
    import transformers as T

    common = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256,
    )

    def make(config_cls, arch, **extra):
        def factory(seed: int = 0):
            torch.manual_seed(seed)
            config = config_cls(**{**common, **extra})
            config.architectures = [arch]
            model = T.AutoModelForCausalLM.from_config(config).eval()
            # random norm weights so that folding into them is really exercised
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 1 and "norm" in name:
                        p.uniform_(0.5, 1.5) if "Gemma" not in arch else p.uniform_(-0.5, 0.5)
            return model

        return factory

    return {
        "LlamaForCausalLM": make(T.LlamaConfig, "LlamaForCausalLM"),
        "MistralForCausalLM": make(T.MistralConfig, "MistralForCausalLM"),
        "Qwen2ForCausalLM": make(T.Qwen2Config, "Qwen2ForCausalLM"),
        "Qwen3ForCausalLM": make(T.Qwen3Config, "Qwen3ForCausalLM", head_dim=16),
        "Gemma3ForCausalLM": make(T.Gemma3TextConfig, "Gemma3ForCausalLM", head_dim=16, sliding_window=8),
        "MixtralForCausalLM": make(T.MixtralConfig, "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
        "Qwen2MoeForCausalLM": make(
            T.Qwen2MoeConfig, "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=64,
        ),
        "Qwen3MoeForCausalLM": make(
            T.Qwen3MoeConfig, "Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
        ),
    }


def bos_char_tokenizer(text: str):
    """:func:`char_tokenizer` with a ``[BOS]`` token that it puts in front of every encoding, as Gemma's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = char_tokenizer(text).backend_tokenizer
    bos = backend.get_vocab_size()
    backend.add_special_tokens(["[BOS]"])
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]")
