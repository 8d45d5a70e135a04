"""The E-Sparse defaults in force; docs/method.md records the measurements that chose them.

Chosen on the full protocol (SmolLM2-135M, 128 x 2048 C4 calibration, seeds 0, 1, 2; docs/method.md has the
table): a component is on by default only once it lowers the mean over calibration seeds beyond their spread.

* Mask refinement on, 64 swaps per row (``refine``; converter/refine.py): 2:4 perplexity 109.9 -> 79.6 on the
  selection half, 159.3 -> 107.5 on WikiText-2, within 1.02-1.07x of SparseGPT without changing a weight;
  256 swaps gave no more (79.1 / 107.4) for four times the work.
* Global naive shuffle off (``gns`` None): the old default (GNS + LBS) was worse than LBS alone on every text,
  beyond the seed spread on WikiText-2 (159.3 vs 142.1 ±5.2). ``--gns serpentine`` brings it back. Whether GNS
  helps once refinement is on has not been measured on the full protocol yet (it needs the GPU).
* Local block shuffle on (PruneConfig's preset for E-Sparse): no LBS was worse (119.1 vs 105.8 selection).
* Entropy off (alpha = 0; E-Sparse = Wanda's score + LBS + refinement). The energy entropy at alpha 0.25 had won
  on the 16 x 512 CPU selection set, but at full scale (128 x 2048, H100, seed 0) alpha = 0 was lower on both
  held-out texts (WikiText-2 154.4 vs 163.6, Wikipedia eval 84.9 vs 92.7), and on the 8 x 512 CI protocol of
  2026-12-01 alpha 0.25 gave 104.7 against alpha 0's 86.6 (Wanda 114.6); it stays behind --alpha / --entropy.
"""

ESPARSE_DEFAULTS = {
    "alpha": 0.0,
    "estimator": "energy",
    "combine": "add",
    "gns": None,
    "refine": 64,
}
