"""Labels checked against the classes they index."""

import pytest

from byorl.service.api.errors import APIError
from byorl.service.api.labels import check_labels


def test_labels_within_the_classes_pass():
    check_labels([0, 1, 2, 2], 3, at_least_two=True)
    check_labels([1, 1], 3, at_least_two=False)  # an audit may hold one class


@pytest.mark.parametrize("labels, classes, two, code", [
    ([0, 3], 3, False, "label_out_of_range"),
    ([-1, 0], 3, False, "label_out_of_range"),
    ([2, 2, 2], 3, True, "single_class"),
])
def test_bad_labels_are_a_422_naming_the_problem(labels, classes, two, code):
    with pytest.raises(APIError) as exc:
        check_labels(labels, classes, two)
    assert exc.value.status_code == 422 and exc.value.code == code
