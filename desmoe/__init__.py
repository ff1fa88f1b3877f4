"""desmoe: multi-domain fine-tuning of Mixture-of-Experts LMs (DES-MoE) on DeepSpeed AutoEP.

Importing the package loads nothing heavy; ``desmoe.load_pretrained`` imports torch and
transformers when called.
"""


def load_pretrained(path: str, domain: str | None = None, coverage: float | None = None, **from_pretrained_kwargs):
    """The transformers model of a ``desmoe export`` directory, with its adaptive routers in place;
    with ``domain``, every MoE layer routes only among that domain's experts: the run's training
    selection, or with ``coverage`` C the fewest experts that carry a share C of the domain's routing
    (see desmoe.export.load_pretrained and desmoe.restrict)."""
    from desmoe.export import load_pretrained as _load

    return _load(path, domain=domain, coverage=coverage, **from_pretrained_kwargs)
