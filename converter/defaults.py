"""The E-Sparse defaults in force; docs/method.md records the measurements that chose them.

Entropy: the energy entropy (how evenly a channel's x^2 mass spreads over calibration tokens) added to the
normalised norm with weight 0.25 won on the selection set (Wikipedia-sample calibration half) over alpha = 0
and over the histogram estimators; 0.1 and 0.5 were worse.
"""

ESPARSE_DEFAULTS = {
    "alpha": 0.25,
    "estimator": "energy",
    "combine": "add",
    "gns": "serpentine",
}
