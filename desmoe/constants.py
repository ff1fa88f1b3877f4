"""Names shared across desmoe: training modes, task metrics, the label id that is not trained.

A leaf module (imports nothing of desmoe), so every layer can use it without reaching up.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label of a token that is not trained or scored (prompts, padding); torch's cross-entropy default."""

DES_MODES = ("desmoe", "desmoe_no_alr", "desmoe_no_dges")
"""DES-MoE and its two ablations (no adaptive router; no domain-guided expert specialisation)."""
ESFT_MODES = ("esft_gate", "esft_token")
"""Expert-specialised fine-tuning baselines (Wang et al. 2024), by the score that selects experts."""
METHOD_STATE_MODES = DES_MODES + ESFT_MODES
"""The modes with per-expert state (hooks, masks, affinity): every mode but full fine-tuning."""
LORA_MODE = "lora"
"""Low-rank adapters (peft) on attention, shared experts and dense MLPs; routed experts and router frozen."""
METHOD_MODES = ("fft", ) + METHOD_STATE_MODES + (LORA_MODE, )
"""Every ``method.mode``."""

METRICS = ("exact_match", "chrf", "token_accuracy")
"""Task metrics a domain can name (``data.domains.<d>.metric``), besides loss and perplexity."""
GENERATION_METRICS = ("exact_match", "chrf")
"""The task metrics scored on greedy generations (they need prompt/response pairs)."""
