"""The E-Sparse defaults in force; docs/method.md records the measurements that chose them."""

ESPARSE_DEFAULTS = {
    "alpha": 0.0,  # entropy weight: 0 until an entropy formulation wins on the calibration split
    "estimator": "hist",
    "combine": "add",
    "gns": "serpentine",
}
