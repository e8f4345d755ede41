"""Decoder-only language models (GPT-2, Llama, Qwen2, Gemma) as model families.

``core`` holds what they share (RMSNorm, rotary embeddings, causal masks with padding, grouped
attention, the LM head, the key/value cache and greedy decoding with it, the HF-name helpers);
``gpt2`` and ``llama`` hold the modules and the
:class:`~research.models.family.Family` records (``llama`` builds three: Llama, Qwen2, Gemma,
which differ only in data). research.models.families registers them.
"""
