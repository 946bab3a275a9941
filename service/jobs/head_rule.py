"""Which head `POST /linear-head` fits on a submitted labeled set, decided by its size.

What the reproduction study (results/reproduction) measured: with few labels the head's L2
strength decides much of its robustness, and early stopping on a handful of held-out images
is noise. So 10 % are held out (early stopping, choosing the L2 strength among the study's
grid) only when that leaves at least 100 images; smaller sets train on every image, and a
non-robust head then takes the L2 strength the study chose at 500 labels. Explicit request
values always win.
"""

AUTO_VALIDATION_FRACTION = 0.1
MIN_LABELS_FOR_HOLDOUT = 1000
SMALL_SET_L2 = 0.3  # byorl-pgd3, 500 labels: chosen from the grid (its largest value)


def head_rule(n: int, robust: bool, validation_fraction: float | None,
              l2: float | None) -> tuple[float, str, float]:
    """(validation fraction, head kind, L2 strength) for a head on n images; None = automatic.

    Kinds are byorl.training.linear_classifier.HEAD_KINDS: "l2" chooses the strength on the
    held-out images.
    """
    if validation_fraction is None:
        validation_fraction = AUTO_VALIDATION_FRACTION if n >= MIN_LABELS_FOR_HOLDOUT else 0.0
    if robust:
        return validation_fraction, "robust", l2 or 0.0
    if l2 is None and int(round(n * validation_fraction)) > 0:
        return validation_fraction, "l2", 0.0
    return validation_fraction, "nonrobust", SMALL_SET_L2 if l2 is None else l2
