"""Domain-labelled text: reading, tokenising, packing, and a domain-synchronised sampler.

The package face: ``from desmoe.data import X`` for every name below. The code lives in
sources (reading records), tokenizers (text -> ids), packing (ids -> rows, DomainData) and
sampler (DomainSampler), each importing only the ones before it; builtin has the sample corpora
(builtin_many the seams of its many sub-domains, MANY_DOMAINS).
"""

from desmoe.constants import IGNORE_INDEX
from desmoe.data.builtin import builtin_parent, builtin_source
from desmoe.data.builtin_many import MANY_DOMAINS
from desmoe.data.packing import (LONG_EXAMPLES, DomainData, FittedExample, build_domain_data, build_holdout,
                                 choose_eval_examples, domain_metrics, fit_example, frame_example, pack_framed,
                                 pack_positions, pack_sequences, real_token_mask)
from desmoe.data.sampler import DomainSampler
from desmoe.data.sources import (DEFAULT_MAX_RECORD_BYTES, FORMATS, JSONL_SUFFIXES, ChatExample, DataError, ScanReport,
                                 Segment, example_text, expand_paths, expand_sources, load_domain_examples,
                                 load_domain_texts, read_jsonl, read_lines, read_records, record_segments)
from desmoe.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, build_tokenizer,
                                    chat_template_segments, encode_example, eval_pair, prompt_ids, render_segments,
                                    spm_cache_dir, train_sentencepiece)

__all__ = [
    "IGNORE_INDEX",
    # builtin (the sample corpora; the rest of it: desmoe.data.builtin)
    "MANY_DOMAINS", "builtin_parent", "builtin_source",
    # sources
    "DEFAULT_MAX_RECORD_BYTES", "FORMATS", "JSONL_SUFFIXES", "ChatExample", "DataError", "ScanReport", "Segment",
    "example_text", "expand_paths", "expand_sources", "load_domain_examples", "load_domain_texts", "read_jsonl",
    "read_lines", "read_records", "record_segments",
    # tokenizers
    "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "build_tokenizer", "chat_template_segments",
    "encode_example", "eval_pair", "prompt_ids", "render_segments", "spm_cache_dir", "train_sentencepiece",
    # packing
    "LONG_EXAMPLES", "DomainData", "FittedExample", "build_domain_data", "build_holdout", "choose_eval_examples",
    "domain_metrics", "fit_example", "frame_example", "pack_framed", "pack_positions", "pack_sequences",
    "real_token_mask",
    # sampler
    "DomainSampler",
]
