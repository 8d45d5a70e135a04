"""Physical (serving-order) weights from a pruned model and its permutations (docs/method.md, "Sharing
groups and permutations").

The residual stream is never permuted. For each decoder layer:
* ``attn_in`` P_A / ``mlp_in`` P_C: columns of q/k/v (gate/up, fc1) are taken at P; the norm that feeds
  them writes its output gathered at P (``norm_perm`` below), so no weight pass is added at run time;
* ``attn_out`` P_B: v_proj rows (and bias) are permuted by the per-kv-head permutation; the attention
  output then arrives in serving order and o_proj's columns are taken at P_B;
* ``mlp_out`` P_D: rows of gate/up (fc1 rows and bias) permuted by P_D, columns of down (fc2) at P_D.
The pruned function is unchanged; the N:M pattern of every linear now runs along its serving columns.
"""

from __future__ import annotations

import torch

from esparse.format.families import Family

from .arch import HeadShape


def linears_of(fam: Family) -> dict[str, tuple[str, ...]]:
    """group -> the HF linears (layer-local paths) that read it, from the family description."""
    return fam.linears_of_group()


def kv_row_perm(perm_b: torch.Tensor, heads: HeadShape) -> torch.Tensor:
    """v_proj row order for attn_out's P_B: kv head j's rows j*d + pi_j (pi_j read off a q head of j)."""
    d, rep = heads.head_dim, heads.n_heads // heads.n_kv
    per_q = perm_b.view(heads.n_heads, d) - (torch.arange(heads.n_heads) * d)[:, None]
    pi = per_q[:: rep]  # the first q head of each kv head
    return (torch.arange(heads.n_kv)[:, None] * d + pi).reshape(-1)


def serving_layer(
    fam: Family, tensors: dict[str, torch.Tensor], perms: dict[str, torch.Tensor], heads: HeadShape
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Serving-order copies of a layer's tensors (HF local names) and the norm gathers {group: P}.

    ``perms`` maps group name to its permutation; missing groups are unpermuted.
    """
    out = dict(tensors)
    norm_perm: dict[str, torch.Tensor] = {}
    lin = linears_of(fam)
    for group, perm in perms.items():
        perm = perm.long()
        for name in lin[group]:
            out[f"{name}.weight"] = out[f"{name}.weight"][:, perm]
        if group in fam.group_norm:
            norm_perm[group] = perm
            continue
        rows = kv_row_perm(perm, heads) if group == "attn_out" else perm
        for name in fam.producers[group]:
            out[f"{name}.weight"] = out[f"{name}.weight"][rows]
            if f"{name}.bias" in out:
                out[f"{name}.bias"] = out[f"{name}.bias"][rows]
    return out, norm_perm
