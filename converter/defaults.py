"""The E-Sparse defaults in force; docs/method.md records the measurements that chose them.

Entropy: off by default (alpha = 0; E-Sparse = Wanda's score + GNS + LBS). The energy entropy at alpha 0.25
had won on the 16 x 512 CPU selection set, but at full scale (128 x 2048, H100, seed 0) alpha = 0 was lower on
both held-out texts (WikiText-2 154.4 vs 163.6, Wikipedia eval 84.9 vs 92.7), and on the 8 x 512 CI protocol
of 2026-12-01 alpha 0.25 gave 104.7 against alpha 0's 86.6 (Wanda 114.6). A component is on by default only
once it lowers the full-protocol mean over calibration seeds beyond their spread (docs/method.md); the entropy
stays behind --alpha / --entropy until that run shows it.
"""

ESPARSE_DEFAULTS = {
    "alpha": 0.0,
    "estimator": "energy",
    "combine": "add",
    "gns": "serpentine",
}
