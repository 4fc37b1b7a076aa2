"""Tiny, randomly initialised text classifiers built at test time (the Hub is out of reach here)."""

from __future__ import annotations

import string
from pathlib import Path

WORDS = ("good great bad awful movie film plot actor love hate boring fun dull superb the a an is was "
         "not very and but it this that of to in").split()


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = specials + WORDS + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return list(dict.fromkeys(pieces))  # 'a' is a word and a letter: keep one, ids without holes


def build_checkpoint(folder: Path, family: str = "bert", id2label: dict[int, str] | None = None,
                     seed: int = 0, bert_tokenizer: bool = False, initializer_range: float = 0.02,
                     model_max_length: int = 128) -> Path:
    """Save a tiny random BERT or DistilBERT classifier with a WordPiece tokenizer, or a RoBERTa one with BPE.

    bert_tokenizer: give a DistilBERT model a BERT tokenizer, which also emits token_type_ids.
    initializer_range: wider weights make logits differ more from input to input.
    """
    if family == "roberta":
        return _roberta(folder, id2label or {0: "NEGATIVE", 1: "POSITIVE"}, seed, initializer_range)
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizerFast,
    )

    id2label = id2label or {0: "NEGATIVE", 1: "POSITIVE"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=128, initializer_range=initializer_range,
                            **labels)
        model, tokenizer_class = BertForSequenceClassification(config), BertTokenizerFast
    elif family == "distilbert":
        config = DistilBertConfig(vocab_size=len(_vocab()), dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                  max_position_embeddings=128, **labels)
        model, tokenizer_class = DistilBertForSequenceClassification(config), DistilBertTokenizerFast
    else:
        raise ValueError(family)
    if bert_tokenizer:
        tokenizer_class = BertTokenizerFast
    tokenizer = tokenizer_class(vocab_file=str(folder / "vocab.txt"), model_max_length=model_max_length)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _roberta(folder: Path, id2label: dict[int, str], seed: int, initializer_range: float = 0.02) -> Path:
    """Save a tiny random RoBERTa classifier with a byte-level BPE tokenizer trained on WORDS (no token_type_ids)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))  # vocab.json, merges.txt
    tokenizer = RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                                     model_max_length=128)
    config = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37, max_position_embeddings=130, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, id2label=id2label,
                           label2id={v: k for k, v in id2label.items()}, initializer_range=initializer_range)
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "MISC"}
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
# Sentences for the subword tokenizers to learn from: words, accents, CJK and emoji among them.
SENTENCES = [" ".join(WORDS), "Zoë visited Zürich and Köln with Marie-Hélène", "東京 と 大阪 に 行った",
             "the actor 😀 loved the film 🎬 in Paris", "John Smith was not very good in Berlin"] * 4


def build_token_checkpoint(folder: Path, family: str = "bert", id2label: dict[int, str] | None = None,
                           seed: int = 0, model_max_length: int = 24) -> Path:
    """Save a tiny random token classifier: BERT with WordPiece, RoBERTa with byte-level BPE, XLM-R with unigram.

    A short model_max_length makes a sentence span several windows. Weights are drawn wide, so the tags
    differ from token to token and no two labels tie.
    """
    import torch
    from tokenizers import Tokenizer, processors
    from transformers import (
        BertConfig,
        BertForTokenClassification,
        BertTokenizerFast,
        RobertaConfig,
        RobertaForTokenClassification,
        RobertaTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForTokenClassification,
        XLMRobertaTokenizerFast,
    )

    id2label = id2label or NER_LABELS
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
             "initializer_range": 0.3}
    folder.mkdir(parents=True, exist_ok=True)
    if family == "bert":
        (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=model_max_length)
        config = BertConfig(vocab_size=len(_vocab()), max_position_embeddings=64, **shape, **labels)
        model_class = BertForTokenClassification
    elif family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(SENTENCES, vocab_size=400, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bpe.save_model(str(folder))
        tokenizer = RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"),
                                         merges_file=str(folder / "merges.txt"), model_max_length=model_max_length)
        config = RobertaConfig(vocab_size=bpe.get_vocab_size(), max_position_embeddings=66, type_vocab_size=1,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2, **shape, **labels)
        model_class = RobertaForTokenClassification
    elif family == "xlm-roberta":
        from tokenizers import SentencePieceUnigramTokenizer

        unigram = SentencePieceUnigramTokenizer()
        unigram.train_from_iterator(SENTENCES, vocab_size=200, unk_token="<unk>",
                                    special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        backend: Tokenizer = unigram._tokenizer
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))])
        tokenizer = XLMRobertaTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                            bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                            unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
        config = XLMRobertaConfig(vocab_size=backend.get_vocab_size(), max_position_embeddings=66, type_vocab_size=1,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2, **shape, **labels)
        model_class = XLMRobertaForTokenClassification
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
