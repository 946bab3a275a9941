"""Progress of the long commands, drawn with tqdm: the CLI's one progress library (training,
decoding, embedding and these callbacks alike), each bar with its rate and time left."""

from tqdm import tqdm


class Bars:
    """A `progress(done, total, what)` callback (byorl.training.linear_classifier.Progress) drawn
    as tqdm bars on stderr. A new bar starts with each new sequence of work (`done` falls back,
    or `total` changes: the next head, the attacks after it). With a `label`, the label names the
    bar and `what` is shown beside it; without, `what` names the bar."""

    def __init__(self, label: str | None = None, position: int = 0, leave: bool = True, **kw):
        self.label, self.kw = label, {"position": position, "leave": leave, **kw}
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.bar is None or total != self.bar.total or done <= self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=self.label, dynamic_ncols=True, **self.kw)
        if self.label:
            self.bar.set_postfix_str(what, refresh=False)
        else:
            self.bar.set_description_str(what, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
