import io
import re

from byorl.training.progress import Bars

TIME_LEFT = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")  # tqdm's [elapsed<remaining]


def final_bars(out: io.StringIO) -> list[str]:
    """The last drawing of each bar (a bar redraws itself after \\r and ends with \\n)."""
    return [b.split("\r")[-1].strip() for b in out.getvalue().split("\n") if b.strip()]


def test_each_sequence_gets_a_bar_with_time_left():
    out = io.StringIO()
    with Bars(file=out, mininterval=0) as progress:
        for epoch in range(1, 4):
            progress(epoch, 3, "head epochs")
        for done, attack in enumerate(["apgd-ce", "apgd-dlr"], 1):  # a new sequence: a new bar
            progress(done, 2, attack)
        progress(1, 3, "head epochs")  # the next head: done fell back
    bars = final_bars(out)
    assert [b.split(":")[0] for b in bars] == ["head epochs", "apgd-dlr", "head epochs"]
    assert ["3/3" in bars[0], "2/2" in bars[1], "1/3" in bars[2]] == [True] * 3
    assert all(TIME_LEFT.search(b) for b in bars)


def test_a_label_names_the_bar_and_what_goes_beside_it():
    out = io.StringIO()
    with Bars("cells", file=out, mininterval=0) as progress:
        progress(1, 2, "byorl/500/linf")
        progress(2, 2, "byol/500/linf")
    (bar,) = final_bars(out)
    assert bar.startswith("cells: 100%") and "2/2" in bar and bar.endswith("byol/500/linf]")
    assert TIME_LEFT.search(bar)
