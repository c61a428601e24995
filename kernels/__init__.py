"""Triton kernels, each beside its plain-PyTorch reference (``<op>.py`` and ``<op>_ref.py``).

This package's import name, ``kernels``, is also that of Hugging Face's ``kernels`` distribution, which transformers
imports when it finds it installed (transformers >= 5.25 requires it; openjepa pins transformers < 5.25). With both
installed, ``import kernels`` from this checkout finds this package, and transformers' ``from kernels import ...``
would fail with a bare "cannot import name"; the module ``__getattr__`` below names the conflict instead.
"""


import importlib.util


def __getattr__(name: str):
    # private names and our own submodules stay AttributeErrors: `hasattr` probes and `from kernels import <submodule>`
    # (which asks `hasattr` before importing it) must keep working
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    raise ImportError(
        f"'kernels.{name}' was asked for, but 'kernels' here is openjepa's kernel package ({__file__}), not Hugging "
        f"Face's 'kernels' distribution that transformers looks for. openjepa needs transformers < 5.25 (it requires "
        f"that distribution) and the 'kernels' distribution uninstalled: pip uninstall -y kernels && pip install -e .")
