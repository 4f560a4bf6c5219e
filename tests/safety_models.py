"""Tiny random models for the safety and prompt-expansion tests, saved as local folders and loaded back
through the real `transformers` loading code (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

WORDS = (
    "a an the red fox dog cat runs walks jumps through over snow forest river city night golden light camera "
    "slowly pans close-up wide shot cinematic soft warm cold wind trees mountains sunrise glowing mist"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def word_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], pad_token=specials[1])


def write_causal_lm(folder: Path) -> Path:
    """A 1-layer Llama with a word-level tokenizer and a chat template; it never stops early (no EOS)."""
    tokenizer = word_tokenizer(["<unk>", "<pad>", "<s>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=1, bos_token_id=2, eos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def always_answer(classifier: torch.nn.Linear, labels: list[str], always: str) -> None:
    """Zero weights and a large bias: the model answers `always` with a score of ~1 whatever the input."""
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.copy_(torch.tensor([8.0 if n == always else -8.0 for n in labels]))


def write_image_classifier(folder: Path, always: str = "nsfw") -> Path:
    """A tiny ViT whose classifier is biased so that it always answers `always` (labels: nsfw, normal)."""
    labels = ["nsfw", "normal"]
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    model = ViTForImageClassification(config)
    always_answer(model.classifier, labels, always)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_text_classifier(folder: Path, always: str = "toxic") -> Path:
    """A tiny BERT text classifier biased to always answer `always` (labels: safe, toxic)."""
    tokenizer = word_tokenizer(["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    tokenizer.cls_token, tokenizer.sep_token = "[CLS]", "[SEP]"
    labels = ["safe", "toxic"]
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    always_answer(model.classifier, labels, always)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
