"""desmoe: multi-domain fine-tuning of Mixture-of-Experts LMs (DES-MoE) on DeepSpeed AutoEP.

Importing the package loads nothing heavy; ``desmoe.load_pretrained`` imports torch and
transformers when called.
"""


def load_pretrained(path: str, **from_pretrained_kwargs):
    """The transformers model of a ``desmoe export`` directory, with its adaptive routers in place
    (see desmoe.export.load_pretrained)."""
    from desmoe.export import load_pretrained as _load

    return _load(path, **from_pretrained_kwargs)
