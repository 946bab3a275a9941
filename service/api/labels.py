"""Labels that requests send (a head's labeled set, an audit's true classes), checked against
the classes they index."""

from byorl.service.api.errors import APIError


def check_labels(labels: list[int], num_classes: int, at_least_two: bool) -> None:
    """422 for a label outside [0, num_classes), or (`at_least_two`) a single-class set."""
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise APIError(422, "label_out_of_range",
                       f"labels {bad[:5]} are outside [0, {num_classes}) for {num_classes} classes")
    if at_least_two and len(set(labels)) < 2:
        raise APIError(422, "single_class", "the labeled set holds a single class; a classifier "
                       "needs examples of at least two")
