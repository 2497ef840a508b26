"""The one TensorBoard event reader of the repository (compare_runs.py, soak.py, the tests).

A *run folder* holds event files (``events.out.tfevents.*``); torchtitan writes one per job under
``{dump_folder}/tb/<time stamp>``. ``run_folder(path)`` accepts that folder or any parent of
exactly one such folder. ``load_scalars(folder)`` returns every scalar series, sorted by step;
where a step was written more than once (a restart into the same folder, or two runs sharing
one folder) the last write wins. ``load_texts(folder)`` returns every text summary (tag -> its last
value). ``event_files(folder)`` says how many files (runs) it holds.
"""

from __future__ import annotations

import os

Series = list[tuple[int, float]]


class EventsError(Exception):
    """A folder that cannot be read as one run; the message names the folder."""


def event_files(folder: str | os.PathLike) -> list[str]:
    """The event files directly in ``folder``, sorted by name (their names start with the time)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if "tfevents" in n and os.path.isfile(os.path.join(folder, n)))


def run_folder(path: str | os.PathLike) -> str:
    """``path`` if it holds event files, else its one descendant that does (EventsError otherwise)."""
    path = str(path)
    if not os.path.exists(path):
        raise EventsError(f"{path}: no such folder")
    if not os.path.isdir(path):
        raise EventsError(f"{path}: not a folder (pass the run folder that holds the event files)")
    if event_files(path):
        return path
    found = sorted(root for root, _dirs, _files in os.walk(path) if event_files(root))
    if not found:
        raise EventsError(
            f"{path}: no TensorBoard event files (events.out.tfevents.*) in this folder or any folder under it"
        )
    if len(found) > 1:
        listing = "\n  ".join(found)
        raise EventsError(f"{path}: holds {len(found)} folders with event files; pass one of them:\n  {listing}")
    return found[0]


def _last_write_wins(points) -> Series:
    by_step: dict[int, float] = {}
    for step, value in points:  # in file order
        by_step[int(step)] = float(value)
    return sorted(by_step.items())


def load_scalars(folder: str | os.PathLike) -> dict[str, Series]:
    """tag -> [(step, value)] of every scalar in ``folder``'s event files (EventsError if unreadable)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        out = {tag: _last_write_wins((e.step, e.value) for e in acc.Scalars(tag)) for tag in tags.get("scalars", [])}
        # Writers of the new-style format store scalars as 0-d tensors.
        tensor_tags = [t for t in tags.get("tensors", []) if t not in out]
        if tensor_tags:
            from tensorboard.util import tensor_util

            for tag in tensor_tags:
                arrays = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
                points = [(s, float(a.reshape(()))) for s, a in arrays if a.size == 1 and a.dtype.kind in "fiu"]
                if points:
                    out[tag] = _last_write_wins(points)
    except Exception as e:  # a corrupt or unreadable event file
        raise EventsError(f"{folder}: cannot read TensorBoard events: {type(e).__name__}: {e}") from e
    return out


def load_texts(folder: str | os.PathLike) -> dict[str, str]:
    """tag -> the last value of every text summary (``SummaryWriter.add_text``) in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    suffix = "/text_summary"  # what add_text appends to the tag
    try:
        acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
        acc.Reload()
        texts = {}
        for tag in acc.Tags().get("tensors", []):
            events = acc.Tensors(tag)
            array = tensor_util.make_ndarray(events[-1].tensor_proto) if events else None
            if array is not None and array.dtype.kind in "SO" and array.size == 1:
                value = array.reshape(()).item()
                texts[tag.removesuffix(suffix)] = value.decode() if isinstance(value, bytes) else str(value)
    except Exception as e:  # a corrupt or unreadable event file
        raise EventsError(f"{folder}: cannot read TensorBoard events: {type(e).__name__}: {e}") from e
    return texts


def shown_steps(path: str | os.PathLike, tag: str) -> list[int]:
    """The steps of one tag of the one run under ``path`` as TensorBoard shows them, in file
    order: the events a restart marked as superseded (its purge step) are gone, any other step
    written twice is there twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_folder(path), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def scalar_series(path: str | os.PathLike, tag: str) -> Series:
    """One tag of the one run under ``path``; EventsError naming the tags present if it is missing."""
    folder = run_folder(path)
    scalars = load_scalars(folder)
    if tag not in scalars:
        raise EventsError(f"{folder}: no tag {tag!r}; tags present: {', '.join(sorted(scalars)) or '(none)'}")
    return scalars[tag]
