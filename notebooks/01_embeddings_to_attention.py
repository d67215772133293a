# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # From word embeddings to attention
#
# Placeholder while the spine is built.

# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda
profile = "quick"  # quick | full
seed = 0

# %%
#| default_exp weighted_average
from annotated_transformer.runtime import setup
device = setup(device, profile, seed)

# %%
#| export
import torch


def weighted_average(weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Mix `vectors` (n, d) with `weights` (..., n): the notes' Apple = 0.1 E_love + ..."""
    return weights @ vectors

# %% tags=["nbval-check-output"]
print(weighted_average(torch.tensor([0.1, 0.5, 0.4]), torch.eye(3)))
