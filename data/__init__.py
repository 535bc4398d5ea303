"""Data pipeline: DataLayout bit packing, corpus -> MDS shards, streaming loader.

Modules (imported on demand so that ``import data`` stays cheap and needs no torch):

* ``data.layout``    the DataLayout word: encode/decode, labels and seq_idx
* ``data.tokenizer`` the built-in byte tokenizer and a wrapper for Hugging Face ones
* ``data.prepare``   ``python -m data.prepare``: any corpus -> MDS shards
* ``data.dataset``   StreamingDataset subclass, collate, DataLoader and DataSpec builders

No model code is imported here, ever.
"""
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
TINY_CORPUS = CORPUS_DIR / "tiny_corpus.jsonl"  # pretraining text for the tiny default config
QA_TRAIN = CORPUS_DIR / "qa_train.jsonl"  # {"input", "output"} records for fine-tuning demos
QA_TEST = CORPUS_DIR / "qa_test.jsonl"
